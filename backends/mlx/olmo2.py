"""The OLMo 2 block on MLX: RMSNorm on each sublayer's output, before the
residual add (no pre-norms), and q/k RMSNorm over the whole projection."""

from __future__ import annotations

import mlx.core as mx

from cake.backends.mlx.llama import Weights, mlp, split_qkv
from cake.backends.mlx.quant import linear, linears
from cake.config import ModelConfig


def attn_in(cfg: ModelConfig, w: Weights, h: mx.array) -> mx.array:
    """h (B, L, D) -> q|k|v (B, L, (nh + 2 nkv) hd), q and k normed across all heads."""
    qkv = linears(h, w["qkv"])
    if "qkv_bias" in w:
        qkv = qkv + w["qkv_bias"]
    q, k, v = split_qkv(cfg, qkv)
    eps = cfg.rms_norm_eps
    q = mx.fast.rms_norm(q, w["q_norm"], eps)
    k = mx.fast.rms_norm(k, w["k_norm"], eps)
    return mx.concatenate([q, k, v], axis=-1)


def attn_out(cfg: ModelConfig, w: Weights, h: mx.array, attn: mx.array) -> mx.array:
    eps = cfg.rms_norm_eps
    h = h + mx.fast.rms_norm(linear(attn, w["o"]), w["attn_norm"], eps)
    return h + mx.fast.rms_norm(mlp(cfg, w, h), w["mlp_norm"], eps)
