"""A mixture-of-experts MLP on MLX (Mixtral, Qwen2-MoE, Qwen3-MoE), for the
blocks whose layer holds a router (cake.config.Moe).

The router's softmax over all experts (float32) picks each token's top k,
weighted by their probabilities (renormalised to sum 1 where the model says
so), as transformers routes. The experts of each role are one stacked weight
(quant.stack: (E, out, ...) float or affine-quantized) that `mx.gather_mm` /
`mx.gather_qmm` multiply for every (token, pick) pair at once, as mlx-lm's
SwitchGLU does: no loop over tokens or experts (16-bit float experts on
mlx's CPU, whose gather_mm takes float32 only: see quant.gather_linear).
The shared expert (Qwen2-MoE) is the dense MLP, gated by
sigmoid(x . shared_gate), added after.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx

from cake.backends.mlx.quant import (
    Linear,
    fuse,
    gather_linear,
    gather_linears,
    linear,
    stack,
)
from cake.config import ModelConfig
from cake.weights.layer import LayerWeights
from cake.weights.packed import Stored

# (cfg, gate|up parts, down, x) -> x's MLP output: the dense block's
Ffn = Callable[[ModelConfig, list, Linear, mx.array], mx.array]
Act = Callable[[mx.array], mx.array]  # the MLP's activation
# (token, pick) pairs from which the pairs are sorted by expert, so that each
# expert's rows are read once in a run (mlx-lm's threshold)
SORT_AT = 64


def load_experts(lw: LayerWeights, matrix: Callable[[Stored], Linear]) -> dict:
    """A MoE layer's router, stacked experts and shared gate, by role.

    Each role's stack is evaluated before the next is read, so that the
    per-expert copies `matrix` makes are released as it goes: the layer holds
    its experts once, as compact as `matrix` makes them.
    """
    gate_up = []
    for j in range(len(lw.expert_gate_up[0])):  # gate and up, or fused gate|up
        gate_up.append(stack([matrix(e[j]) for e in lw.expert_gate_up]))
        mx.eval(gate_up[-1])
    w: dict[str, Any] = {"router": matrix(lw.router), "expert_gate_up": fuse(gate_up)}
    mx.eval(w)
    del gate_up
    w["expert_down"] = stack([matrix(e) for e in lw.expert_down])
    if lw.shared_gate is not None:
        w["shared_gate"] = matrix(lw.shared_gate)
    mx.eval(w)
    return w


def route(cfg: ModelConfig, logits: mx.array) -> tuple[mx.array, mx.array]:
    """Router logits (..., E) -> each token's k experts (..., k), in no
    particular order, and their weights (..., k) float32."""
    k = cfg.moe.top_k
    probs = mx.softmax(logits.astype(mx.float32), axis=-1, precise=True)
    top = mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k]
    weights = mx.take_along_axis(probs, top, axis=-1)
    if cfg.moe.normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return top, weights


def experts(w: dict, x: mx.array, top: mx.array, act: Act) -> mx.array:
    """x (..., D), top (..., k) -> each picked expert's MLP output (..., k, D)."""
    x = mx.expand_dims(x, (-2, -3))  # (..., 1, 1, D): one row, broadcast over k
    ordered = top.size >= SORT_AT
    idx, inverse = top, None
    if ordered:
        k = top.shape[-1]
        flat = top.flatten()
        order = mx.argsort(flat)
        inverse = mx.argsort(order)
        x, idx = x.flatten(0, -3)[order // k], flat[order]  # (n k, 1, D), (n k,)
    gate, up = mx.split(
        gather_linears(x, w["expert_gate_up"], idx, ordered), 2, axis=-1
    )
    y = gather_linear(act(gate) * up, w["expert_down"], idx, ordered)
    if ordered:
        y = mx.unflatten(y[inverse], 0, top.shape)  # (..., k, 1, D)
    return y.squeeze(-2)


def mlp(cfg: ModelConfig, w: dict, x: mx.array, ffn: Ffn, act: Act) -> mx.array:
    """x (..., D), normed -> the layer's MLP output (..., D), in x's dtype."""
    top, weights = route(cfg, linear(x, w["router"]))
    y = experts(w, x, top, act)  # (..., k, D)
    out = (y * weights[..., None].astype(x.dtype)).sum(axis=-2)
    if w.get("down") is not None:  # the shared expert
        shared = ffn(cfg, w["gate_up"], w["down"], x)
        if "shared_gate" in w:
            shared = mx.sigmoid(linear(x, w["shared_gate"])) * shared
        out = out + shared
    return out
