"""The OLMo 2 block in JAX: RMSNorm on each sublayer's output, before the
residual add (no pre-norms), and q/k RMSNorm over the whole projection."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cake.backends.jax.linear import mm, mm_cat, rms
from cake.backends.jax.params import Params
from cake.config import ModelConfig


def attn_in(cfg: ModelConfig, w: Params, x: jax.Array) -> jax.Array:
    """x (B, L, D) -> q|k|v (B, L, (nh + 2 nkv) hd), q and k normed across all heads."""
    qkv = mm_cat(x, w["wqkv"])
    if "bqkv" in w:
        qkv = qkv + w["bqkv"]
    nq = cfg.num_attention_heads * cfg.head_dim
    q, k, v = jnp.split(qkv, [nq, nq + cfg.num_key_value_heads * cfg.head_dim], -1)
    eps = cfg.rms_norm_eps
    q, k = w["q_norm"] * rms(q, eps), w["k_norm"] * rms(k, eps)
    return jnp.concatenate([q, k, v], axis=-1)


def attn_out(cfg: ModelConfig, w: Params, x: jax.Array, attn: jax.Array) -> jax.Array:
    eps = cfg.rms_norm_eps
    with jax.named_scope("attention"):
        h = x + w["ln1"] * rms(mm(attn, w["wo"]), eps)
    with jax.named_scope("mlp"):
        out = mm(mm_cat(h, w["wgu"]), w["wd"], prologue="swiglu")
        return h + w["ln2"] * rms(out, eps)
