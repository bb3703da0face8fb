"""Tokens drawn inside a head stage's jitted step (see cake.backends.base.Draw).

Every head step that returns the last tokens' logits also takes a draw's
inputs, one row per sequence, and returns ids besides the logits; the stage
hands back whichever its Step asks for, so a draw costs no program of its own
(nor a compile). A row with inv_t < 0 draws nothing: a step that wants logits
pays nothing for the ids.

On the CPU with the kernels the draw is src/sample.cc's, the host sampler's
own function (cake.sampling.draw), from the same double r: the same token,
bit for bit. Elsewhere (GPU, TPU, a CPU without the kernels) it is XLA's:
weights exp((z - max) * inv_t), those under min_p set to 0, the token where
r * their sum falls in their float32 running sum: the same distribution,
but a draw can differ from the host's where r falls within rounding of a
boundary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cake.backends.base import Draw

_R_ONE = float(2**53)  # r = k / 2^53; numpy's random() is such a k


def host_inputs(d: Draw | None, batch: int) -> tuple[np.ndarray, ...]:
    """(inv_t f32 (B,), min_p f32 (B,), r (B, 2) int32): `d` as the step's
    inputs; rows of inv_t -1 (no draw) where `d` is None. r travels as the
    integer k of r = k / 2^53 in two 32-bit halves (high, low): a float32
    array would round it."""
    if d is None:
        return (
            np.full(batch, -1.0, np.float32),
            np.zeros(batch, np.float32),
            np.zeros((batch, 2), np.int32),
        )
    t = np.asarray(d.temperature, np.float64)
    # 1 / t rounded to float32, as the host sampler passes it; 0: greedy
    inv_t = np.divide(1.0, t, out=np.zeros_like(t), where=t != 0).astype(np.float32)
    k = np.asarray(d.r, np.float64) * _R_ONE
    bad = (k < 0) | (k >= _R_ONE) | (k != np.floor(k))
    if bad.any():
        raise ValueError(
            f"r={d.r[int(bad.argmax())]!r} is not a multiple of 2^-53 in [0, 1)"
        )
    k = k.astype(np.uint64)
    r = np.stack([k >> np.uint64(32), k & np.uint64(0xFFFFFFFF)], 1).astype(np.uint32)
    return inv_t, np.asarray(d.min_p, np.float32), r.view(np.int32)


def avals(batch: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    """What `host_inputs` gives, for lowering a step."""
    return (
        jax.ShapeDtypeStruct((batch,), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.float32),
        jax.ShapeDtypeStruct((batch, 2), jnp.int32),
    )


def draw_tokens(logits, inv_t, min_p, r, *, kernel: bool):
    """int32 ids (B,) for float32 logits (B, V) (traced; see the module)."""
    if kernel:
        from cake.kernels import cpu

        return cpu.sample_ffi(logits, inv_t, min_p, r)
    return jax.lax.cond(
        jnp.any(inv_t >= 0),
        _draw_xla,
        lambda logits, inv_t, min_p, r: jnp.full(inv_t.shape, -1, jnp.int32),
        logits,
        inv_t,
        min_p,
        r,
    )


def _draw_xla(logits, inv_t, min_p, r):
    v = logits.shape[-1]
    hi = jax.lax.bitcast_convert_type(r[:, 0], jnp.uint32).astype(jnp.float32)
    lo = jax.lax.bitcast_convert_type(r[:, 1], jnp.uint32).astype(jnp.float32)
    u01 = hi * 2.0**-21 + lo * 2.0**-53  # r, rounded to float32
    nan = jnp.isnan(logits).any(-1)
    m = logits.max(-1, keepdims=True)
    greedy = jnp.argmax(logits, -1).astype(jnp.int32)
    w = jnp.exp((logits - m) * jnp.maximum(inv_t, 0.0)[:, None])
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
