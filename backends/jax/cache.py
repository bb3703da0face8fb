"""The KV cache pool of a JAX stage: fixed-shape device buffers, slots kept on the host.

The buffer holds `max_sequences` slots x `max_context` positions for every layer
and never changes shape, so a step compiles once per (batch, length bucket,
cache bucket), or once per (batch, length bucket) where the CPU attention kernel
reads the cache. Which slot a sequence uses and how many tokens it holds lives
here, on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from cake.kv import CacheFullError

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
    with jax.default_device(device):
        return jnp.zeros(shape, dtype)


class SlotPool:
    """seq_id -> slot in the cache buffers, and how many tokens each sequence holds."""

    def __init__(self, max_sequences: int) -> None:
        self.free = list(range(max_sequences - 1, -1, -1))
        self.slot: dict[int, int] = {}
        self.length: dict[int, int] = {}

    def acquire(self, seq_ids: Sequence[int]) -> list[int]:
        """Slots for `seq_ids`, taking a free one for each sequence not yet held."""
        new = [s for s in seq_ids if s not in self.slot]
        if len(new) > len(self.free):
            raise CacheFullError(
                f"the KV cache is full: {len(self.slot)} sequences held; "
                "release finished sequences first"
            )
        for s in new:
            self.slot[s] = self.free.pop()
            self.length[s] = 0
        return [self.slot[s] for s in seq_ids]

    def release(self, seq_ids: Sequence[int]) -> None:
        for s in seq_ids:
            if s in self.slot:
                self.free.append(self.slot.pop(s))
                del self.length[s]
