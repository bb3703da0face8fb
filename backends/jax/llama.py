"""Llama family (llama, mistral, qwen2, qwen3) as pure JAX functions over a weight pytree.

One call of `stage_step` runs a whole stage for a batch: embedding (if the stage
owns it), its layers unrolled, final norm and head (if it owns them). The KV
cache is one fixed-shape buffer for all layers, written by index and returned,
so the caller can donate it. Math is float32; weights stay in their stored
form (16-bit floats, quantized blocks) and every product reads them as they
are (see linear.py), accumulating in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cake.backends.jax.linear import QMat, mm, mm_cat, take_rows
from cake.backends.jax.params import Params
from cake.config import ModelConfig

# KV cache: one buffer (n_layers, 2 [k, v], S slots, n_kv, T positions, hd)

# A finite mask value: a row with every key masked (padding only) gets uniform
# weights instead of NaN, and exp(_MASKED - max) is exactly 0 in real rows.
_MASKED = float(np.finfo(np.float32).min)
_HIGHEST = lax.Precision.HIGHEST  # no TF32 on GPUs: float32 means float32


def rms(x: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) over the last axis; the weight is applied elsewhere."""
    return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    # x (B, L, H, hd); cos/sin (B, L, hd/2); HF's rotate_half layout
    c, s = cos[:, :, None], sin[:, :, None]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _attend(q: jax.Array, keys: jax.Array, vals: jax.Array, allowed: jax.Array):
    """q (B, nkv, rep, L, hd) scaled; keys/vals (B, nkv, T, hd); allowed (B, L, T)."""
    scores = jnp.einsum("bkrqd,bktd->bkrqt", q, keys, precision=_HIGHEST)
    scores = jnp.where(allowed[:, None, None], scores, _MASKED)  # (B, nkv, rep, L, T)
    e = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    out = jnp.einsum("bkrqt,bktd->bkrqd", e, vals, precision=_HIGHEST)
    # normalize after the product: (L, hd) divisions instead of (L, T), one op less
    return out / jnp.sum(e, axis=-1, keepdims=True)


def attention(
    q: jax.Array,
    keys: jax.Array,
    vals: jax.Array,
    allowed: jax.Array,
    causal_chunk: int | None = None,
) -> jax.Array:
    """q (B, L, nh, hd); keys/vals (B, nkv, T, hd); allowed (B, L, T) -> (B, L, nh hd).

    causal_chunk: every sequence starts at position 0, so queries [j, j + c)
    see only keys [0, j + c): attend chunk by chunk and skip the masked rest.
    """
    b, n, nh, hd = q.shape
    nkv, t = keys.shape[1], keys.shape[2]
    q = q.reshape(b, n, nkv, nh // nkv, hd) * (1.0 / np.sqrt(hd))
    q = q.transpose(0, 2, 3, 1, 4)  # (B, nkv, rep, L, hd)
    keys, vals = keys.astype(q.dtype), vals.astype(q.dtype)
    c = causal_chunk or n
    outs = []
    for j in range(0, n, c):
        e = min(j + c, t) if causal_chunk else t
        outs.append(
            _attend(
                q[:, :, :, j : j + c],
                keys[:, :, :e],
                vals[:, :, :e],
                allowed[:, j : j + c, :e],
            )
        )
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, n, nh * hd)


