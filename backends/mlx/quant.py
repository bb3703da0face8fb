"""Linear weights on MLX, as compact as the checkpoint: float or quantized.

A linear weight is a dict, passed whole into the compiled layer functions:

    float      {"w": (out, in) in its stored dtype}
    quantized  {"w": uint32 (out, in * bits / 32),
                "scales", "biases": (out, in / group),  # w = scales * q + biases
                "group_size": int, "bits": int}

(mx.compile takes the ints as constants: one trace per distinct layout.)
A MoE layer's experts of one role are one such weight with a leading expert
axis, (E, out, ...) each array (`stack`), multiplied by `gather_linear`.
mlx-lm folders hold this layout already and pass through unchanged. GGUF blocks
are repacked once at load, on the host, a chunk of rows at a time, into affine
groups of 32, the smallest group mlx 0.32 has (bits 1-6 and 8; no group 16):

    GGUF  code q per group of 32   scale   bias      exact  bits  bytes/32: file, held
    Q8_0  int8 + 128               d       -128 d    yes    8     34     36
    Q4_0  q                        d       -8 d      yes    4     18     20
    Q4_1  q                        d       m         yes    4     20     20
    Q5_0  q                        d       -16 d     yes    5     22     24
    Q5_1  q                        d       m         yes    5     24     24
    Q4_K  q (sub-blocks of 32)     d sc    -dmin m   yes    4     18     24 (*)
    Q5_K  q                        d sc    -dmin m   yes    5     22     28 (*)
    Q3_K  128 - (sc - 32) q        -d      128 d     yes    8     13.75  36
    Q2_K  requantized (below)      f16     f16       no     8     10.5   36
    Q6_K  requantized              f16     f16       no     8     26.25  36

Scales and biases are held in the narrowest of (the model dtype if 16-bit,
float16, float32) that holds every one exactly: float16 for the legacy types
and Q3_K, whose d is float16 and whose other factors are powers of two;
(*) float32 for Q4_K/Q5_K, whose d * sc is a 17-bit product (rounding it to
float16 would save 4 bytes/32 at 2^-11 relative error per scale). When that
dtype differs from the activations', mlx casts both to the wider one inside
the call (an AsType per call on x and on the scales: speed, not accuracy).

Q3_K: the 3-bit codes (-4..3) times their 6-bit sub-scales (-32..31) lie in
[-124, 128], so one 8-bit code per element over two 16-wide sub-blocks is exact;
negating it (128 - k in [0, 252]) puts the bias at 128 d, exact in float16.
Q2_K: d sc q - dmin m has a different offset per 16-wide sub-block, and d and
dmin are unrelated, so no single affine group of 32 holds it exactly. Q6_K:
its int8 sub-scales times 6-bit codes span 13 bits. Both are requantized to
LOSSY_BITS bits per group of 32 over the group's [min, max]: the error is at
most (max - min) / (2 (2^bits - 1)) per weight, 1/510 of the group's range
with 8 bits. Measured on random blocks, RMS error / RMS weight: Q6_K 4.2e-3
(its own rounding is ~1.6e-2: the sum grows ~3%), Q2_K 1.7e-3; with 6 bits
1.7e-2 and 6.7e-3, with 4 bits 7.1e-2 and 2.8e-2.
"""

from __future__ import annotations

import ml_dtypes
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import Q4_K as GGUF_Q4_K
from gguf.quants import dequantize as gguf_dequantize

from cake.errors import ModelError
from cake.weights.packed import Packed, Stored, gguf_block, parse_mlx_format

Linear = dict  # the layout above
GROUP = 32
LOSSY_BITS = 8
_CHUNK = 1 << 22  # weights repacked per step: bounds the host's transient arrays


def from_numpy(a: np.ndarray) -> mx.array:
    """A NumPy array as MLX in the same dtype; bfloat16 goes over as its bits."""
    a = np.ascontiguousarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return mx.array(a.view(np.uint16)).view(mx.bfloat16)
    return mx.array(a)


def load_linear(t: Stored, dtype: np.dtype) -> Linear:
    """A stored (out, in) weight as MLX holds it for a model computing in `dtype`.

    Float matrices keep their stored dtype unless `dtype` is as narrow or
    narrower (then they take it): never widened at load.
    """
    if not isinstance(t, Packed):
        keep = t.dtype if t.dtype.itemsize < dtype.itemsize else dtype
        return {"w": from_numpy(np.asarray(t).astype(keep, copy=False))}
    if t.is_mlx:
        bits, group = parse_mlx_format(t.format)
        arrays = {"w": t.data, "scales": t.scales, "biases": t.biases}
        return {
            **{k: from_numpy(a) for k, a in arrays.items()},
            "group_size": group,
            "bits": bits,
        }
    if t.format not in _GGUF:
        raise ModelError(f"the MLX backend cannot hold {t.format} weights")
    return _repack(t, dtype)


