"""A mixture-of-experts MLP in JAX (Mixtral, Qwen2-MoE, Qwen3-MoE), for the
layers whose weights hold a router (cake.config.Moe).

The router's softmax over all experts picks each token's top k (renormalised
where the model says so); a step reads only the experts its tokens picked (a
decode token of Mixtral 2 of 8), and one program serves every expert: its
size does not grow with their number (with one `lax.switch` branch per
expert, 128 experts took 3 s per layer to compile).

Where the CPU kernels hold the experts (`_grouped`), each (token, expert)
assignment's row is sorted by expert and each matrix is one grouped product
over the layer's stack (`cake_matmul_grouped`: every expert in use times its
rows, in one call). Elsewhere (XLA's float products, GPUs: `_routed`) the T
sorted assignments are cut into tiles of ceil(T / E) rows, each within one
expert, and a scan runs the tiles, each the product of its rows with its
expert's matrices sliced out of the stack at run time (`linear.mm_expert`);
there are at most ceil(T / rows) + min(E, T) - 1 tiles, about twice the routed
rows of work, and those past the last one in use are skipped (`lax.cond`).
Each token's expert outputs are added in the order of the experts, as
transformers adds them, then the shared expert (Qwen2-MoE), gated by
sigmoid(x . shared_gate).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from cake.backends.jax.linear import by_grouped_kernel, mm, mm_expert, mm_grouped
from cake.config import ModelConfig

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
    ew = w["experts"]
    if all(by_grouped_kernel(m) for m in (*ew["wgu"], ew["wd"])):
        out = _grouped(cfg, ew, xs, experts, weights)
    else:
        out = _routed(cfg, ew, xs, experts, weights)
    if "wd" in w:  # the shared expert
        shared = ffn(cfg, w, xs)
        if "shared_gate" in w:
            shared = jax.nn.sigmoid(mm(xs, w["shared_gate"])) * shared
        out = out + shared
    return out.reshape(shape)


def expert_ffn(cfg: ModelConfig, w: dict, e: jax.Array, x: jax.Array) -> jax.Array:
    """Expert e's gated MLP of x (T, D): w holds every expert's stacked matrices."""
    gate_up = jnp.concatenate([mm_expert(x, g, e) for g in w["wgu"]], axis=-1)
    if cfg.hidden_act == "silu":
        return mm_expert(gate_up, w["wd"], e, prologue="swiglu")
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return mm_expert(jax.nn.gelu(gate, approximate=True) * up, w["wd"], e)


def _grouped(cfg, w, xs, experts, weights) -> jax.Array:
    """The CPU kernels' way: every assignment's row, sorted by expert, through
    one grouped product per matrix (each expert's rows times its matrix, the
    layer's experts in one call), then weighted and added to its token."""
    k, n_exp = cfg.moe.top_k, cfg.moe.num_experts
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # assignments by expert
    counts = jnp.bincount(flat, length=n_exp).astype(jnp.int32)
    tok = order // k
    rows = xs[tok]
    gate_up = jnp.concatenate([mm_grouped(rows, g, counts) for g in w["wgu"]], axis=-1)
    if cfg.hidden_act == "silu":
        y = mm_grouped(gate_up, w["wd"], counts, prologue="swiglu")
    else:
        gate, up = jnp.split(gate_up, 2, axis=-1)
        y = mm_grouped(jax.nn.gelu(gate, approximate=True) * up, w["wd"], counts)
    y = y * weights.reshape(-1)[order][:, None]
    return jnp.zeros_like(xs).at[tok].add(y)


def _routed(cfg, w, xs, experts, weights) -> jax.Array:
    """XLA's way (float stacks, GPUs): the sorted assignments in tiles of one
    expert each, a scan over the tiles (see the module docstring)."""
    n, d = xs.shape
    k, n_exp = cfg.moe.top_k, cfg.moe.num_experts
    total = n * k  # (token, expert) assignments
    rows = -(-total // n_exp)
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
            y = expert_ffn(cfg, w, ex, xs[tok])
            y = jnp.where((j < c)[:, None], y * flat_w[assign][:, None], 0.0)
            return out.at[tok].add(y)

        return lax.cond(c > 0, run, lambda out: out, out), None

    out, _ = lax.scan(body, jnp.zeros_like(xs), (e, start, count))
    return out
