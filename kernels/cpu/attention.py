"""Fused causal attention over a KV cache kept in place (src/attention.cc).

One call per layer does what the JAX decode step does with rope, a cache
scatter, a gather of the batch's slots and softmax attention:

- `qkv` float32 `(B, L, (nh + 2 nkv) hd)`: the q heads, then the k heads, then
  the v heads of each token (each head hd contiguous values);
- `cos`, `sin` float32 `(B, L, hd / 2)`: the rotary tables at each token's
  position (HF rotate_half layout);
- `cache` float32, float16 or bfloat16 `(n_layers, 2, S, nkv, T, hd)`: [layer, k | v, slot, kv head,
  position, dim];
- `slots`, `positions`, `lengths` int32 `(B,)`: token l < lengths[b] of
  sequence b is at position positions[b] + l of cache slot slots[b]; rows
  l >= lengths[b] are padding (nothing written, zero output).

Every real token's rotated k and its v are written to the cache first; then
each query head j (rope(q) * scale, kv head j // (nh / nkv)) attends to the
slot's positions [lo, t], lo = max(0, t - window + 1) with a window (> 0),
else 0. `scale` defaults to 1 / sqrt(hd) (Gemma: query_pre_attn_scalar ** -0.5);
with `softcap` > 0 every score s becomes softcap * tanh(s / softcap) before the
softmax (Gemma 2). Output: float32 `(B, L, nh hd)`.

`attention_np` calls the kernel through ctypes and writes `cache` in place;
`attention` is the same kernel as an XLA CPU custom call (jit-able) whose cache
result aliases its cache operand: donate the cache to jit and no copy is made.
"""

from __future__ import annotations

import ctypes
from typing import Any

import ml_dtypes
import numpy as np

from . import KernelsUnavailable, _load, _require, register_ffi

__all__ = ["attention", "attention_np", "available"]

_ERRORS = {
    -1: "a size is not positive",
    -2: "nh is not a multiple of nkv",
    -3: "hd is odd",
    -4: "layer is out of range",
    -5: "window < 0",
    -6: "a length is outside [0, L]",
    -7: "a slot is out of range",
    -8: "a token's position is negative or past the cache (>= T)",
    -9: "scale is not positive or softcap is negative (or either is not finite)",
    -10: "the cache is not float32, float16 or bfloat16",
}


# the cache's element types, as the kernel's kv_type codes
KV_TYPES = {
    np.dtype(np.float32): 0,
    np.dtype(np.float16): 1,
    np.dtype(ml_dtypes.bfloat16): 2,
}


def available() -> bool:
    """Whether the kernel library is usable and holds the attention kernel."""
    lib = _load()
    return lib is not None and hasattr(lib.raw, "cake_attention")


def _dims(
    qkv_shape: tuple[int, ...], cache_shape: tuple[int, ...], n_heads: int
) -> tuple[int, int, int, int, int, int, int, int]:
    """(B, L, nh, nkv, hd, n_layers, S, T), or a one-line ValueError."""
    if len(cache_shape) != 6 or cache_shape[1] != 2:
        raise ValueError(
            f"cache must be (n_layers, 2, S, nkv, T, hd); got shape {tuple(cache_shape)}"
        )
    n_layers, _, s, nkv, t, hd = cache_shape
    if min(cache_shape) <= 0 or hd % 2:
        raise ValueError(
            f"cache must have positive sizes and an even hd; got shape {tuple(cache_shape)}"
        )
    if n_heads <= 0 or n_heads % nkv:
        raise ValueError(
            f"n_heads must be a positive multiple of nkv={nkv}; got {n_heads}"
        )
    width = (n_heads + 2 * nkv) * hd
    if len(qkv_shape) != 3 or qkv_shape[2] != width:
        raise ValueError(
            f"qkv must be (B, L, (nh + 2 nkv) hd = {width}); got shape {tuple(qkv_shape)}"
        )
    b, n = qkv_shape[:2]
    return b, n, n_heads, nkv, hd, n_layers, s, t