def linear(x: mx.array, p: Linear, dtype: mx.Dtype | None = None) -> mx.array:
    """x (..., in) @ w.T -> (..., out), in `dtype` (default: x's)."""
    if "scales" in p:
        y = mx.quantized_matmul(
            x,
            p["w"],
            p["scales"],
            p["biases"],
            transpose=True,
            group_size=p["group_size"],
            bits=p["bits"],
        )
    else:
        y = x @ p["w"].T
    return y.astype(dtype or x.dtype)


def linears(x: mx.array, parts: list[Linear]) -> mx.array:
    """The products with `parts` (see `fuse`) side by side: (..., sum of outs)."""
    ys = [linear(x, p) for p in parts]
    return ys[0] if len(ys) == 1 else mx.concatenate(ys, axis=-1)


def fuse(parts: list[Linear]) -> list[Linear]:
    """One weight of all the rows when the parts share a layout, else the parts.

    Rows are the second last axis: stacked experts (see `stack`) fuse too.
    """
    if len({_layout(p) for p in parts}) > 1:
        return parts
    return [
        {
            k: mx.concatenate([p[k] for p in parts], axis=-2)
            if isinstance(v, mx.array)
            else v
            for k, v in parts[0].items()
        }
    ]


def stack(experts: list[Linear]) -> Linear:
    """The experts' weights of one role as one: each array (E, out, ...).

    Quantized experts must share bits and group size; scales and biases of
    different dtypes are held in float32, which holds each of them exactly.
    """
    kinds = {
        f"{p['bits']} bits in groups of {p['group_size']}" if "bits" in p else "float"
        for p in experts
    }
    if len(kinds) > 1:
        got = ", ".join(sorted(kinds))
        raise ModelError(
            "the MLX backend runs the experts of one MLP matrix as one stacked "
            f"weight, so they must share a quantization; got {got}: requantize "
            "the model with one type per expert tensor"
        )
    out = dict(experts[0])
    for k, v in experts[0].items():
        if isinstance(v, mx.array):
            arrays = [p[k] for p in experts]
            if len({a.dtype for a in arrays}) > 1:
                arrays = [a.astype(mx.float32) for a in arrays]
            out[k] = mx.stack(arrays)
    return out


def gather_linear(
    x: mx.array, p: Linear, experts: mx.array, sorted_experts: bool = False
) -> mx.array:
    """x (..., 1, in) @ w[experts].T for a stacked weight (see `stack`):
    (..., 1, out), in x's dtype, the batch axes of x broadcast with experts'."""
    if "scales" in p:
        y = mx.gather_qmm(
            x,
            p["w"],
            p["scales"],
            p["biases"],
            rhs_indices=experts,
            transpose=True,
            group_size=p["group_size"],
            bits=p["bits"],
            sorted_indices=sorted_experts,
        )
    elif p["w"].dtype == mx.float32 or mx.default_device().type != mx.cpu:
        y = mx.gather_mm(
            x,
            p["w"].swapaxes(-1, -2),
            rhs_indices=experts,
            sorted_indices=sorted_experts,
        )
    else:  # mlx's CPU gather_mm takes float32 only: widen what is multiplied
        y = _gather_mm_f32(x.astype(mx.float32), p["w"], experts, sorted_experts)
    return y.astype(x.dtype)


def _gather_mm_f32(
    x: mx.array, w: mx.array, experts: mx.array, sorted_experts: bool
) -> mx.array:
    """`gather_linear` of a 16-bit float stack w (E, out, in) in float32, as
    mlx's CPU computes it: with at most E picks (decode), only the picked
    experts are widened, a copy each; with more (prefill), the whole stack,
    once for the call (a transient float32 copy of one matrix's experts)."""
    if experts.size <= w.shape[0]:
        return x @ w[experts].astype(mx.float32).swapaxes(-1, -2)
    return mx.gather_mm(
        x,
        w.astype(mx.float32).swapaxes(-1, -2),
        rhs_indices=experts,
        sorted_indices=sorted_experts,
    )


