"""The Gemma 2 / Gemma 3 block in JAX: the llama block's pre-norms (and Gemma
3's per-head q/k norms), plus an RMSNorm on each sublayer's output before the
residual add. Gemma's (1 + w) norm weights, GELU-tanh, scaled embeddings,
attention scale, soft-caps and per-layer windows are config facts the stage
applies (see cake.family)."""

from __future__ import annotations

import jax

from cake.backends.jax.linear import mm, mm_cat, rms
from cake.backends.jax.llama import attn_in, down
from cake.backends.jax.params import Params
from cake.config import ModelConfig

__all__ = ["attn_in", "attn_out"]


def attn_out(cfg: ModelConfig, w: Params, x: jax.Array, attn: jax.Array) -> jax.Array:
    """The residual block around attention's output attn (B, L, nh hd): x out."""
    eps = cfg.rms_norm_eps
    with jax.named_scope("attention"):
        h = x + w["ln1_post"] * rms(mm(attn, w["wo"]), eps)
    with jax.named_scope("mlp"):
        gate_up = mm_cat(h, w["wgu"], prologue="rms", norm=w["ln2"], eps=eps)
        return h + w["ln2_post"] * rms(down(cfg, w, gate_up), eps)
