"""The JAX stage step, and the llama block (llama, mistral, qwen2, qwen3, phi3,
gemma).

Pure JAX functions over a weight pytree. Every family runs `stage_step`: its
decoder block is `attn_in` and `attn_out` of the module `cfg.family.block`
names (this one, or e.g. olmo2.py) around the shared attention (`layer`).
One call of `stage_step` runs a whole stage for a batch: embedding (if the stage
owns it), its layers unrolled, final norm and head (if it owns them). The KV
cache is one fixed-shape buffer for all layers, written by index and returned,
so the caller can donate it. Math is float32; weights stay in their stored
form (16-bit floats, quantized blocks) and every product reads them as they
are (see linear.py), accumulating in float32.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import sys
from types import ModuleType
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cake.backends.jax import moe
from cake.backends.jax.draw import draw_tokens
from cake.backends.jax.linear import QMat, kernel_rows, mm, mm_cat, rms, take_rows
from cake.backends.jax.params import Params
from cake.config import ModelConfig
from cake.embedding import embed_scale

# KV cache: one buffer (n_layers, 2 [k, v], S slots, n_kv, T positions, hd)

# A finite mask value: a row with every key masked (padding only) gets uniform
# weights instead of NaN, and exp(_MASKED - max) is exactly 0 in real rows.
_MASKED = float(np.finfo(np.float32).min)
_HIGHEST = lax.Precision.HIGHEST  # no TF32 on GPUs: float32 means float32


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    # x (B, L, H, hd); cos/sin (B, L, hd/2); HF's rotate_half layout
    c, s = cos[:, :, None], sin[:, :, None]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _attend(
    q: jax.Array,
    keys: jax.Array,
    vals: jax.Array,
    allowed: jax.Array,
    softcap: float | None,
):
    """q (B, nkv, rep, L, hd) scaled; keys/vals (B, nkv, T, hd); allowed (B, L, T)."""
    scores = jnp.einsum("bkrqd,bktd->bkrqt", q, keys, precision=_HIGHEST)
    if softcap is not None:  # Gemma 2: (s / cap), tanh, * cap, as transformers
        scores = jnp.tanh(scores / softcap) * softcap
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
    scale: float | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """q (B, L, nh, hd); keys/vals (B, nkv, T, hd); allowed (B, L, T) -> (B, L, nh hd).

    causal_chunk: every sequence starts at position 0, so queries [j, j + c)
    see only keys [0, j + c): attend chunk by chunk and skip the masked rest.
    scale: of q (default 1 / sqrt(hd)); softcap: of the scores (Gemma 2), if any.
    """
    b, n, nh, hd = q.shape
    nkv, t = keys.shape[1], keys.shape[2]
    scale = 1.0 / np.sqrt(hd) if scale is None else scale
    q = q.reshape(b, n, nkv, nh // nkv, hd) * scale
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
                softcap,
            )
        )
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, n, nh * hd)


class Shared(NamedTuple):
    """What every layer of one step shares (built once per step by stage_step).

    rope: per kind of layer (`cfg.local_rope`: False global, True local) cos/sin
    (B, L, hd/2) at each token's position; slots, positions, lengths (B,);
    write_t (B, L) cache position of each token (out of range for padding);
    allowed: per window of the stage's layers (`cfg.window`, None: none) the
    attention mask (B, L, T). kernel: attention runs as the CPU kernel
    (cake.kernels.cpu.attention), which writes and reads the cache in place and
    needs none of write_t/allowed/causal_chunk. first: the model's index of the
    stage's first layer, by which the config gives each layer's window and RoPE.
    held: per layer, the weights the stage registered with the CPU kernels
    (cake.kernels.cpu.layer.Held; None: passed as parameters), or None for all.
    """

    rope: dict[bool, tuple[jax.Array, jax.Array]]
    slots: jax.Array
    positions: jax.Array
    lengths: jax.Array
    write_t: jax.Array
    allowed: dict[int | None, jax.Array]
    causal_chunk: int | None
    kernel: bool
    first: int
    held: tuple | None = None


def _heads(cfg: ModelConfig, qkv: jax.Array) -> tuple[jax.Array, ...]:
    """q (B, L, nh, hd), k and v (B, L, nkv, hd) of a fused qkv projection."""
    b, n, _ = qkv.shape
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = qkv[..., : nh * hd].reshape(b, n, nh, hd)
    k = qkv[..., nh * hd : (nh + nkv) * hd].reshape(b, n, nkv, hd)
    v = qkv[..., (nh + nkv) * hd :].reshape(b, n, nkv, hd)
    return q, k, v


def _attend_xla(
    cfg: ModelConfig, i: int, qkv: jax.Array, cache: jax.Array, st: Shared
) -> tuple[jax.Array, jax.Array]:
    """Rope, the cache write and attention as XLA ops (GPUs, TPUs, long prefills)."""
    g = st.first + i
    q, k, v = _heads(cfg, qkv)
    rope = st.rope[cfg.local_rope(g)]
    q, k = rotate(q, *rope), rotate(k, *rope)
    # one in-place write of k and v; padding tokens carry an out-of-range
    # write_t and are dropped. (B, L, 2, nkv, hd) lands at [i, :, slot, :, t]
    new = jnp.stack([k, v], axis=2).astype(cache.dtype)
    cache = cache.at[i, :, st.slots[:, None], :, st.write_t].set(new, mode="drop")
    # read only the filled part: the bucket of T positions covering every sequence
    allowed = st.allowed[cfg.window(g)]
    t_len = allowed.shape[-1]
    kv = jnp.take(cache[i, :, :, :, :t_len], st.slots, axis=1)  # (2, B, nkv, T, hd)
    out = attention(
        q,
        kv[0],
        kv[1],
        allowed,
        st.causal_chunk,
        cfg.attn_scale,
        cfg.attn_logit_softcapping,
    )
    return out, cache


def _qk_norm(cfg: ModelConfig, w: Params, qkv: jax.Array) -> jax.Array:
    """qkv with its q and k heads RMS-normed per head (Qwen3's q_norm/k_norm)."""
    b, n, _ = qkv.shape
    q, k, v = _heads(cfg, qkv)
    q, k = (
        w["q_norm"] * rms(q, cfg.rms_norm_eps),
        w["k_norm"] * rms(k, cfg.rms_norm_eps),
    )
    return jnp.concatenate([a.reshape(b, n, -1) for a in (q, k, v)], axis=-1)


def attn_in(cfg: ModelConfig, w: Params, x: jax.Array) -> jax.Array:
    """x (B, L, D) -> q|k|v (B, L, (nh + 2 nkv) hd) as attention takes it (before RoPE)."""
    qkv = mm_cat(x, w["wqkv"], prologue="rms", norm=w["ln1"], eps=cfg.rms_norm_eps)
    if "bqkv" in w:
        qkv = qkv + w["bqkv"]
    if "q_norm" in w:
        qkv = _qk_norm(cfg, w, qkv)
    return qkv


def down(
    cfg: ModelConfig, w: Params, gate_up: jax.Array, residual: jax.Array | None = None
) -> jax.Array:
    """The MLP's down projection of act(gate) * up, gate_up (B, L, 2 I): SwiGLU
    folded into the product (the CPU kernels' prologue), GELU-tanh before it."""
    if cfg.hidden_act == "silu":
        return mm(gate_up, w["wd"], prologue="swiglu", residual=residual)
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return mm(jax.nn.gelu(gate, approximate=True) * up, w["wd"], residual=residual)


def ffn(cfg: ModelConfig, w: Params, x: jax.Array) -> jax.Array:
    """A gated MLP of x (..., D) as it is (no norm): an expert's, the shared one's."""
    return down(cfg, w, mm_cat(x, w["wgu"]))


def attn_out(cfg: ModelConfig, w: Params, x: jax.Array, attn: jax.Array) -> jax.Array:
    """The residual block around attention's output attn (B, L, nh hd): x out."""
    with jax.named_scope("attention"):
        x = mm(attn, w["wo"], residual=x)
    with jax.named_scope("mlp"):
        if "router" in w:  # a mixture of experts (moe.py)
            return x + moe.mlp(cfg, w, w["ln2"] * rms(x, cfg.rms_norm_eps), ffn)
        gate_up = mm_cat(
            x, w["wgu"], prologue="rms", norm=w["ln2"], eps=cfg.rms_norm_eps
        )
        return down(cfg, w, gate_up, residual=x)


@functools.cache
def _layer_kernel_available() -> bool:
    if os.environ.get("CAKE_CPU_LAYER", "1") == "0":  # to measure the difference
        return False
    from cake.kernels.cpu import layer as cpu_layer

    return cpu_layer.available()


def one_call_rows(cfg: ModelConfig, block: ModuleType, w: Params) -> int:
    """Up to how many rows of x (B * L) layer w is one CPU kernel call
    (cake.kernels.cpu.layer), 0 if never: this module's block, no bias, q/k
    norm or experts, SwiGLU, and every product by the kernels (`by_kernel`)."""
    from cake.kernels.cpu.layer import MAX_GU_PARTS, MAX_QKV_PARTS

    if not (
        block is sys.modules[__name__]
        and cfg.hidden_act == "silu"
        and not any(k in w for k in ("bqkv", "q_norm", "router"))
        and len(w["wqkv"]) <= MAX_QKV_PARTS
        and len(w["wgu"]) <= MAX_GU_PARTS
        and _layer_kernel_available()
    ):
        return 0
    mats = (*w["wqkv"], w["wo"], *w["wgu"], w["wd"])
    if not all(isinstance(m, QMat) and m.kernel for m in mats):
        return 0
    return min(kernel_rows(m.fmt) for m in mats)


def kernel_weights(w: Params) -> dict:
    """Layer w's weights as cake.kernels.cpu.layer's `layer` and `hold` take them."""
    return {
        "ln1": w["ln1"],
        "ln2": w["ln2"],
        "wqkv": tuple((m.data, m.fmt) for m in w["wqkv"]),
        "wo": (w["wo"].data, w["wo"].fmt),
        "wgu": tuple((m.data, m.fmt) for m in w["wgu"]),
        "wd": (w["wd"].data, w["wd"].fmt),
    }


def _one_call(cfg: ModelConfig, block: ModuleType, w: Params, x: jax.Array) -> bool:
    """Whether layer w on x is one CPU kernel call (see one_call_rows)."""
    return math.prod(x.shape[:-1]) <= one_call_rows(cfg, block, w)


def layer(
    cfg: ModelConfig,
    block: ModuleType,
    i: int,
    w: Params,
    x: jax.Array,
    cache: jax.Array,
    st: Shared,
) -> tuple[jax.Array, jax.Array]:
    """Decoder block i of the stage. x (B, L, D) float32; returns it and the cache."""
    g = st.first + i  # the layer's index in the model: its window and RoPE
    held = st.held[i] if st.kernel and st.held is not None else None
    if held is not None or (st.kernel and _one_call(cfg, block, w, x)):
        from cake.kernels.cpu import layer as cpu_layer

        # the same kernel calls as below, in one custom call (see its module),
        # on the weights the stage registered with the kernels or passed here
        call, weights = (
            (cpu_layer.layer_held, {"weights": held})
            if held is not None
            else (cpu_layer.layer, kernel_weights(w))
        )
        return call(
            x,
            *st.rope[cfg.local_rope(g)],
            cache,
            st.slots,
            st.positions,
            st.lengths,
            **weights,
            n_heads=cfg.num_attention_heads,
            layer=i,
            eps=cfg.rms_norm_eps,
            window=cfg.window(g) or 0,
            scale=cfg.attn_scale,
            softcap=cfg.attn_logit_softcapping or 0.0,
        )
    with jax.named_scope("attention"):
        qkv = block.attn_in(cfg, w, x)
        if st.kernel:
            from cake.kernels.cpu import attention as cpu_attention

            # the kernel takes the query scale, the soft-cap and the window of
            # each layer (extended for Gemma 2; tests/test_kernels_attention.py)
            attn, cache = cpu_attention.attention(
                qkv,
                *st.rope[cfg.local_rope(g)],
                cache,
                st.slots,
                st.positions,
                st.lengths,
                n_heads=cfg.num_attention_heads,
                layer=i,
                window=cfg.window(g) or 0,
                scale=cfg.attn_scale,
                softcap=cfg.attn_logit_softcapping or 0.0,
            )
        else:
            attn, cache = _attend_xla(cfg, i, qkv, cache, st)
    return block.attn_out(cfg, w, x, attn), cache


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
    attention_kernel: bool = False,
    first: int = 0,
    held: tuple | None = None,
    draw: tuple | None = None,
    draw_kernel: bool = False,
) -> tuple[jax.Array | tuple[jax.Array, jax.Array], jax.Array]:
    """Run the stage on a padded batch; returns (output, updated cache).

    x: (B, L) int32 ids if `embed`, else (B, L, D) hidden. slots/positions/
    lengths: (B,) int32. t_len: the cache positions attention reads (static).
    attention_kernel: attention through the CPU kernel (see `Shared.kernel`).
    first: the model's index of the stage's first layer.
    held: see `Shared.held` (a held layer's params may be empty).
    draw: (inv_t, min_p, r, top_k, top_p) for a head's last tokens (see
    draw.py; through the CPU kernel if `draw_kernel`): the output is then
    (logits, ids (B, 1)).
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
        scale = embed_scale(cfg, out_dtype)
        if embed and scale is not None:  # in the model dtype, as transformers
            h = (h * scale).astype(out_dtype).astype(jnp.float32)
            # not fused into the first layer's ops, so that they compute as in a
            # stage whose input is this (an EmbeddingStage's, bit for bit)
            h = lax.optimization_barrier(h)
    tpos = positions[:, None] + jnp.arange(n, dtype=jnp.int32)  # (B, L)
    valid = jnp.arange(n)[None, :] < lengths[:, None]  # (B, L)
    write_t = jnp.where(valid, tpos, t_alloc)
    layers = range(first, first + len(params["layers"]))
    rope = {
        local: (
            jnp.take(params[f"rope_cos{suffix}"], tpos, axis=0, mode="clip"),
            jnp.take(params[f"rope_sin{suffix}"], tpos, axis=0, mode="clip"),
        )  # (B, L, hd/2) each
        for local, suffix in ((False, ""), (True, "_local"))
        if any(cfg.local_rope(g) == local for g in layers)
    }
    kpos = jnp.arange(t_len, dtype=jnp.int32)[None, None, :]
    causal = kpos <= tpos[:, :, None]  # (B, L, T)
    allowed = {None: causal}  # and (B, L, T) for each window the layers have
    for window in {cfg.window(g) for g in layers} - {None}:
        allowed[window] = causal & (kpos > tpos[:, :, None] - window)
    st = Shared(
        rope,
        slots,
        positions,
        lengths,
        write_t,
        allowed,
        causal_chunk,
        attention_kernel,
        first,
        held,
    )
    block = importlib.import_module(f"cake.backends.jax.{cfg.family.block}")
    for i, w in enumerate(params["layers"]):
        with jax.named_scope(f"layer_{i}"):
            h, cache = layer(cfg, block, i, w, h, cache, st)
    if not head:
        return jnp.where(valid[..., None], h, 0).astype(out_dtype), cache
    with jax.named_scope("head"):
        if all_logits:
            h = jnp.where(valid[..., None], h, 0)
        else:
            h = h[jnp.arange(b), lengths - 1]  # (B, D): each last new token
        logits = mm(
            h, params["head"], prologue="rms", norm=params["norm"], eps=cfg.rms_norm_eps
        )
        cap = cfg.final_logit_softcapping
        if cap is not None:
            logits = jnp.tanh(logits / cap) * cap
        logits = logits.astype(jnp.float32)
    if draw is not None:
        with jax.named_scope("draw"):
            # (B, 1): what a decode step of the same sequences takes as its
            # ids, so that the next step can start from them on the device
            ids = draw_tokens(logits, *draw, kernel=draw_kernel)[:, None]
            return (logits, ids), cache
    return logits, cache
