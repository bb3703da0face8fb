"""Activation dtypes, and the input checks every backend applies to a Step."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from cake.backends.base import Step
from cake.config import ModelConfig
from cake.errors import CakeError
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


def check_step(step: Step, x: np.ndarray, shard: Shard, config: ModelConfig) -> None:
    """Raise a CakeError if `x` does not match `step` and the stage's shard (the
    checks against what the caches hold are `StageSequences.admit`'s)."""
    want = (
        (step.batch, step.max_len)
        if shard.embed
        else (step.batch, step.max_len, config.hidden_size)
    )
    if tuple(x.shape) != want:
        raise CakeError(
            f"input of shape {tuple(x.shape)} does not match the step {want}"
        )
    if shard.embed and x.size:
        # a decode step's few ids: min/max of a list, not two NumPy reductions
        # (~15 us each on this project's 2-core VM, on every step's path)
        if x.size <= 1024:
            flat = x.ravel().tolist()
            lo, hi = min(flat), max(flat)
        else:
            lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= config.vocab_size:
            raise CakeError(
                f"token ids must be in [0, {config.vocab_size}): got "
                f"{lo}..{hi}; is the tokenizer the model's own?"
            )
