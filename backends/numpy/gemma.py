"""The Gemma 2 / Gemma 3 block in NumPy: the llama block's pre-norms (and
Gemma 3's per-head q/k norms), plus an RMSNorm on each sublayer's output before
the residual add. Gemma's (1 + w) norm weights, GELU-tanh, scaled embeddings,
attention scale, soft-caps and per-layer windows are config facts the stage
applies (see cake.family)."""

from __future__ import annotations

import numpy as np

from cake.backends.numpy.llama import Weights, attn_in, linear, mlp, rms_norm
from cake.config import ModelConfig

__all__ = ["attn_in", "attn_out"]


def attn_out(cfg: ModelConfig, w: Weights, x: np.ndarray, attn: np.ndarray):
    """The residual block around attention's output attn (n, nh hd): x (n, D) out."""
    eps = cfg.rms_norm_eps
    h = x + rms_norm(linear(attn, w["o"]), w["attn_post_norm"], eps)
    out = mlp(cfg, w, rms_norm(h, w["mlp_norm"], eps))
    return h + rms_norm(out, w["mlp_post_norm"], eps)
