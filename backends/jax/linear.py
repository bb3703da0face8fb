"""Linear weights of a JAX stage as stored, and the products over them.

A weight is either a float matrix laid out for `x @ W` (K, N), which XLA
multiplies natively (float32 on the CPU; any float on GPUs/TPUs), or a
`QMat` (N, ...) in the checkpoint's own format (GGUF blocks, MLX
affine, or 16-bit floats on the CPU; float32 too where the CPU kernels are
built) that is never widened in memory:

* on the CPU, `cake.kernels.cpu` multiplies the packed rows directly (XLA FFI
  custom calls from the jitted step; activations quantized per block for the
  integer formats, as llama.cpp does);
* elsewhere, or where no compiler built those kernels, `cake.kernels.jax`
  decodes the blocks inside the jitted step, where XLA can fuse the decode
  into the product.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from jax import lax

_HIGHEST = lax.Precision.HIGHEST  # no TF32 on GPUs: float32 means float32

# Up to this many rows of x the CPU kernels multiply the stored blocks; from
# there on (a long prefill) a product widens the matrix into a scratch buffer
# and lets XLA's float32 dot do the work. Block formats: at 128 rows the kernels
# took 0.8x XLA's time for the products alone (benchmarks/bench_kernels.py), and
# a 512-token SmolLM2 prefill in chunks of 128 ran at 1335-1443 tok/s against
# 868-936 in one widened chunk of 512 (Q4_1, Q8_0, Q4_K_M; 2026-12-02).
# 16-bit formats: every product goes to the kernels, whose panel GEMM
# (kernels/cpu/src/gemm16.cc) takes over from the dot kernels at 32 (BF16) /
# 24 (F16) rows. 30 SmolLM2 layers' products, 2 threads, ms (bench_kernels.py,
# one run): BF16 M = 512 panel 182-202 / widened for XLA 346 / dot kernels 378
# (XLA on float32 weights kept in memory: 291); F16 280-319 / 322 / 1016;
# BF16 M = 64 24-31 / 140 / 40. A 512-token BF16 prefill in one call:
# 2137-2363 tok/s against 1052-1202 widened, the F32 file 1591-1650
# (interleaved runs, 2026-12-03; llama.cpp: 1260). The kernels give
# each row the same result whatever the other rows (tests/test_kernels_cpu.py,
# test_kernels_gemm.py) as long as they are on the same side of the panel's
# threshold, so a token's numbers do not depend on the chunk it is fed in
# (a reused prefix, a busy server's chunks) beyond that.
KERNEL_ROWS = 128
KERNEL_ROWS_16BIT = 1 << 30  # all of them
# Float32 weights (F32: a float32 GGUF or safetensors matrix kept (N, K) as
# stored, never copied for XLA): the kernels (dot kernels, the panel GEMM from
# 24 rows) up to 128 rows, XLA's dot on the stored matrix past them. 30 SmolLM2
# layers' products, ms (bench_kernels.py, 2026-12-03, quietest run): M = 8
# dot 16.4 / XLA on (K, N) 16.4 / on (N, K) 25.1; M = 32 panel 33 / 28 / 38;
# M = 128 panel 78 / 74 / 76; M = 512 panel 325-363 / 281-293 / 283-299
# (busy runs: all three within noise of each other at 64-512).
KERNEL_ROWS_F32 = 128


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QMat:
    """A (rows, cols) matrix as stored (see cake.weights.packed.Packed), on the device.

    data: GGUF uint8 (rows, row_bytes); MLX uint32 (rows, cols*bits/32) with
    scales/biases (rows, cols/group); F16/BF16 (rows, cols) in that dtype.
    `kernel`: multiplied by the CPU kernels (else decoded by cake.kernels.jax);
    then `fmt` may be a repacked form (e.g. Q8_0R8, see params.py), which only
    the CPU kernels read (take_rows decodes its tiles through them).
    """

    data: jax.Array
    scales: jax.Array | None = None
    biases: jax.Array | None = None
    fmt: str = field(default="", metadata={"static": True})
    cols: int = field(default=0, metadata={"static": True})
    kernel: bool = field(default=False, metadata={"static": True})


Weight = jax.Array | QMat


def cpu_kernel_formats() -> frozenset[str]:
    """Formats the CPU kernels multiply here; empty when they could not be built
    or CAKE_CPU_KERNELS=0 turns them off (to measure the fallback)."""
    if os.environ.get("CAKE_CPU_KERNELS", "1") == "0":
        return frozenset()
    try:
        from cake.kernels import cpu
    except ImportError as e:  # pragma: no cover - the package ships with cake
        print(f"cake: CPU kernels unavailable ({e})", file=sys.stderr)
        return frozenset()
    return frozenset(cpu.FORMATS) if cpu.available() else frozenset()


def rms(x: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) over the last axis; the weight is applied elsewhere."""
    return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def prologue_of(
    x: jax.Array, prologue: str | None, norm: jax.Array | None, eps: float
) -> jax.Array:
    """What `mm` multiplies: x itself, `norm * rms(x, eps)` ("rms"), or
    silu(x's first half) * its second half ("swiglu"), as the CPU kernels'
    prologues (cake.kernels.cpu.PROLOGUES) compute it."""
    if prologue == "rms":
        return norm * rms(x, eps)
    if prologue == "swiglu":
        gate, up = jnp.split(x, 2, axis=-1)
        return jax.nn.silu(gate) * up
    return x


