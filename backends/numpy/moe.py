"""A mixture-of-experts MLP in NumPy (Mixtral, Qwen2-MoE, Qwen3-MoE), for the
blocks whose layer holds a router (cake.config.Moe).

The router's softmax over all experts picks each token's top k, weighted by
their probabilities (renormalised to sum 1 where the model says so). Each
expert runs once on the rows routed to it (a loop over the experts in use, not
over tokens), and the weighted outputs are added per token in the order of the
experts, as transformers adds them; the shared expert (Qwen2-MoE) after them,
gated by sigmoid(x . shared_gate).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from cake.config import ModelConfig

# (cfg, gate|up parts, down, x) -> x's MLP output: the dense block's
Ffn = Callable[[ModelConfig, tuple, Any, np.ndarray], np.ndarray]


def route(cfg: ModelConfig, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Router logits (n, E) -> each token's experts (n, k), best first, and
    their weights (n, k) float32."""
    moe = cfg.moe
    z = logits - logits.max(-1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1, kind="stable")[:, : moe.top_k]
    weights = np.take_along_axis(probs, top, axis=-1)
    if moe.normalize:
        weights = weights / weights.sum(-1, keepdims=True)
    return top, weights.astype(np.float32)


def mlp(cfg: ModelConfig, w: dict, x: np.ndarray, ffn: Ffn, linear) -> np.ndarray:
    """x (n, D), normed -> the layer's MLP output (n, D)."""
    top, weights = route(cfg, linear(x, w["router"]))
    out = np.zeros_like(x)
    for e in np.unique(top):
        tok, slot = np.nonzero(top == e)
        y = ffn(cfg, w["expert_gate_up"][e], w["expert_down"][e], x[tok])
        out[tok] += y * weights[tok, slot, None]  # a token picks an expert once
    if w.get("down") is not None:  # the shared expert
        shared = ffn(cfg, w["gate_up"], w["down"], x)
        if "shared_gate" in w:
            g = linear(x, w["shared_gate"])  # (n, 1)
            shared = shared / (1.0 + np.exp(-g))
        out = out + shared
    return out