def gather_linears(
    x: mx.array, parts: list[Linear], experts: mx.array, sorted_experts: bool = False
) -> mx.array:
    """`gather_linear` with each of `parts` side by side: (..., 1, sum of outs)."""
    ys = [gather_linear(x, p, experts, sorted_experts) for p in parts]
    return ys[0] if len(ys) == 1 else mx.concatenate(ys, axis=-1)


def take_rows(p: Linear, ids: mx.array, dtype: mx.Dtype) -> mx.array:
    """Rows `ids` (any shape) of an embedding table, (*ids.shape, in), in `dtype`;
    a quantized table is decoded only for those rows."""
    if "scales" not in p:
        return p["w"][ids].astype(dtype)
    # mx.dequantize computes in the scales' dtype, whatever dtype it returns
    s, b = p["scales"][ids].astype(dtype), p["biases"][ids].astype(dtype)
    q = dict(group_size=p["group_size"], bits=p["bits"])
    return mx.dequantize(p["w"][ids], s, b, **q)


def dequantize(p: Linear) -> np.ndarray:
    """The float32 (out, in) matrix the weight stands for: the readable view."""
    if "scales" not in p:
        return np.array(p["w"].astype(mx.float32))
    s, b = (p[k].astype(mx.float32) for k in ("scales", "biases"))
    q = dict(group_size=p["group_size"], bits=p["bits"])
    return np.array(mx.dequantize(p["w"], s, b, **q))


def nbytes(p: Linear) -> int:
    return sum(v.nbytes for v in p.values() if isinstance(v, mx.array))


def _layout(p: Linear) -> tuple:
    return tuple(
        (k, v.dtype if isinstance(v, mx.array) else v) for k, v in sorted(p.items())
    )


# --- GGUF -> affine groups of 32 -----------------------------------------------
# Each decoder takes blocks uint8 (n, block bytes) and returns codes uint8
# (n, block elems) with scales and biases float32 (n, block elems / 32).


def _f16(b: np.ndarray) -> np.ndarray:
    """(n, 2) bytes -> (n, 1) float32."""
    return b.view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32) codes: low nibbles are elements 0-15, high 16-31."""
    return np.concatenate([qs & 15, qs >> 4], axis=1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes, bit i of the little-endian word for element i -> (n, 32)."""
    return np.unpackbits(qh, axis=1, bitorder="little") << 4


def _q8_0(b):
    d = _f16(b[:, :2])
    return b[:, 2:] ^ 0x80, d, -128 * d  # int8 + 128 as a byte: flip its sign bit


def _q4_0(b):
    d = _f16(b[:, :2])
    return _nibbles(b[:, 2:]), d, -8 * d


def _q4_1(b):
    return _nibbles(b[:, 4:]), _f16(b[:, :2]), _f16(b[:, 2:4])


def _q5_0(b):
    d = _f16(b[:, :2])
    return _nibbles(b[:, 6:]) | _high_bits(b[:, 2:6]), d, -16 * d


def _q5_1(b):
    codes = _nibbles(b[:, 8:]) | _high_bits(b[:, 4:8])
    return codes, _f16(b[:, :2]), _f16(b[:, 2:4])


def _k_scales(b):
    """Q4_K/Q5_K: the 8 sub-blocks' scales d sc and biases -dmin m, (n, 8)."""
    sc, m = GGUF_Q4_K.get_scale_min(b[:, 4:16])
    return _f16(b[:, :2]) * sc, -_f16(b[:, 2:4]) * m


def _k_low(qs):
    """(n, 128) bytes -> (n, 8, 32) 4-bit codes: byte run c holds sub-blocks 2c
    (low nibbles) and 2c + 1 (high)."""
    qs = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([qs & 15, qs >> 4], axis=2).reshape(-1, 8, 32)


def _q4_k(b):
    return _k_low(b[:, 16:]).reshape(len(b), -1), *_k_scales(b)


def _q5_k(b):
    qh = b[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]  # (n, 8, 32)
    codes = _k_low(b[:, 48:]) | (qh & 1) << 4
    return codes.reshape(len(b), -1), *_k_scales(b)


