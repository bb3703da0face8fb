"""A Llama-style decoder layer as one XLA CPU custom call (src/layer.cc).

    h   = x + attention(rms(x) * ln1 @ Wqkv) @ Wo
    out = h + swiglu(rms(h) * ln2 @ Wgu) @ Wd

It makes the library calls the layer makes one custom call each
(backends/jax/llama.py on the CPU kernel path: `cake.kernels.cpu.matmul` with
its prologues and residuals, `attention.attention`), in the same order, so its
output and cache are the same bits. What it saves is XLA's bookkeeping: each
custom call of a compiled step keeps ~15 KB resident and costs a dispatch, and
a SmolLM2 decode step had 134 of them and 14 concatenates (5.5-7 MB a compiled
step); one call per layer leaves 30.

`wqkv` is up to 3 weights whose outputs concatenate to q|k|v (parts of
different formats), `wgu` up to 2 for gate|up; each weight is (data, fmt) as
`cake.kernels.cpu.matmul` takes it. The cache result aliases `cache`: donate it.

`hold` registers a layer's weights with the library under a key, and
`layer_held` is the same call naming the key instead of passing them: a
compiled step then has no weight parameters. Each parameter of an XLA CPU
executable keeps ~6 KB resident per compiled step (9 a layer); a stage keeps
its weights as they are and the library only their addresses (the stage's
arrays must outlive the key: `release` it first).
"""

from __future__ import annotations

import ctypes
import itertools
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _check_weights, _load, _require, register_ffi
from . import attention as _attention

__all__ = [
    "MAX_QKV_PARTS",
    "MAX_GU_PARTS",
    "Held",
    "available",
    "hold",
    "layer",
    "layer_held",
    "release",
]

MAX_QKV_PARTS, MAX_GU_PARTS = 3, 2


def available() -> bool:
    """Whether the kernel library holds the layer handlers (both forms)."""
    lib = _load()
    return lib is not None and all(
        hasattr(lib.raw, s) for s in ("cake_ffi_layer", "cake_ffi_layer_held")
    )


def _register_jax() -> None:
    register_ffi(("layer", "layer_held"), "the XLA FFI layer handlers")


@dataclass(frozen=True)
class Held:
    """A layer's weights held by the library: the key a step names, and what
    its calls are checked against at trace time."""

    key: int
    d: int  # the layer's width D
    qkv: int  # columns of q|k|v
    gu: int  # columns of gate|up


# Keys count up from 1 in the order layers are held, so that a process that
# loads the same stage gives its steps the same keys (and the same HLO: JAX's
# persistent compilation cache finds them); a key is never reused.
_keys = itertools.count(1)
_keys_lock = threading.Lock()
_arrays: dict[int, tuple[Any, ...]] = {}  # what each key's addresses belong to


def _address(a: Any) -> int:
    """The address of a's data, without a copy (a CPU jax.Array or a NumPy array)."""
    if isinstance(a, np.ndarray):
        if not a.flags.c_contiguous:
            raise ValueError("held weights must be C-contiguous")
        return a.ctypes.data
    return a.unsafe_buffer_pointer()


