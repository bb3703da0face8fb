"""A mixture-of-experts MLP in JAX (Mixtral, Qwen2-MoE, Qwen3-MoE), for the
layers whose weights hold a router (cake.config.Moe).

The router's softmax over all experts picks each token's top k (renormalised
where the model says so). The (token, expert) assignments are sorted by
expert and cut into tiles of `rows` assignments, each tile within one
expert; a scan runs the tiles, and `lax.switch` runs only the tile's expert
on its rows, so a step reads each expert it uses about once and no other
(a decode token of Mixtral reads 2 of 8 experts), whatever the format the
expert is stored in (every product is `linear.mm`). With T assignments over
E experts, tiles hold ceil(T / E) rows and there are at most
ceil(T / rows) + min(E, T) - 1 of them: the work is at most about twice the
routed rows. Tiles past the last one in use switch to a branch that does
nothing. Each token's expert outputs are added in the order of the experts,
as transformers adds them, then the shared expert (Qwen2-MoE), gated by
sigmoid(x . shared_gate).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from cake.backends.jax.linear import mm
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
    out = _routed(cfg, w["experts"], xs, experts, weights, ffn)
    if "wd" in w:  # the shared expert
        shared = ffn(cfg, w, xs)
        if "shared_gate" in w:
            shared = jax.nn.sigmoid(mm(xs, w["shared_gate"])) * shared
        out = out + shared
    return out.reshape(shape)


def _routed(cfg, experts_w, xs, experts, weights, ffn) -> jax.Array:
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
    e = jnp.minimum(owner, n_exp - 1)
    local = tile - (end - per)[e]
    start = (jnp.cumsum(counts) - counts)[e] + local * rows
    count = jnp.where(owner < n_exp, jnp.minimum(rows, counts[e] - local * rows), 0)
    branch = jnp.where(count > 0, e, n_exp)
    flat_w = weights.reshape(-1)

    def run(ew):
        return lambda r: ffn(cfg, ew, r)

    branches = [run(ew) for ew in experts_w]
    branches.append(lambda r: jnp.zeros((rows, d), jnp.float32))
    j = jnp.arange(rows)

    def body(out, t):
        b, s, c = t
        assign = order[jnp.minimum(s + j, total - 1)]
        tok = assign // k
        y = lax.switch(b, branches, xs[tok])
        y = jnp.where((j < c)[:, None], y * flat_w[assign][:, None], 0.0)
        return out.at[tok].add(y), None

    out, _ = lax.scan(body, jnp.zeros_like(xs), (branch, start, count))
    return out