def _check_static(
    qkv: Any,
    cos: Any,
    sin: Any,
    cache: Any,
    ints: list[Any],
    n_heads: int,
    layer: int,
    window: int,
    scale: float,
    softcap: float,
) -> tuple[int, ...]:
    dims = _dims(tuple(qkv.shape), tuple(cache.shape), n_heads)
    b, n, _, _, hd, n_layers = dims[:6]
    for name, a in (("cos", cos), ("sin", sin)):
        if tuple(a.shape) != (b, n, hd // 2):
            raise ValueError(
                f"{name} must be (B, L, hd / 2) = {(b, n, hd // 2)}; got shape {tuple(a.shape)}"
            )
    for name, a in zip(("slots", "positions", "lengths"), ints, strict=True):
        if tuple(a.shape) != (b,) or np.dtype(a.dtype).kind not in "iu":
            raise ValueError(
                f"{name} must be integers of shape (B,) = {(b,)}; got {np.dtype(a.dtype)} {tuple(a.shape)}"
            )
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer must be in [0, {n_layers}); got {layer}")
    if window < 0:
        raise ValueError(f"window must be >= 0 (0: none); got {window}")
    if not (0 < scale < np.inf):
        raise ValueError(f"scale must be a positive finite number; got {scale}")
    if not (0 <= softcap < np.inf):
        raise ValueError(f"softcap must be >= 0 (0: none) and finite; got {softcap}")
    return dims


def _scale(hd: int, scale: float | None) -> np.float32:
    """The query scale as the kernel takes it: float32 of 1 / sqrt(hd) unless given."""
    return np.float32(1.0 / np.sqrt(hd) if scale is None else scale)


def _check_values(
    slots: np.ndarray, positions: np.ndarray, lengths: np.ndarray, dims: tuple[int, ...]
) -> None:
    _, n, _, _, _, _, s, t = dims
    sl, pl, ll = slots.tolist(), positions.tolist(), lengths.tolist()
    for slot, pos, length in zip(sl, pl, ll, strict=True):
        if not 0 <= length <= n:
            raise ValueError(f"lengths must be in [0, L={n}]; got {ll}")
        if length == 0:  # a sequence with no token reads nothing: any slot / position
            continue
        if not 0 <= slot < s:
            raise ValueError(f"slots must be in [0, S={s}); got {sl}")
        if pos < 0 or pos + length > t:
            raise ValueError(
                f"every token's position must be in [0, T={t}): positions {pl}, lengths {ll}"
            )


def _what(a: Any) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} {a.shape}"
    return type(a).__name__