def hold(
    *,
    ln1: Any,
    ln2: Any,
    wqkv: tuple[tuple[Any, str], ...],
    wo: tuple[Any, str],
    wgu: tuple[tuple[Any, str], ...],
    wd: tuple[Any, str],
    attn_cols: int,
) -> Held:
    """Register a layer's weights (arguments as `layer`'s; attn_cols: the
    attention output's width nh * hd, wo's K); the library keeps their
    addresses and this module a reference to each array until `release`.
    Shapes and formats are checked here (ValueError)."""
    lib = _require()
    d = int(ln1.shape[0])
    qkv, gu = _check_layer(d, attn_cols, ln1, ln2, wqkv, wo, wgu, wd)
    for name, v in (("ln1", ln1), ("ln2", ln2)):
        if np.dtype(v.dtype) != np.float32:
            raise ValueError(f"{name} must be float32 (D,) = {(d,)}")
    parts = [*wqkv, *[None] * (MAX_QKV_PARTS - len(wqkv)), wo]
    parts += [*wgu, *[None] * (MAX_GU_PARTS - len(wgu)), wd]
    codes = (ctypes.c_int * len(parts))(*(lib.code(p[1]) if p else -1 for p in parts))
    data = (ctypes.c_void_p * len(parts))(
        *(_address(p[0]) if p else None for p in parts)
    )
    ns = (ctypes.c_int64 * len(parts))(*(p[0].shape[0] if p else 0 for p in parts))
    with _keys_lock:
        key = next(_keys)
        rc = lib.raw.cake_layer_hold(
            ctypes.c_int64(key),
            ctypes.c_void_p(_address(ln1)),
            ctypes.c_void_p(_address(ln2)),
            ctypes.c_int64(d),
            codes,
            data,
            ns,
        )
        if rc != 0:
            raise ValueError(
                f"the kernel library refused the layer's weights (code {rc})"
            )
        _arrays[key] = (ln1, ln2, *(p[0] for p in parts if p))
    return Held(key, d, qkv, gu)


def release(key: int) -> None:
    """Forget what `key` held (a step naming it fails from now on); unknown: nothing."""
    lib = _load()
    with _keys_lock:
        if lib is not None:
            lib.raw.cake_layer_release(ctypes.c_int64(key))
        _arrays.pop(key, None)


def _widths(parts: tuple[tuple[Any, str], ...], k: int, what: str, most: int) -> int:
    if not 1 <= len(parts) <= most:
        raise ValueError(f"{what} must be 1 to {most} weights; got {len(parts)}")
    for _, fmt in parts:
        _require().code(fmt)
    return sum(_check_weights(d.shape, d.dtype, f, k) for d, f in parts)