def mm(
    x: jax.Array,
    w: Weight,
    *,
    prologue: str | None = None,
    norm: jax.Array | None = None,
    eps: float = 0.0,
    residual: jax.Array | None = None,
) -> jax.Array:
    """`residual + prologue(x) @ W` -> (..., N) float32, W in its stored form.

    prologue/norm/eps: see `prologue_of`; residual (..., N) or None. The CPU
    kernels fold both into the product's one call (a decode step's layer is then
    five library calls, not tens of XLA ops, and a llama layer's five go into
    one custom call: cake.kernels.cpu.layer); elsewhere XLA fuses them.
    """
    if by_kernel(x, w):
        from cake.kernels import cpu

        return cpu.matmul(
            x.astype(jnp.float32),
            w.data,
            w.fmt,
            w.cols,
            prologue=prologue,
            norm=norm,
            eps=eps,
            residual=residual,
        )
    y = _product(prologue_of(x, prologue, norm, eps), w)
    return y if residual is None else residual + y


def by_kernel(x: jax.Array, w: Weight) -> bool:
    """Whether `mm` multiplies x by w in one CPU kernel call (prologue included)."""
    return (
        isinstance(w, QMat)
        and w.kernel
        and math.prod(x.shape[:-1]) <= kernel_rows(w.fmt)
    )


def kernel_rows(fmt: str) -> int:
    """The most rows of x the CPU kernels multiply by weights in `fmt` (KERNEL_ROWS)."""
    if fmt == "F32":
        return KERNEL_ROWS_F32
    return KERNEL_ROWS_16BIT if fmt in _ALL_ROWS else KERNEL_ROWS


# Formats whose every product goes to the kernels: the 16-bit ones, and the
# float tiles (F16P, BF16P, F32P: only the kernels read them; their GEMM runs
# from the stored tiles at any M, no panel packed per call).
_ALL_ROWS = frozenset({"F16", "BF16", "F16P", "BF16P", "F32P"})


# A matrix that has to be widened to float32 for XLA's dot (a long prefill
# through the kernels; every product where XLA ops decode the blocks: no
# compiler, GPUs) is widened and multiplied in parts of at most this many
# float32 bytes, each part after the one before (see _after), so a step's
# scratch holds one part, not the matrix: SmolLM2's tied head was 113 MB
# widened whole, a 70B model's 4.2 GB, one of its MLP matrices 0.94 GB.
# Parts of 16 MB (4096 of SmolLM2's head rows) keep the dot's panels large.
WIDEN_BYTES = 16 << 20
_PART_ROWS = 256  # parts start on whole tiles of the repacked formats


