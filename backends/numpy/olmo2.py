"""The OLMo 2 block in NumPy: RMSNorm on each sublayer's output, before the
residual add (no pre-norms), and q/k RMSNorm over the whole projection."""

from __future__ import annotations

import numpy as np

from cake.backends.numpy.llama import Weights, linear, linears, mlp, rms_norm, split_qkv
from cake.config import ModelConfig


def attn_in(cfg: ModelConfig, w: Weights, x: np.ndarray) -> np.ndarray:
    """x (n, D) -> q|k|v (n, (nh + 2 nkv) hd), q and k normed across all heads."""
    qkv = linears(x, w["qkv"])
    if "qkv_bias" in w:
        qkv = qkv + w["qkv_bias"]
    q, k, v = split_qkv(cfg, qkv)
    eps = cfg.rms_norm_eps
    q, k = rms_norm(q, w["q_norm"], eps), rms_norm(k, w["k_norm"], eps)
    return np.concatenate([q, k, v], axis=-1)


def attn_out(cfg: ModelConfig, w: Weights, x: np.ndarray, attn: np.ndarray):
    eps = cfg.rms_norm_eps
    h = x + rms_norm(linear(attn, w["o"]), w["attn_norm"], eps)
    return h + rms_norm(mlp(cfg, w, h), w["mlp_norm"], eps)