def _check_layer(d, attn_cols, ln1, ln2, wqkv, wo, wgu, wd) -> tuple[int, int]:
    """(q|k|v columns, gate|up columns) of a layer of width d whose attention
    output is attn_cols wide, or a one-line ValueError."""
    qkv = _widths(wqkv, d, "wqkv", MAX_QKV_PARTS)
    if _check_weights(wo[0].shape, wo[0].dtype, wo[1], attn_cols) != d:
        raise ValueError(f"wo must have D={d} rows")
    gu = _widths(wgu, d, "wgu", MAX_GU_PARTS)
    if gu % 2 or _check_weights(wd[0].shape, wd[0].dtype, wd[1], gu // 2) != d:
        raise ValueError(f"wd must be (D={d}, I) for gate|up of 2 I={gu}")
    for name, v in (("ln1", ln1), ("ln2", ln2)):
        if tuple(v.shape) != (d,):
            raise ValueError(f"{name} must be (D,) = {(d,)}; got {tuple(v.shape)}")
    return qkv, gu


def layer(
    x: Any,
    cos: Any,
    sin: Any,
    cache: Any,
    slots: Any,
    positions: Any,
    lengths: Any,
    *,
    ln1: Any,
    ln2: Any,
    wqkv: tuple[tuple[Any, str], ...],
    wo: tuple[Any, str],
    wgu: tuple[tuple[Any, str], ...],
    wd: tuple[Any, str],
    n_heads: int,
    layer: int,
    eps: float,
    window: int = 0,
    scale: float | None = None,
    softcap: float = 0.0,
) -> tuple[Any, Any]:
    """(out float32 (B, L, D), the updated cache), jit-able. Shapes, formats and
    the attention's static arguments are checked here (ValueError)."""
    import jax
    import jax.numpy as jnp

    _register_jax()
    b, n, d = x.shape
    hd = cache.shape[-1]
    ints = [jnp.asarray(a, jnp.int32) for a in (slots, positions, lengths)]
    qkv_cols = _widths(wqkv, d, "wqkv", MAX_QKV_PARTS)
    scale = _attention._scale(hd, scale)
    qkv = jax.ShapeDtypeStruct((b, n, qkv_cols), jnp.float32)
    _attention._check_static(
        qkv, cos, sin, cache, ints, n_heads, layer, window, scale, softcap
    )
    _check_layer(d, n_heads * hd, ln1, ln2, wqkv, wo, wgu, wd)
    none = jnp.zeros((0,), jnp.uint8)
    qkv_ws = [w for w, _ in wqkv] + [none] * (MAX_QKV_PARTS - len(wqkv))
    gu_ws = [w for w, _ in wgu] + [none] * (MAX_GU_PARTS - len(wgu))
    fmts = [f for _, f in wqkv] + [""] * (MAX_QKV_PARTS - len(wqkv)) + [wo[1]]
    fmts += [f for _, f in wgu] + [""] * (MAX_GU_PARTS - len(wgu)) + [wd[1]]
    f32 = jnp.float32
    weights = (
        jnp.asarray(ln1, f32),
        jnp.asarray(ln2, f32),
        *qkv_ws,
        wo[0],
        *gu_ws,
        wd[0],
    )
    return _call(
        "cake_cpu_layer", x, cos, sin, cache, ints, weights,
        fmts=",".join(fmts), layer=layer, window=window, scale=scale,
        softcap=softcap, eps=eps,
    )  # fmt: skip


def layer_held(
    x: Any,
    cos: Any,
    sin: Any,
    cache: Any,
    slots: Any,
    positions: Any,
    lengths: Any,
    *,
    weights: Held,
    n_heads: int,
    layer: int,
    eps: float,
    window: int = 0,
    scale: float | None = None,
    softcap: float = 0.0,
) -> tuple[Any, Any]:
    """`layer` with the weights `hold` registered: (out, the updated cache),
    jit-able; the same bits. Shapes and static arguments are checked here
    (ValueError); a key released before the step runs fails the step."""
    import jax
    import jax.numpy as jnp

    _register_jax()
    b, n, d = x.shape
    if d != weights.d:
        raise ValueError(f"x must be (B, L, D={weights.d}); got {tuple(x.shape)}")
    hd = cache.shape[-1]
    ints = [jnp.asarray(a, jnp.int32) for a in (slots, positions, lengths)]
    scale = _attention._scale(hd, scale)
    qkv = jax.ShapeDtypeStruct((b, n, weights.qkv), jnp.float32)
    _attention._check_static(
        qkv, cos, sin, cache, ints, n_heads, layer, window, scale, softcap
    )
    return _call(
        "cake_cpu_layer_held", x, cos, sin, cache, ints, (),
        weights=np.int64(weights.key), layer=layer, window=window, scale=scale,
        softcap=softcap, eps=eps,
    )  # fmt: skip


def _call(
    target: str, x, cos, sin, cache, ints, operands: tuple, *, layer: int,
    window: int, scale: float, softcap: float, eps: float, **attrs,
) -> tuple[Any, Any]:  # fmt: skip
    """The custom call `target` of both forms: (out (B, L, D), the cache), the
    cache result aliasing `cache`; `operands` (the weights) after the ints."""
    import jax
    import jax.numpy as jnp

    f32 = jnp.float32
    call = jax.ffi.ffi_call(
        target,
        (
            jax.ShapeDtypeStruct(x.shape, f32),
            jax.ShapeDtypeStruct(cache.shape, cache.dtype),
        ),
        input_output_aliases={3: 1},
        vmap_method="sequential",
    )
    return call(
        jnp.asarray(x, f32),
        jnp.asarray(cos, f32),
        jnp.asarray(sin, f32),
        cache,
        *ints,
        *operands,
        **attrs,
        layer=np.int64(layer),
        window=np.int64(window),
        scale=np.float32(scale),
        softcap=np.float32(softcap),
        eps=np.float32(eps),
    )
