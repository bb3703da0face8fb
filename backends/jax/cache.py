"""The KV cache of a JAX stage: one fixed-shape device buffer, and its buckets.

The buffer holds `max_sequences` slots x `max_context` positions for every layer
and never changes shape, so a step compiles once per (batch, length bucket,
cache bucket), or once per (batch, length bucket) where the CPU attention kernel
reads the cache. Which slot a sequence uses and how many positions it holds is
the stage's `StageSequences` (cake.sequence), on the host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# XLA's attention (GPUs, TPUs, CPU prefills of 64+ tokens; the CPU attention
# kernel takes lengths at run time and has no buckets) reads at least this many
# cache positions: fewer, larger buckets.
# Each new bucket costs a step compilation (~1.4 s per process from the disk
# cache, 4-7 s cold, for SmolLM2 on 2 cores); with 64, a 39-token prompt and 128
# new tokens crossed two buckets and `cake run` reported 11-24 tok/s instead of
# 27-29. Reading 256 positions instead of 64 adds at most ~2 % of the weight
# bytes per token for SmolLM2 (KV is 1.5 KB a position and layer) and far less
# for larger models; decode tok/s did not move beyond the noise.
MIN_CACHE_BUCKET = 256


def bucket(n: int, cap: int | None = None, floor: int = 1) -> int:
    """The smallest power of two >= max(n, floor), capped at `cap`."""
    b = max(floor, 1 << max(n - 1, 0).bit_length())
    return min(b, cap) if cap is not None else b


def allocate(
    n_layers: int,
    max_sequences: int,
    n_kv: int,
    max_context: int,
    head_dim: int,
    dtype: jnp.dtype,
    device: jax.Device,
) -> jax.Array:
    """The zeroed KV buffer (n_layers, 2, max_sequences, n_kv, max_context, head_dim).

    One buffer for every layer's k and v: one donated argument per step, not
    two per layer (each argument costs host time at every dispatch).
    """
    shape = (n_layers, 2, max_sequences, n_kv, max_context, head_dim)
    # committed to the device, as every step's output is: an uncommitted first
    # buffer made the first step compile for it, and the next step (whose cache
    # is that step's committed output) compile once more, 0.1 s after a token
    return jnp.zeros(shape, dtype, device=device)
