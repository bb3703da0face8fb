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
top-p pays for them (lax.cond): bisections on the bits of the logits and the
weights, no sort.
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


def _largest_at_least(key, pred, bits: int):
    """Per row, the largest unsigned `key` value v (< 2^bits) with pred(v)
    true, pred falling as v grows and true at 0: a bisection of `bits`
    steps (one reduction each, no sort), as a loop of a known trip count:
    unrolled, the three bisections took the draw's compile (in every head
    step's program) from 0.24-0.30 s to 0.85 s on this CPU; looped,
    0.51-0.72."""
    lo = jnp.zeros(key.shape[:1] + (1,), jnp.uint32)
    hi = jnp.full_like(lo, (1 << bits) - 1)

    def halve(_, bounds):
        lo, hi = bounds
        d = hi - lo
        mid = lo + (d >> 1) + (d & 1)
        ok = pred(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    return jax.lax.fori_loop(0, bits, halve, (lo, hi))[0]


def _filtered(logits, w, top_k, top_p):
    """The weights `w` (B, V) with those top-k and top-p leave out set to 0
    (see the module), by bisections on the values' bits instead of a sort of
    each row: XLA's sort of 8 rows of 49k took 63 ms on this CPU, the 32
    steps of a bisection 1.3 ms (2026-12-04)."""
    v = logits.shape[-1]
    # top-k: the k-th largest logit, on the order-preserving unsigned form
    b = jax.lax.bitcast_convert_type(logits + 0.0, jnp.uint32)  # -0 as +0
    key = jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(1 << 31))
    k = jnp.where((top_k > 0) & (top_k < v), top_k, v)[:, None]
    kth = _largest_at_least(
        key, lambda t: jnp.sum(key >= t, -1, keepdims=True) >= k, 32
    )
    w = jnp.where(key >= kth, w, 0.0)
    # top-p: the smallest weight tau whose mass at least it reaches the share
    # (w in [0, 1]: its bits are below 2^30 and ordered as the values)
    wb = jax.lax.bitcast_convert_type(w, jnp.uint32)
    target = top_p[:, None] * jnp.sum(w, -1, keepdims=True)
    tau_b = _largest_at_least(
        wb,
        lambda t: jnp.sum(jnp.where(wb >= t, w, 0.0), -1, keepdims=True) >= target,
        30,
    )
    tau = jax.lax.bitcast_convert_type(tau_b, jnp.float32)
    # of the weights equal to tau, the fewest, lowest ids first, that reach it
    above = jnp.sum(jnp.where(wb > tau_b, w, 0.0), -1, keepdims=True)
    need = jnp.ceil((target - above) / jnp.maximum(tau, jnp.finfo(jnp.float32).tiny))
    need = jnp.clip(need, 1.0, float(v)).astype(jnp.int32)  # v: all of them
    tied = wb == tau_b
    ids = jax.lax.broadcasted_iota(jnp.int32, w.shape, 1)
    bits = max(1, int(v - 1).bit_length())
    # the need-th tied id: the largest id whose tied ones before it are fewer
    last = _largest_at_least(
        ids.astype(jnp.uint32),
        lambda t: jnp.sum(tied & (ids < t.astype(jnp.int32)), -1, keepdims=True) < need,
        bits,
    ).astype(jnp.int32)
    keep = (wb > tau_b) | (tied & (ids <= last)) | (top_p[:, None] >= 1.0)
    return jnp.where(keep, w, 0.0)


def _draw_xla(logits, inv_t, min_p, r, top_k, top_p):
    nan = jnp.isnan(logits).any(-1)
    # np.argmax's first index of the largest, as a plain min-reduction: XLA's
    # argmax (a reduction over value and index pairs) took ~1.6 ms for 8
    # rows of 49k on this CPU
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    top = logits.max(-1, keepdims=True)
    greedy = jnp.min(jnp.where(logits == top, ids, logits.shape[-1]), -1)
    # the weights and their running sums only where a row samples: a step
    # of greedy rows is an argmax (SmolLM2, 8 rows on this CPU: the whole
    # draw took 2 ms a step, 2026-12-04)
    sampled = jax.lax.cond(
        jnp.any(inv_t > 0),
        _sampled,
        lambda logits, *_: jnp.full(logits.shape[:1], -1, jnp.int32),
        logits,
        inv_t,
        min_p,
        r,
        top_k,
        top_p,
    )
    out = jnp.where(inv_t == 0, greedy, sampled)
    return jnp.where((inv_t < 0) | nan, -1, out)


def _sampled(logits, inv_t, min_p, r, top_k, top_p):
    """Each row's sampled token (a row with no finite maximum: -1)."""
    hi = jax.lax.bitcast_convert_type(r[:, 0], jnp.uint32).astype(jnp.float32)
    lo = jax.lax.bitcast_convert_type(r[:, 1], jnp.uint32).astype(jnp.float32)
    u01 = hi * 2.0**-21 + lo * 2.0**-53  # r, rounded to float32
    m = logits.max(-1, keepdims=True)
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
    ids = jax.lax.broadcasted_iota(jnp.int32, w.shape, 1)
    last = jnp.max(jnp.where(w > 0, ids, -1), -1)
    return jnp.where(jnp.isfinite(m[:, 0]), jnp.minimum(idx, last), -1)
