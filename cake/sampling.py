"""Host-side sampling from float32 logits (NumPy): greedy, temperature, top-k/p, min-p."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from cake.errors import CakeError


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature 0 is greedy (argmax)."""

    temperature: float = 0.7
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.05  # 0.0: off; relative to the most likely token
    repetition_penalty: float = 1.0  # 1.0: off; HF's rule
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise CakeError("temperature must be >= 0")
        if self.top_k < 0:
            raise CakeError("top-k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise CakeError("top-p must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise CakeError("min-p must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise CakeError("repetition penalty must be > 0")


class Sampler:
    """Draws tokens for one sequence; the same seed gives the same tokens."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, previous: Iterable[int] = ()) -> int:
        p = self.params
        logits = np.asarray(logits, dtype=np.float32)
        if p.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, previous, p.repetition_penalty)
        if p.temperature == 0:
            return int(np.argmax(logits))
        logits = logits.astype(np.float64) / p.temperature
        keep = np.ones(logits.shape, bool)
        if p.top_k:
            k = min(p.top_k, logits.size)
            kth = np.partition(logits, -k)[-k]
            keep &= logits >= kth
        probs = _softmax(np.where(keep, logits, -np.inf))
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            # keep the smallest prefix whose mass reaches top_p (always the first)
            cut = int(np.searchsorted(cum, p.top_p)) + 1
            mask = np.zeros_like(keep)
            mask[order[:cut]] = True
            keep &= mask
        if p.min_p > 0:
            keep &= probs >= p.min_p * probs.max()
        probs = _softmax(np.where(keep, logits, -np.inf))
        return int(self.rng.choice(probs.size, p=probs))


def apply_repetition_penalty(
    logits: np.ndarray, previous: Iterable[int], penalty: float
) -> np.ndarray:
    ids = np.unique(np.fromiter(previous, dtype=np.int64))
    if ids.size == 0:
        return logits
    out = logits.copy()
    sel = out[ids]
    out[ids] = np.where(sel > 0, sel / penalty, sel * penalty)
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()
