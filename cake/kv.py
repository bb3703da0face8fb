"""Checks every backend applies to a Step before touching its KV caches."""

from __future__ import annotations

from collections.abc import Mapping

import ml_dtypes
import numpy as np

from cake.backends.base import Step
from cake.config import ModelConfig
from cake.errors import CakeError, ContextLengthError
from cake.shard import Shard

DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}


def dtype_of(name: str) -> np.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise CakeError(
            f"unknown dtype {name!r}: use float32, bfloat16 or float16"
        ) from None


class CacheFullError(CakeError):
    """A stage holds as many sequences as its cache allows."""


def check_step(
    step: Step,
    x: np.ndarray,
    shard: Shard,
    config: ModelConfig,
    cached: Mapping[int, int],
    max_context: int,
    max_sequences: int,
) -> None:
    """Raise a CakeError if `x`/`step` do not fit the stage or its caches.

    cached: seq_id -> tokens currently in that sequence's cache.
    """
    want = (
        (step.batch, step.max_len)
        if shard.embed
        else (step.batch, step.max_len, config.hidden_size)
    )
    if tuple(x.shape) != want:
        raise CakeError(
            f"input of shape {tuple(x.shape)} does not match the step {want}"
        )
    if shard.embed and x.size and (x.min() < 0 or x.max() >= config.vocab_size):
        raise CakeError(
            f"token ids must be in [0, {config.vocab_size}): got "
            f"{x.min()}..{x.max()}; is the tokenizer the model's own?"
        )
    new = [s for s in step.seq_ids if s not in cached]
    if len(cached) + len(new) > max_sequences:
        raise CacheFullError(
            f"the KV cache is full: {len(cached)} sequences held, at most "
            f"{max_sequences}; release finished sequences first"
        )
    for sid, pos, n in zip(step.seq_ids, step.positions, step.lengths, strict=True):
        have = cached.get(sid, 0)
        if pos > have:
            raise CakeError(f"sequence {sid} is at position {have}, not {pos}")
        if pos + n > max_context:
            raise ContextLengthError(
                f"sequence {sid} needs {pos + n} positions but the context holds "
                f"{max_context}"
            )