def _product(x: jax.Array, w: Weight) -> jax.Array:
    """x (..., K) float32 @ W -> (..., N) float32, W in its stored form."""
    if isinstance(w, QMat):
        if w.fmt == "F32":  # (N, K) as stored: XLA's dot reads it as it is
            return jnp.dot(x, w.data.T, precision=_HIGHEST)
        rows = w.data.shape[0]
        part = max(_PART_ROWS, WIDEN_BYTES // (4 * w.cols) // _PART_ROWS * _PART_ROWS)
        outs, prev = [], x
        for r in range(0, rows, part):
            piece = QMat(
                *(
                    None if a is None else a[r : r + part]
                    for a in (w.data, w.scales, w.biases)
                ),
                fmt=w.fmt,
                cols=w.cols,
                kernel=w.kernel,
            )
            prev = _widened_product(x, piece, prev)
            outs.append(prev)
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)
    if w.dtype == jnp.float32:
        return jnp.dot(x, w, precision=_HIGHEST)
    return jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def _widened_product(x: jax.Array, w: QMat, after: jax.Array) -> jax.Array:
    """x @ W for a stored matrix widened to float32 once `after` exists."""
    if w.kernel:  # a long prefill: the kernels widen, XLA's dot multiplies
        from cake.kernels import cpu

        full = cpu.dequantize(w.data, w.fmt, w.cols, after=after)  # (N, K) float32
        return jnp.dot(x, full.T, precision=_HIGHEST)
    if w.fmt in ("F16", "BF16"):  # widened inside the product only
        full = _after(w.data, after).astype(jnp.float32)
        return jnp.dot(x, full.T, precision=_HIGHEST)
    from cake.kernels import jax as jk

    return jk.matmul(x, _after(w.data, after), w.fmt, w.cols, w.scales, w.biases)


def _after(data: jax.Array, x: jax.Array) -> jax.Array:
    """`data` itself, as a value XLA can compute only once `x` exists.

    A matrix that XLA ops decode depends on the weights alone, and XLA:CPU's
    scheduler (ordered for concurrency) then widened every layer's matrices at
    the step's start and held them all: a SmolLM2 Q4_1 step without the
    kernels took 538 MB of scratch against a 97 MB file, 113 MB (the tied
    head's one matrix) with this edge, and a step took 132-137 ms instead of
    192-223, a 512-token prefill 388-432 tok/s instead of 318-345 (2 cores,
    2026-12-06; GPUs not measured). An OR with a zero XLA cannot prove
    zero (the low bit of x's first element, min'ed with 0) costs one integer
    op per packed element, fused into the decode; tests/test_jax_memory.py
    checks the scratch, so a simplifier that sees through it shows there."""
    bit = lax.bitcast_convert_type(x.reshape(-1)[0].astype(jnp.float32), jnp.int32) & 1
    if jnp.issubdtype(data.dtype, jnp.floating):  # 16-bit floats: on their bits
        bits = jnp.dtype(f"uint{data.dtype.itemsize * 8}")
        raw = lax.bitcast_convert_type(data, bits)
        return lax.bitcast_convert_type(
            raw | jnp.minimum(bit, 0).astype(bits), data.dtype
        )
    return data | jnp.minimum(bit, 0).astype(data.dtype)


def mm_cat(
    x: jax.Array,
    ws: tuple[Weight, ...],
    *,
    prologue: str | None = None,
    norm: jax.Array | None = None,
    eps: float = 0.0,
) -> jax.Array:
    """prologue(x) @ [W0 | W1 | ...]: one product for a fused group, else one
    per part (parts of different formats), each kernel call applying the prologue
    itself (an RMS norm costs far less than the XLA ops sharing it would), or
    after one shared prologue elsewhere."""
    if len(ws) == 1 or all(by_kernel(x, w) for w in ws):
        pro = dict(prologue=prologue, norm=norm, eps=eps)
        outs = [mm(x, w, **pro) for w in ws]
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)
    x = prologue_of(x, prologue, norm, eps)
    return jnp.concatenate([mm(x, w) for w in ws], axis=-1)


def mm_expert(
    x: jax.Array, w: Weight, expert: jax.Array, *, prologue: str | None = None
) -> jax.Array:
    """`prologue(x) @ W[expert]` -> (..., N) float32, for a stack W of E matrices
    (params.stacked: a QMat of (E, N, ...) blocks, or a float (E, K, N)) and an
    int32 scalar `expert` known at run time only: the expert's matrix is sliced
    out and multiplied as `mm` multiplies one (the CPU kernels' stacks go
    through `mm_grouped` instead)."""
    if isinstance(w, QMat):
        pick = [
            None if a is None else lax.dynamic_index_in_dim(a, expert, keepdims=False)
            for a in (w.data, w.scales, w.biases)
        ]
        one: Weight = QMat(*pick, fmt=w.fmt, cols=w.cols, kernel=w.kernel)
    else:
        one = lax.dynamic_index_in_dim(w, expert, keepdims=False)
    return mm(x, one, prologue=prologue)


