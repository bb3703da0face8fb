"""Packed weights decoded inside a jitted JAX step (GPU, TPU, CPU without a compiler).

The stage keeps a `Packed` matrix's bytes on the device and calls `matmul` in
its step: XLA fuses each decode into one kernel feeding the product (or into the
product itself where the backend can), so the float matrix exists at most as a
temporary of that step. Each GGUF format is one function from its blocks to
floats, vectorized over every block at once; the block layouts are gguf.quants',
and the float operations are the same, in the same order.

The result is bit-exact with `Packed.dequantize()` even where XLA contracts
scale * q + min into one multiply-add (XLA:CPU does): every product here is
exact in float32 (a float16 scale of 11 significant bits times codes and 6- or
8-bit sub-scales needs at most 23 bits). MLX matrices whose scales are stored
in float32 are the exception: they may differ in the last bit.

Every function takes `data` with any leading axes (rows, or ids gathered for an
embedding lookup): uint8 (..., cols / block_elems * block_bytes) for GGUF,
uint32 (..., cols * bits / 32) with scales/biases (..., cols / group) for MLX.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import DTypeLike

from cake.weights.packed import GGUF_FORMATS, gguf_block, parse_mlx_format

_HIGHEST = lax.Precision.HIGHEST  # no TF32 on GPUs: float32 means float32


def _planes(x: jax.Array, width: int) -> jax.Array:
    """uint8 (..., m) -> (..., 8 // width, m): plane k is bits [k*width, (k+1)*width)."""
    shifts = jnp.arange(0, 8, width, dtype=jnp.uint8)[:, None]
    return (x[..., None, :] >> shifts) & jnp.uint8((1 << width) - 1)


def _f16(b: jax.Array) -> jax.Array:
    """uint8 (..., 2), a little-endian float16 -> float32 (...)."""
    u = b[..., 0].astype(jnp.uint16) | (b[..., 1].astype(jnp.uint16) << 8)
    return lax.bitcast_convert_type(u, jnp.float16).astype(jnp.float32)


def _f(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)


# --- 32-element formats; b is (..., n_blocks, block_bytes) -> (..., n_blocks, 32)


def _q8_0(b: jax.Array) -> jax.Array:
    # d f16 | qs int8[32]
    return (
        _f(lax.bitcast_convert_type(b[..., 2:], jnp.int8))
        * _f16(b[..., 0:2])[..., None]
    )


def _nibbles(qs: jax.Array) -> jax.Array:
    # (..., 16) -> (..., 32): low nibbles are elements 0..15, high ones 16..31
    return _planes(qs, 4).reshape(*qs.shape[:-1], 32)


def _high_bits(qh: jax.Array) -> jax.Array:
    # (..., 4), a little-endian uint32 whose bit i belongs to element i -> (..., 32)
    return jnp.swapaxes(_planes(qh, 1), -1, -2).reshape(*qh.shape[:-1], 32)


def _q4_0(b: jax.Array) -> jax.Array:
    # d f16 | qs nibbles[16]
    q = _nibbles(b[..., 2:]).astype(jnp.int8) - jnp.int8(8)
    return _f16(b[..., 0:2])[..., None] * _f(q)


def _q4_1(b: jax.Array) -> jax.Array:
    # d f16 | m f16 | qs nibbles[16]
    d, m = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
    return d * _f(_nibbles(b[..., 4:])) + m


def _q5_0(b: jax.Array) -> jax.Array:
    # d f16 | qh u32 | qs nibbles[16]
    q = _nibbles(b[..., 6:]) | (_high_bits(b[..., 2:6]) << 4)
    return _f16(b[..., 0:2])[..., None] * _f(q.astype(jnp.int8) - jnp.int8(16))


def _q5_1(b: jax.Array) -> jax.Array:
    # d f16 | m f16 | qh u32 | qs nibbles[16]
    d, m = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
    q = _nibbles(b[..., 8:]) | (_high_bits(b[..., 4:8]) << 4)
    return d * _f(q) + m


# --- K-quants: 256 elements in sub-blocks; b (..., n_blocks, block_bytes) ->
# (..., n_blocks, sub-blocks, sub-block elements)


def _q2_k(b: jax.Array) -> jax.Array:
    # scales u8[16] (low nibble scale, high nibble min) | qs 2-bit[64] | d f16 | dmin f16
    lead = b.shape[:-1]
    scales = b[..., 0:16]
    d, dmin = _f16(b[..., 80:82])[..., None], _f16(b[..., 82:84])[..., None]
    dl = (d * _f(scales & 0xF))[..., None]  # (..., 16, 1)
    ml = (dmin * _f(scales >> 4))[..., None]
    # qs (..., 2 halves, 32): half h, plane k, byte i is element 128h + 32k + i
    q = _planes(b[..., 16:80].reshape(*lead, 2, 32), 2).reshape(*lead, 16, 16)
    return dl * _f(q) - ml


def _q3_k(b: jax.Array) -> jax.Array:
    # hmask u8[32] | qs 2-bit[64] | scales 6-bit[16] in 12 bytes | d f16
    lead = b.shape[:-1]
    low = _planes(b[..., 96:104], 4).reshape(*lead, 16)  # bits 0..3 of each scale
    high = _planes(b[..., 104:108], 2).reshape(*lead, 16)  # bits 4..5
    scales = _f((low | (high << 4)).astype(jnp.int8) - jnp.int8(32))
    dl = (_f16(b[..., 108:110])[..., None] * scales)[..., None]  # (..., 16, 1)
    ql = _planes(b[..., 32:96].reshape(*lead, 2, 32), 2).reshape(*lead, 16, 16)
    # hmask bit k of byte i belongs to element 32k + i; a clear bit subtracts 4
    qh = _planes(b[..., 0:32], 1).reshape(*lead, 16, 16) ^ jnp.uint8(1)
    q = ql.astype(jnp.int8) - (qh << 2).astype(jnp.int8)
    return dl * _f(q)


def _k_scale_min(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The 8 6-bit scales and mins of Q4_K/Q5_K: uint8 (..., 12) -> 2 x (..., 8)."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = jnp.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = jnp.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _k_affine(b: jax.Array, q: jax.Array) -> jax.Array:
    # Q4_K/Q5_K: d f16 | dmin f16 | scales[12] ...; q (..., 8, 32) uint8
    sc, mn = _k_scale_min(b[..., 4:16])
    d = (_f16(b[..., 0:2])[..., None] * _f(sc))[..., None]  # (..., 8, 1)
    dm = (_f16(b[..., 2:4])[..., None] * _f(mn))[..., None]
    return d * _f(q) - dm


def _k_nibbles(qs: jax.Array) -> jax.Array:
    # (..., 128) -> (..., 8, 32): 4 runs of 32 bytes, low nibbles then high ones
    lead = qs.shape[:-1]
    return _planes(qs.reshape(*lead, 4, 32), 4).reshape(*lead, 8, 32)


def _q4_k(b: jax.Array) -> jax.Array:
    # d | dmin | scales[12] | qs nibbles[128]
    return _k_affine(b, _k_nibbles(b[..., 16:144]))


def _q5_k(b: jax.Array) -> jax.Array:
    # d | dmin | scales[12] | qh u8[32] | qs nibbles[128]; qh bit k -> sub-block k
    qh = _planes(b[..., 16:48], 1)  # (..., 8, 32)
    return _k_affine(b, _k_nibbles(b[..., 48:176]) | (qh << 4))


def _q6_k(b: jax.Array) -> jax.Array:
    # ql nibbles[128] | qh 2-bit[64] | scales int8[16] | d f16
    lead = b.shape[:-1]
    # half h of 128 elements: ql bytes 64h.. (plane k -> elements 64k + i), qh
    # bytes 32h.. (plane k -> elements 32k + i)
    ql = _planes(b[..., 0:128].reshape(*lead, 2, 64), 4).reshape(*lead, 8, 32)
    qh = _planes(b[..., 128:192].reshape(*lead, 2, 32), 2).reshape(*lead, 8, 32)
    q = (ql | (qh << 4)).astype(jnp.int8) - jnp.int8(32)
    scales = _f(lax.bitcast_convert_type(b[..., 192:208], jnp.int8))
    d = (_f16(b[..., 208:210])[..., None] * scales)[..., None]  # (..., 16, 1)
    return d * _f(q.reshape(*lead, 16, 16))


_GGUF: dict[str, Callable[[jax.Array], jax.Array]] = {
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


# --- MLX affine


def _mlx_codes(data: jax.Array, bits: int) -> jax.Array:
    """uint32 (..., cols * bits / 32), a little-endian bit stream -> codes (..., cols)."""
    lead, mask = data.shape[:-1], jnp.uint32((1 << bits) - 1)
    if 32 % bits == 0:  # 2, 4, 8: whole codes per word, the first in the low bits
        shifts = jnp.arange(0, 32, bits, dtype=jnp.uint32)
        return ((data[..., None] >> shifts) & mask).reshape(*lead, -1)
    # 3, 5, 6: every 32 codes fill `bits` words; code j starts at bit j * bits of
    # its run and may spill into the next word
    words = data.reshape(*lead, -1, bits)
    start = np.arange(32) * bits
    first, shift = start // 32, start % 32
    spills = shift + bits > 32
    low = words[..., first] >> jnp.asarray(shift, jnp.uint32)
    nxt = words[..., np.minimum(first + 1, bits - 1)]
    high = jnp.where(spills, nxt << jnp.asarray((32 - shift) % 32, jnp.uint32), 0)
    return ((low | high) & mask).reshape(*lead, -1)


def _mlx(data: jax.Array, bits: int, group: int, scales, biases) -> jax.Array:
    q = _mlx_codes(data, bits)
    q = _f(q).reshape(*q.shape[:-1], -1, group)  # (..., cols / group, group)
    return q * _f(scales)[..., None] + _f(biases)[..., None]


def dequantize(
    data: jax.Array,
    fmt: str,
    cols: int,
    dtype: DTypeLike = jnp.float32,
    scales: jax.Array | None = None,
    biases: jax.Array | None = None,
) -> jax.Array:
    """The float matrix (..., cols) that packed `data` stands for, in `dtype`.

    `fmt` is a `Packed.format` (a GGUF type name or `MLX{bits}G{group}`); `fmt`,
    `cols` and `dtype` must be static under `jax.jit`. The decode is float32,
    bit-exact with `Packed.dequantize()`, then rounded once to `dtype`.
    """
    lead = data.shape[:-1]
    if fmt not in _GGUF and not fmt.startswith("MLX"):
        raise ValueError(
            f"no JAX decode for {fmt!r}: formats are {GGUF_FORMATS} and MLX"
        )
    if fmt.startswith("MLX"):
        bits, group = parse_mlx_format(fmt)
        w = _mlx(data, bits, group, scales, biases)
    else:
        _, nbytes = gguf_block(fmt)
        w = _GGUF[fmt](data.reshape(*lead, -1, nbytes))
    return w.reshape(*lead, cols).astype(dtype)


def matmul(
    x: jax.Array,
    data: jax.Array,
    fmt: str,
    cols: int,
    scales: jax.Array | None = None,
    biases: jax.Array | None = None,
    compute_dtype: DTypeLike | None = None,
) -> jax.Array:
    """x (..., K=cols) @ W.T -> (..., N) float32, W (N, K) the packed `data` (2-D).

    W is decoded to `compute_dtype` (default: x's dtype, so a bfloat16 or
    float16 x multiplies at that width, as on GPUs) and the products accumulate
    in float32; a float32 product runs at full precision (no TF32).
    """
    dt = jnp.dtype(compute_dtype or x.dtype)
    w = dequantize(data, fmt, cols, dt, scales, biases)  # (N, K)
    dims = (((x.ndim - 1,), (1,)), ((), ()))
    precision = _HIGHEST if dt == jnp.float32 else None
    return lax.dot_general(
        x.astype(dt), w, dims, precision=precision, preferred_element_type=jnp.float32
    )
