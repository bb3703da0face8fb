"""A mixture-of-experts MLP in JAX (Mixtral, Qwen2-MoE, Qwen3-MoE), for the
layers whose weights hold a router (cake.config.Moe).

The router's softmax over all experts picks each token's top k (renormalised
where the model says so). The T (token, expert) assignments are sorted by
expert and cut into tiles, each within one expert; a scan runs the tiles,
each the product of its rows with its expert's matrices, picked at run time
out of the layer's stack of every expert (`linear.mm_expert`: the CPU
kernels read that expert's rows in place). So a step reads only the experts
it uses (a decode token of Mixtral 2 of 8), and one program serves every
expert: compiling does not grow with their number (with one `lax.switch`
branch per expert, 128 experts took 3 s per layer to compile).

Up to KERNEL_ROWS assignments a tile holds T rows, one tile per expert in
use, and the kernels multiply only the rows routed to it. Past that (a long
prefill, whose products are widened and compute-bound) tiles hold ceil(T /
E) rows; there are at most ceil(T / rows) + min(E, T) - 1 of them, about
twice the routed rows of work. Tiles past the last one in use are skipped
(`lax.cond`). Each token's expert outputs are added in the order of the
experts, as transformers adds them, then the shared expert (Qwen2-MoE),
gated by sigmoid(x . shared_gate).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from cake.backends.jax.linear import mm, mm_expert
from cake.config import ModelConfig

# Up to this many (token, expert) assignments a tile holds all of them and
# the CPU kernels multiply only the rows routed to its expert (a run-time
# count), so every expert in use is read once and multiplies just its rows.
# Mixtral-shaped, 8 experts, Q8_0, a batch of 8: tiles of ceil(T / E) rows
# read experts several times (8.2 ms a step), tiles of 16 full rows did the
# multiplies of twice the dense model (10.3 ms; all 8 experts dense: 6.3).
KERNEL_ROWS = 128

# (cfg, weights with "wgu" and "wd", x (n, D)) -> the dense MLP's output
Ffn = Callable[[ModelConfig, dict, jax.Array], jax.Array]


def route(cfg: ModelConfig, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Router logits (n, E) -> each token's experts (n, k) and weights (n, k)."""
    moe = cfg.moe
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = lax.top_k(probs, moe.top_k)
    if moe.normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return experts, weights


def mlp(cfg: ModelConfig, w: dict, x: jax.Array, ffn: Ffn) -> jax.Array:
    """x (..., D), normed -> the layer's MLP output (..., D) float32."""
    shape = x.shape
    xs = x.reshape(-1, shape[-1])
    experts, weights = route(cfg, mm(xs, w["router"]))
    out = _routed(cfg, w["experts"], xs, experts, weights)
    if "wd" in w:  # the shared expert
        shared = ffn(cfg, w, xs)
        if "shared_gate" in w:
            shared = jax.nn.sigmoid(mm(xs, w["shared_gate"])) * shared
        out = out + shared
    return out.reshape(shape)


def expert_ffn(
    cfg: ModelConfig, w: dict, e: jax.Array, c: jax.Array, x: jax.Array
) -> jax.Array:
    """Expert e's gated MLP of x's first c rows (of T, D): w holds every
    expert's stacked matrices."""
    gate_up = jnp.concatenate([mm_expert(x, g, e, c) for g in w["wgu"]], axis=-1)
    if cfg.hidden_act == "silu":
        return mm_expert(gate_up, w["wd"], e, c, prologue="swiglu")
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return mm_expert(jax.nn.gelu(gate, approximate=True) * up, w["wd"], e, c)


def _routed(cfg, w, xs, experts, weights) -> jax.Array:
    n, d = xs.shape
    k, n_exp = cfg.moe.top_k, cfg.moe.num_experts
    total = n * k  # (token, expert) assignments
    # up to the kernels' rows, one tile per expert in use, of which the
    # kernels multiply only the rows routed to it; past them (a long prefill,
    # products widened and compute-bound) tiles of ceil(total / E) rows
    rows = total if total <= KERNEL_ROWS else -(-total // n_exp)
    n_tiles = -(-total // rows) + min(n_exp, total) - 1
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # assignments by expert
    counts = jnp.bincount(flat, length=n_exp)
    per = (counts + rows - 1) // rows  # tiles of each expert
    end = jnp.cumsum(per)
    tile = jnp.arange(n_tiles)
    owner = jnp.searchsorted(end, tile, side="right")  # n_exp: past the last
    e = jnp.minimum(owner, n_exp - 1).astype(jnp.int32)
    local = tile - (end - per)[e]
    start = (jnp.cumsum(counts) - counts)[e] + local * rows
    count = jnp.where(owner < n_exp, jnp.minimum(rows, counts[e] - local * rows), 0)
    flat_w = weights.reshape(-1)
    j = jnp.arange(rows)

    def body(out, t):
        ex, s, c = t

        def run(out):
            assign = order[jnp.minimum(s + j, total - 1)]
            tok = assign // k
            y = expert_ffn(cfg, w, ex, c, xs[tok])
            y = jnp.where((j < c)[:, None], y * flat_w[assign][:, None], 0.0)
            return out.at[tok].add(y)

        return lax.cond(c > 0, run, lambda out: out, out), None

    out, _ = lax.scan(body, jnp.zeros_like(xs), (e, start, count))
    return out
