"""Tokens drawn inside a head stage's jitted step (see cake.backends.base.Draw).

Every head step that returns the last tokens' logits also takes a draw's
inputs, one row per sequence, and returns ids besides the logits; the stage
hands back whichever its Step asks for, so a draw costs no program of its own
(nor a compile). A row with inv_t < 0 draws nothing: a step that wants logits
pays nothing for the ids.

On the CPU with the kernels the draw is src/sample.cc's, the host sampler's
own function (cake.sampling.draw), from the same double r: the same token,
bit for bit. Elsewhere (GPU, TPU, a CPU without the kernels) it is XLA's:
weights exp((z - max) * inv_t); top-k keeps the logits at least the k-th
largest, top-p the largest weights (ties by the lower id) up to the first
whose float32 running sum reaches top_p of their total, then min-p; the
token where r * their sum falls in their float32 running sum: the same
distribution, but a draw can differ from the host's where r (or the top-p
cut) falls within rounding of a boundary. Only a step with a row of top-k or
top-p sorts its rows (lax.cond).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cake.backends.base import Draw

_R_ONE = float(2**53)  # r = k / 2^53; numpy's random() is such a k


@functools.lru_cache(maxsize=16)  # decode: greedy steps repeat their Draw
def host_inputs(d: Draw | None, batch: int) -> tuple[np.ndarray, ...]:
    """(inv_t f32 (B,), min_p f32 (B,), r (B, 2) int32, top_k int32 (B,),
    top_p f32 (B,)): `d` as the step's inputs; rows of inv_t -1 (no draw)
    where `d` is None. r travels as the integer k of r = k / 2^53 in two
    32-bit halves (high, low): a float32 array would round it. Read-only: a
    repeated Draw gets the same arrays."""
    if d is None:
        out = (
            np.full(batch, -1.0, np.float32),
            np.zeros(batch, np.float32),
            np.zeros((batch, 2), np.int32),
            np.zeros(batch, np.int32),
            np.ones(batch, np.float32),
        )
    else:
        # Row by row in Python: for the few rows of a step this took 10-20 us
        # where the same as array ops took ~110 (8 rows, 2026-12-04), on the
        # path of every decode step; the same Draw again takes ~1 us.
        inv_t, halves = [], []
        for t, r in zip(d.temperature, d.r, strict=True):
            # 1 / t rounded to float32 (below), as the host sampler passes it;
            # 0: greedy
            inv_t.append(1.0 / t if t != 0 else 0.0)
            k = r * _R_ONE
            if not (0 <= k < _R_ONE and float(k).is_integer()):  # NaN fails
                raise ValueError(f"r={r!r} is not a multiple of 2^-53 in [0, 1)")
            k = int(k)
            halves.append((k >> 32, k & 0xFFFFFFFF))
        r = np.array(halves, np.uint32).reshape(len(halves), 2).view(np.int32)
        # top_k past int32 keeps every token, as 0 does
        top_k = [k if 0 < k < 2**31 else 0 for k in d.top_k]
        out = (
            np.array(inv_t, np.float32),
            np.array(d.min_p, np.float32),
            r,
            np.array(top_k, np.int32),
            np.array(d.top_p, np.float32),
        )
    for a in out:
        a.flags.writeable = False  # shared by the steps that repeat it
    return out


def avals(batch: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    """What `host_inputs` gives, for lowering a step."""
    return (
        jax.ShapeDtypeStruct((batch,), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.float32),
        jax.ShapeDtypeStruct((batch, 2), jnp.int32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
        jax.ShapeDtypeStruct((batch,), jnp.float32),
    )


def draw_tokens(logits, inv_t, min_p, r, top_k, top_p, *, kernel: bool):
    """int32 ids (B,) for float32 logits (B, V) (traced; see the module)."""
    if kernel:
        from cake.kernels import cpu

        return cpu.sample_ffi(logits, inv_t, min_p, r, top_k, top_p)
    return jax.lax.cond(
        jnp.any(inv_t >= 0),
        _draw_xla,
        lambda logits, inv_t, *_: jnp.full(inv_t.shape, -1, jnp.int32),
        logits,
        inv_t,
        min_p,
        r,
        top_k,
        top_p,
    )


def _filtered(logits, w, top_k, top_p):
    """The weights `w` (B, V) with those top-k and top-p leave out set to 0
    (see the module): one sort of each row."""
    v = logits.shape[-1]
    k = jnp.where((top_k > 0) & (top_k < v), top_k, v)
    kth = jnp.take_along_axis(jnp.sort(logits, -1), (v - k)[:, None], -1)
    w = jnp.where(logits >= kth, w, 0.0)
    order = jnp.argsort(-w, -1, stable=True)  # largest first, ties by id
    ws = jnp.take_along_axis(w, order, -1)
    cum = jnp.cumsum(ws, -1)
    target = top_p[:, None] * cum[:, -1:]
    cut = jnp.minimum(jnp.sum(cum < target, -1), v - 1)[:, None]  # the last kept
    wc = jnp.take_along_axis(ws, cut, -1)
    ic = jnp.take_along_axis(order, cut, -1)
    ids = jax.lax.broadcasted_iota(jnp.int32, w.shape, 1)
    keep = (w > wc) | ((w == wc) & (ids <= ic)) | (top_p[:, None] >= 1.0)
    return jnp.where(keep, w, 0.0)


def _draw_xla(logits, inv_t, min_p, r, top_k, top_p):
    hi = jax.lax.bitcast_convert_type(r[:, 0], jnp.uint32).astype(jnp.float32)
    lo = jax.lax.bitcast_convert_type(r[:, 1], jnp.uint32).astype(jnp.float32)
    u01 = hi * 2.0**-21 + lo * 2.0**-53  # r, rounded to float32
    nan = jnp.isnan(logits).any(-1)
    m = logits.max(-1, keepdims=True)
    greedy = jnp.argmax(logits, -1).astype(jnp.int32)
    w = jnp.exp((logits - m) * jnp.maximum(inv_t, 0.0)[:, None])
    v = logits.shape[-1]
    w = jax.lax.cond(
        jnp.any((inv_t > 0) & (((top_k > 0) & (top_k < v)) | (top_p < 1.0))),
        _filtered,
        lambda logits, w, *_: w,
        logits,
        w,
        top_k,
        top_p,
    )
    w = jnp.where(w >= min_p[:, None], w, 0.0)
    c = jnp.cumsum(w, -1)
    u = u01[:, None] * c[:, -1:]
    idx = jnp.sum(c <= u, -1).astype(jnp.int32)  # the first whose sum passes u
    # rounding put u at or past the total: the last token of weight > 0
    last = (v - 1 - jnp.argmax(w[:, ::-1] > 0, -1)).astype(jnp.int32)
    sampled = jnp.minimum(idx, last)
    finite = jnp.isfinite(m[:, 0])
    ids = jnp.where(inv_t == 0, greedy, jnp.where(finite, sampled, -1))
    return jnp.where((inv_t < 0) | nan, -1, ids)