def layer(
    cfg: ModelConfig,
    i: int,
    w: Params,
    x: jax.Array,
    cache: jax.Array,
    rope: tuple[jax.Array, jax.Array],
    slots: jax.Array,
    write_t: jax.Array,
    allowed: jax.Array,
    causal_chunk: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Decoder block i of the stage. x (B, L, D) float32; returns it and the cache."""
    b, n, _ = x.shape
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    eps, t_len = cfg.rms_norm_eps, allowed.shape[-1]
    with jax.named_scope("attention"):
        qkv = mm_cat(w["ln1"] * rms(x, eps), w["wqkv"])
        if "bqkv" in w:
            qkv = qkv + w["bqkv"]
        q = qkv[..., : nh * hd].reshape(b, n, nh, hd)
        k = qkv[..., nh * hd : (nh + nkv) * hd].reshape(b, n, nkv, hd)
        v = qkv[..., (nh + nkv) * hd :].reshape(b, n, nkv, hd)
        if "q_norm" in w:
            q, k = w["q_norm"] * rms(q, eps), w["k_norm"] * rms(k, eps)
        q, k = rotate(q, *rope), rotate(k, *rope)
        # one in-place write of k and v; padding tokens carry an out-of-range
        # write_t and are dropped. (B, L, 2, nkv, hd) lands at [i, :, slot, :, t]
        new = jnp.stack([k, v], axis=2).astype(cache.dtype)
        cache = cache.at[i, :, slots[:, None], :, write_t].set(new, mode="drop")
        # read only the filled part: the bucket of T positions covering every sequence
        kv = jnp.take(cache[i, :, :, :, :t_len], slots, axis=1)  # (2, B, nkv, T, hd)
        attn = attention(q, kv[0], kv[1], allowed, causal_chunk)
        x = x + mm(attn, w["wo"])
    with jax.named_scope("mlp"):
        gate, up = jnp.split(mm_cat(w["ln2"] * rms(x, eps), w["wgu"]), 2, axis=-1)
        x = x + mm(jax.nn.silu(gate) * up, w["wd"])
    return x, cache


def stage_step(
    params: Params,
    cache: jax.Array,
    x: jax.Array,
    slots: jax.Array,
    positions: jax.Array,
    lengths: jax.Array,
    *,
    cfg: ModelConfig,
    embed: bool,
    head: bool,
    t_len: int,
    all_logits: bool,
    out_dtype: str,
    causal_chunk: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Run the stage on a padded batch; returns (output, updated cache).

    x: (B, L) int32 ids if `embed`, else (B, L, D) hidden. slots/positions/
    lengths: (B,) int32. t_len: the cache positions attention reads (static).
    Output: (B, L, D) hidden as `out_dtype`, or float32 logits (B, V) /
    (B, L, V) when `head`. Padding rows of hidden output are zero.
    """
    b, n = x.shape[:2]
    t_alloc = cache.shape[4]
    with jax.named_scope("embed"):
        if not embed:
            h = x.astype(jnp.float32)
        elif "embed" in params:
            h = take_rows(params["embed"], x, transposed=False)
        else:  # the tied head doubles as the embedding
            table = params["head"]
            h = take_rows(table, x, transposed=not isinstance(table, QMat))
        h = h.astype(jnp.float32)
    tpos = positions[:, None] + jnp.arange(n, dtype=jnp.int32)  # (B, L)
    valid = jnp.arange(n)[None, :] < lengths[:, None]  # (B, L)
    write_t = jnp.where(valid, tpos, t_alloc)
    rope = (
        jnp.take(params["rope_cos"], tpos, axis=0, mode="clip"),
        jnp.take(params["rope_sin"], tpos, axis=0, mode="clip"),
    )  # (B, L, hd/2) each
    kpos = jnp.arange(t_len, dtype=jnp.int32)[None, None, :]
    allowed = kpos <= tpos[:, :, None]  # (B, L, T)
    if cfg.sliding_window:
        allowed &= kpos > tpos[:, :, None] - cfg.sliding_window
    for i, w in enumerate(params["layers"]):
        with jax.named_scope(f"layer_{i}"):
            h, cache = layer(
                cfg, i, w, h, cache, rope, slots, write_t, allowed, causal_chunk
            )
    if not head:
        return jnp.where(valid[..., None], h, 0).astype(out_dtype), cache
    with jax.named_scope("head"):
        if all_logits:
            h = jnp.where(valid[..., None], h, 0)
        else:
            h = h[jnp.arange(b), lengths - 1]  # (B, D): each last new token
        logits = mm(params["norm"] * rms(h, cfg.rms_norm_eps), params["head"])
    return logits.astype(jnp.float32), cache