def _float32(name: str, a: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 NumPy array (a copy if `a` is not contiguous)."""
    if not isinstance(a, np.ndarray) or a.dtype != np.float32:
        raise ValueError(f"{name} must be a float32 NumPy array; got {_what(a)}")
    return np.ascontiguousarray(a)


def _int32(a: np.ndarray) -> np.ndarray:
    if a.dtype != np.int32:
        if a.size and (a.min() < -(2**31) or a.max() >= 2**31):
            raise ValueError(f"int32 values expected; got {a.tolist()}")
        a = a.astype(np.int32)
    return np.ascontiguousarray(a)


def _call(
    raw: ctypes.CDLL,
    qkv: np.ndarray,
    cos: np.ndarray,
    sin: np.ndarray,
    cache: np.ndarray,
    slots: Any,
    positions: Any,
    lengths: Any,
    *,
    n_heads: int,
    layer: int,
    window: int = 0,
    scale: float | None = None,
    softcap: float = 0.0,
) -> np.ndarray:
    """attention_np on one loaded library (`raw`: its ctypes CDLL)."""
    if not isinstance(cache, np.ndarray) or cache.dtype not in KV_TYPES:
        raise ValueError(
            f"cache must be a float32, float16 or bfloat16 NumPy array; got {_what(cache)}"
        )
    if not cache.flags.c_contiguous or not cache.flags.writeable:
        raise ValueError(
            "cache must be C-contiguous and writeable (it is updated in place)"
        )
    qkv, cos, sin = _float32("qkv", qkv), _float32("cos", cos), _float32("sin", sin)
    ints = [np.asarray(a) for a in (slots, positions, lengths)]
    scale = _scale(cache.shape[-1], scale)
    dims = _check_static(
        qkv, cos, sin, cache, ints, n_heads, layer, window, scale, softcap
    )
    slots, positions, lengths = (_int32(a) for a in ints)
    _check_values(slots, positions, lengths, dims)
    b, n, nh, nkv, hd, n_layers, s, t = dims
    out = np.empty((b, n, nh * hd), np.float32)
    fn = raw.cake_attention
    if fn.argtypes is None:
        fn.argtypes = (
            [ctypes.c_void_p] * 4
            + [ctypes.c_int]
            + [ctypes.c_void_p] * 3
            + [ctypes.c_int64] * 10
            + [ctypes.c_float] * 2
            + [ctypes.c_void_p]
        )
        fn.restype = ctypes.c_int
    rc = fn(
        *(a.ctypes.data for a in (qkv, cos, sin, cache)),
        KV_TYPES[cache.dtype],
        *(a.ctypes.data for a in (slots, positions, lengths)),
        *(b, n, nh, nkv, hd, n_layers, s, t, layer, window),
        float(scale),
        float(softcap),
        out.ctypes.data,
    )
    if rc != 0:
        raise ValueError(
            f"cake_attention returned {rc}: {_ERRORS.get(rc, 'bad arguments')}"
        )
    return out


def attention_np(
    qkv: np.ndarray,
    cos: np.ndarray,
    sin: np.ndarray,
    cache: np.ndarray,
    slots: np.ndarray,
    positions: np.ndarray,
    lengths: np.ndarray,
    *,
    n_heads: int,
    layer: int,
    window: int = 0,
    scale: float | None = None,
    softcap: float = 0.0,
) -> np.ndarray:
    """Attention output float32 `(B, L, n_heads hd)`; writes the batch's k and v
    into `cache` (a float32, float16 or bfloat16 C-contiguous, writeable NumPy
    array; 16-bit caches hold k and v rounded to nearest even) in place. See
    the module docstring.

    qkv, cos and sin must be float32 NumPy arrays (copied if not contiguous);
    slots, positions and lengths any integers that fit int32. Raises ValueError
    for a wrong dtype or shape, a slot out of [0, S), a token at or past T, a
    length outside [0, L], a layer out of range, window < 0, scale <= 0 or
    softcap < 0.
    """
    lib = _require()
    if not hasattr(lib.raw, "cake_attention"):
        raise KernelsUnavailable("the CPU kernels were built without attention.cc")
    return _call(
        lib.raw,
        qkv,
        cos,
        sin,
        cache,
        slots,
        positions,
        lengths,
        n_heads=n_heads,
        layer=layer,
        window=window,
        scale=scale,
        softcap=softcap,
    )


def _register_jax() -> None:
    register_ffi(
        ("attention",),
        "the XLA FFI attention handler (jax not importable at build time, "
        "or no attention.cc)",
    )


def attention(
    qkv: Any,
    cos: Any,
    sin: Any,
    cache: Any,
    slots: Any,
    positions: Any,
    lengths: Any,
    *,
    n_heads: int,
    layer: int,
    window: int = 0,
    scale: float | None = None,
    softcap: float = 0.0,
) -> tuple[Any, Any]:
    """(out float32 `(B, L, n_heads hd)`, the updated cache) as an XLA CPU custom
    call, usable inside `jax.jit`. The cache result aliases `cache` (float32,
    float16 or bfloat16: see attention_np): donate it to jit (`donate_argnums`) and XLA updates it without a copy.

    Shapes, dtypes, layer, window, scale and softcap are checked here
    (ValueError); slot and position ranges can only be checked when the call
    runs: a bad one fails it with an XLA runtime error, and nothing is written.
    """
    import jax
    import jax.numpy as jnp

    _register_jax()
    if np.dtype(cache.dtype) not in KV_TYPES:
        raise ValueError(
            f"cache must be float32, float16 or bfloat16; got {np.dtype(cache.dtype)}"
        )
    ints = [jnp.asarray(a) for a in (slots, positions, lengths)]
    scale = _scale(cache.shape[-1], scale)
    b, n, nh, _, hd, _, _, _ = _check_static(
        qkv, cos, sin, cache, ints, n_heads, layer, window, scale, softcap
    )
    out = jax.ShapeDtypeStruct((b, n, nh * hd), jnp.float32)
    new_cache = jax.ShapeDtypeStruct(cache.shape, cache.dtype)
    call = jax.ffi.ffi_call(
        "cake_cpu_attention",
        (out, new_cache),
        input_output_aliases={3: 1},
        vmap_method="sequential",
    )
    f32 = jnp.float32
    return call(
        jnp.asarray(qkv, f32),
        jnp.asarray(cos, f32),
        jnp.asarray(sin, f32),
        cache,
        *(jnp.asarray(a, jnp.int32) for a in ints),
        layer=np.int64(layer),
        window=np.int64(window),
        scale=np.float32(scale),
        softcap=np.float32(softcap),
    )
