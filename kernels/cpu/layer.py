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
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _check_weights, _load, _require, register_ffi
from . import attention as _attention

__all__ = ["MAX_QKV_PARTS", "MAX_GU_PARTS", "available", "layer"]

MAX_QKV_PARTS, MAX_GU_PARTS = 3, 2


def available() -> bool:
    """Whether the kernel library holds the layer handler."""
    lib = _load()
    return lib is not None and hasattr(lib.raw, "cake_ffi_layer")


def _register_jax() -> None:
    register_ffi(("layer",), "the XLA FFI layer handler")


def _widths(parts: tuple[tuple[Any, str], ...], k: int, what: str, most: int) -> int:
    if not 1 <= len(parts) <= most:
        raise ValueError(f"{what} must be 1 to {most} weights; got {len(parts)}")
    for _, fmt in parts:
        _require().code(fmt)
    return sum(_check_weights(d.shape, d.dtype, f, k) for d, f in parts)


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
    qkv_shape = (b, n, _widths(wqkv, d, "wqkv", MAX_QKV_PARTS))
    scale = _attention._scale(hd, scale)
    qkv = jax.ShapeDtypeStruct(qkv_shape, jnp.float32)
    _attention._check_static(
        qkv, cos, sin, cache, ints, n_heads, layer, window, scale, softcap
    )
    if _check_weights(wo[0].shape, wo[0].dtype, wo[1], n_heads * hd) != d:
        raise ValueError(f"wo must have D={d} rows")
    gu = _widths(wgu, d, "wgu", MAX_GU_PARTS)
    if gu % 2 or _check_weights(wd[0].shape, wd[0].dtype, wd[1], gu // 2) != d:
        raise ValueError(f"wd must be (D={d}, I) for gate|up of 2 I={gu}")
    for name, v in (("ln1", ln1), ("ln2", ln2)):
        if tuple(v.shape) != (d,):
            raise ValueError(f"{name} must be (D,) = {(d,)}; got {tuple(v.shape)}")
    none = jnp.zeros((0,), jnp.uint8)
    qkv_ws = [w for w, _ in wqkv] + [none] * (MAX_QKV_PARTS - len(wqkv))
    gu_ws = [w for w, _ in wgu] + [none] * (MAX_GU_PARTS - len(wgu))
    fmts = [f for _, f in wqkv] + [""] * (MAX_QKV_PARTS - len(wqkv)) + [wo[1]]
    fmts += [f for _, f in wgu] + [""] * (MAX_GU_PARTS - len(wgu)) + [wd[1]]
    call = jax.ffi.ffi_call(
        "cake_cpu_layer",
        (
            jax.ShapeDtypeStruct((b, n, d), jnp.float32),
            jax.ShapeDtypeStruct(cache.shape, cache.dtype),
        ),
        input_output_aliases={3: 1},
        vmap_method="sequential",
    )
    f32 = jnp.float32
    return call(
        jnp.asarray(x, f32),
        jnp.asarray(cos, f32),
        jnp.asarray(sin, f32),
        cache,
        *ints,
        jnp.asarray(ln1, f32),
        jnp.asarray(ln2, f32),
        *qkv_ws,
        wo[0],
        *gu_ws,
        wd[0],
        fmts=",".join(fmts),
        layer=np.int64(layer),
        window=np.int64(window),
        scale=np.float32(scale),
        softcap=np.float32(softcap),
        eps=np.float32(eps),
    )