def by_grouped_kernel(w: Weight) -> bool:
    """Whether a stack of expert matrices goes through the CPU kernels' grouped
    product (`mm_grouped`)."""
    return isinstance(w, QMat) and w.kernel


def mm_grouped(
    x: jax.Array, w: QMat, counts: jax.Array, *, prologue: str | None = None
) -> jax.Array:
    """x (M, K)'s rows grouped by expert (counts (E,) of each, in order) times
    their expert's matrix of the stack w, in one CPU kernel call -> (M, N)."""
    from cake.kernels import cpu

    return cpu.matmul_grouped(x, w.data, counts, w.fmt, w.cols, prologue=prologue)


def _take_tiled_rows(table: QMat, flat: jax.Array) -> jax.Array:
    """Rows `flat` (M,) of a matrix repacked in tiles of 8 interleaved rows
    (kernels/cpu/src/repack.cc): each row's unit (its tile, or the pair of
    tiles stored as one, cpu.interleave) is taken whole and decoded by the CPU
    kernels, then the row picked out of it. (M, cols) float32."""
    from cake.kernels import cpu

    rows, row_bytes = table.data.shape
    unit = cpu.REPACK_ROWS * cpu.interleave(table.fmt)
    whole = rows // unit * unit  # rows in whole units; an odd last tile alone
    flat = jnp.clip(flat, 0, rows - 1)
    out = None
    if whole:
        units = table.data[:whole].reshape(whole // unit, -1)
        at = jnp.minimum(flat, whole - 1)
        picked = jnp.take(units, at // unit, axis=0).reshape(-1, row_bytes)
        full = cpu.dequantize(picked, table.fmt, table.cols).reshape(
            -1, unit, table.cols
        )
        out = full[jnp.arange(flat.shape[0]), at % unit]
    if whole < rows:  # the last tile, stored alone
        last = cpu.dequantize(table.data[whole:], table.fmt, table.cols)
        tail = last[jnp.maximum(flat - whole, 0)]
        out = tail if out is None else jnp.where((flat >= whole)[:, None], tail, out)
    return out


def _take_float_tile_rows(table: QMat, flat: jax.Array) -> jax.Array:
    """Rows `flat` (M,) of a float matrix stored in tiles of 32 rows
    (kernels/cpu/src/gemm16.cc: tile t = rows 32t .. 32t + 31, value k of
    row 32t + c at (k, c) of F16P / F32P, at (k // 2, c, k % 2) of BF16P's
    pairs), gathered element by element. (M, cols) float32."""
    from cake.kernels import cpu

    rows, cols = table.data.shape
    tile = cpu.TILE_ROWS[table.fmt]
    tiles = table.data.reshape(rows // tile, tile * cols)
    flat = jnp.clip(flat, 0, rows - 1)
    k = jnp.arange(cols)
    c = (flat % tile)[:, None]
    if table.fmt == "BF16P":
        inner = (k // 2) * (2 * tile) + 2 * c + k % 2
    else:
        inner = k * tile + c
    return tiles[(flat // tile)[:, None], inner].astype(jnp.float32)


def take_rows(table: Weight, ids: jax.Array, *, transposed: bool) -> jax.Array:
    """Embedding rows `ids` (B, L) as float32 (B, L, D).

    table: QMat (V, ...), or a float (V, D) matrix, or with `transposed` the
    head's (D, V) float matrix doubling as the embedding.
    """
    if isinstance(table, QMat):
        flat = ids.reshape(-1)
        if table.kernel and table.fmt.endswith("R8"):
            return _take_tiled_rows(table, flat).reshape(*ids.shape, table.cols)
        if table.kernel and table.fmt in ("F16P", "BF16P", "F32P"):
            return _take_float_tile_rows(table, flat).reshape(*ids.shape, table.cols)
        pick = [
            None if a is None else jnp.take(a, flat, axis=0, mode="clip")
            for a in (table.data, table.scales, table.biases)
        ]
        if table.fmt in ("F16", "BF16", "F32"):
            rows = pick[0].astype(jnp.float32)
        else:
            from cake.kernels import jax as jk

            rows = jk.dequantize(
                pick[0], table.fmt, table.cols, jnp.float32, pick[1], pick[2]
            )
        return rows.reshape(*ids.shape, table.cols)
    if transposed:
        return jnp.take(table, ids, axis=1, mode="clip").transpose(1, 2, 0)
    return jnp.take(table, ids, axis=0, mode="clip")