def _q3_k(b):
    n = len(b)
    hmask, qs, raw, d = np.split(b, [32, 96, 108], axis=1)
    low = np.concatenate([raw[:, :8] & 15, raw[:, :8] >> 4], axis=1)  # (n, 16)
    high = raw[:, None, 8:] >> np.array([0, 2, 4, 6], np.uint8)[:, None]  # (n, 4, 4)
    sc = (low | (high.reshape(n, 16) & 3) << 4).astype(np.int16) - 32
    shifts = np.array([0, 2, 4, 6], np.uint8)[:, None]
    ql = (qs.reshape(n, 2, 1, 32) >> shifts & 3).reshape(n, 16, 16)
    qh = (hmask[:, None, :] >> np.arange(8, dtype=np.uint8)[:, None] & 1).reshape(
        n, 16, 16
    )
    q = ql.astype(np.int16) - 4 * (1 - qh.astype(np.int16))  # -4..3
    k = sc[:, :, None] * q  # (n, 16 sub-blocks, 16) in [-124, 128]
    d = np.broadcast_to(_f16(d), (n, 8))  # one d for the block's 8 groups
    return (128 - k).astype(np.uint8).reshape(n, -1), -d, 128 * d


def _requantize(kind: str):
    """A decoder that requantizes gguf's float32 values to LOSSY_BITS per 32."""

    def decode(b):
        v = gguf_dequantize(b, GGMLQuantizationType[kind]).reshape(-1, GROUP)
        lo, hi = v.min(1, keepdims=True), v.max(1, keepdims=True)
        # float16 scale and bias, rounded so that [bias, bias + top * scale] covers
        # [lo, hi]: every weight then rounds to a code within half a step.
        top = 2**LOSSY_BITS - 1
        bias = _f16_toward(lo, -np.inf)
        scale = _f16_toward((hi - bias) / top, np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(scale > 0, np.rint((v - bias) / scale), 0)
        codes = np.clip(q, 0, top).astype(np.uint8).reshape(len(b), -1)
        n_groups = codes.shape[1] // GROUP
        return codes, scale.reshape(-1, n_groups), bias.reshape(-1, n_groups)

    return decode


def _f16_toward(x: np.ndarray, to: float) -> np.ndarray:
    """x rounded to a float16 value on the side of `to`, as float32."""
    y = x.astype(np.float16)
    off = y > x if to < 0 else y < x
    return np.where(off, np.nextafter(y, np.float16(to)), y).astype(np.float32)


_GGUF = {
    "Q8_0": (8, _q8_0),
    "Q4_0": (4, _q4_0),
    "Q4_1": (4, _q4_1),
    "Q5_0": (5, _q5_0),
    "Q5_1": (5, _q5_1),
    "Q4_K": (4, _q4_k),
    "Q5_K": (5, _q5_k),
    "Q3_K": (8, _q3_k),
    "Q2_K": (LOSSY_BITS, _requantize("Q2_K")),
    "Q6_K": (LOSSY_BITS, _requantize("Q6_K")),
}


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes (rows, cols) -> uint32 (rows, cols * bits / 32), mlx's layout:
    element j at bits [j bits, (j + 1) bits) of the row's little-endian stream."""
    if bits == 8:
        return codes.view("<u4")
    if bits == 4:
        return (codes[:, 0::2] | codes[:, 1::2] << 4).view("<u4")
    stream = np.unpackbits(codes[..., None], axis=-1, count=bits, bitorder="little")
    return np.packbits(stream.reshape(len(codes), -1), axis=-1, bitorder="little").view(
        "<u4"
    )


def _repack(t: Packed, dtype: np.dtype) -> Linear:
    rows, cols = t.shape
    bits, decode = _GGUF[t.format]
    block_bytes = gguf_block(t.format)[1]
    w = np.empty((rows, cols * bits // 32), np.uint32)
    scales = np.empty((rows, cols // GROUP), np.float32)
    biases = np.empty_like(scales)
    step = max(1, _CHUNK // cols)
    for r in range(0, rows, step):
        part = slice(r, min(r + step, rows))
        codes, s, b = decode(t.data[part].reshape(-1, block_bytes))
        n = part.stop - part.start
        w[part] = _pack(np.ascontiguousarray(codes.reshape(n, cols)), bits)
        scales[part], biases[part] = s.reshape(n, -1), b.reshape(n, -1)
    held = _exact_dtype((scales, biases), dtype)
    return {
        "w": mx.array(w),
        "scales": from_numpy(scales.astype(held)),
        "biases": from_numpy(biases.astype(held)),
        "group_size": GROUP,
        "bits": bits,
    }


def _exact_dtype(arrays: tuple[np.ndarray, ...], dtype: np.dtype) -> np.dtype:
    """The narrowest of (dtype if 16-bit, float16, float32) holding all exactly."""
    wanted = [dtype] if dtype.itemsize == 2 else []
    for cand in [*wanted, np.dtype(np.float16)]:
        with np.errstate(over="ignore"):
            if all(np.array_equal(a.astype(cand).astype(a.dtype), a) for a in arrays):
                return cand
    return np.dtype(np.float32)
