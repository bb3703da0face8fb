"""Host-side sampling from float32 logits: greedy, temperature, top-k/p, min-p.

Where the CPU kernels are built they make every draw (cake.kernels.cpu.
sample_np, src/sample.cc), the same function a JAX head stage calls inside
its step, so that a token is the same wherever it is drawn: ~15 us for a
49k vocabulary against 45-65 in NumPy, 11-13 us with top-k 40, ~50 with
top-p alone, against NumPy's 110 us and 150-4250 (docs/performance.md).
NumPy's form below is the readable reference (and the fallback): the
same rules, its exp and sums rounded in another order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from cake.backends.base import Draw
from cake.errors import CakeError
from cake.kernels import cpu


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature 0 is greedy (argmax)."""

    temperature: float = 0.7
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.05  # 0.0: off; relative to the most likely token
    repetition_penalty: float = 1.0  # 1.0: off; HF's rule, over prompt and output
    seed: int | None = None
    # OpenAI's rule over the tokens drawn so far: logit -= count * frequency
    # + (count > 0) * presence; 0.0: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

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
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise CakeError(f"{name.replace('_', ' ')} must be in [-2, 2]")


class Sampler:
    """Draws tokens for one sequence; the same seed gives the same tokens.

    It remembers what it drew, for the presence and frequency penalties. A
    head stage can draw for it instead (`for_device`, then `record`): the same
    draw from the same random number.
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.drawn: dict[int, int] = {}  # token id -> times drawn
        self._buf: np.ndarray | None = None
        # spent by steps that have not drawn yet, the next draw's first
        self._rs: list[float] = []

    def __call__(self, logits: np.ndarray, previous: Iterable[int] = ()) -> int:
        tok = self._draw(logits, previous)
        self._count(tok)
        return tok

    def record(self, tok: int) -> None:
        """`tok` was drawn by a head stage from `for_device`'s first row."""
        self._count(tok)
        if self._rs:
            self._rs.pop(0)

    def _count(self, tok: int) -> None:
        self.drawn[tok] = self.drawn.get(tok, 0) + 1

    @property
    def device_drawable(self) -> bool:
        """Can a head stage draw the next token (a `Draw` row: no penalties in
        effect)?"""
        p = self.params
        return p.repetition_penalty == 1.0 and not (
            (p.presence_penalty or p.frequency_penalty) and self.drawn
        )

    @property
    def draws_ahead(self) -> bool:
        """Can a head stage draw the token after next before this one knows the
        next (no penalty, whose logits would depend on it)?"""
        p = self.params
        return p.repetition_penalty == 1.0 and not (
            p.presence_penalty or p.frequency_penalty
        )

    def for_device(self, ahead: int = 0) -> tuple[float, float, float, int, float]:
        """(temperature, min_p, r, top_k, top_p) of the next draw (`ahead`
        draws later: a step queued behind the next one's, see cake.engine),
        for a `Draw` row. r is the number the host draw would spend, in the
        same order; a step that fails before it draws gets the same one again
        (an exact replay after a worker's failure)."""
        p = self.params
        if p.temperature == 0:
            return 0.0, 0.0, 0.0, 0, 1.0
        while len(self._rs) <= ahead:
            self._rs.append(self.rng.random())
        return p.temperature, p.min_p, self._rs[ahead], p.top_k, p.top_p

    def _next_r(self) -> float:
        return self._rs.pop(0) if self._rs else self.rng.random()

    def _draw(self, logits: np.ndarray, previous: Iterable[int]) -> int:
        p = self.params
        logits = np.asarray(logits, dtype=np.float32)
        if p.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, previous, p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and self.drawn:
            logits = apply_openai_penalties(
                logits, self.drawn, p.presence_penalty, p.frequency_penalty
            )
        if p.temperature == 0:
            return int(np.argmax(logits))
        if self._buf is None or self._buf.shape != logits.shape:
            self._buf = np.empty_like(logits)
        return draw(
            logits, p.temperature, p.min_p, self._next_r(), p.top_k, p.top_p, self._buf
        )


def draw(
    logits: np.ndarray,
    temperature: float,
    min_p: float,
    r: float,
    top_k: int = 0,
    top_p: float = 1.0,
    buf: np.ndarray | None = None,
) -> int:
    """The token drawn from float32 `logits` (V,) at `temperature` > 0 where r
    (uniform in [0, 1)) falls in the running sum of the weights kept by top-k,
    top-p and min-p; `buf`, a float32 array like logits, spares an allocation.

    top-k keeps the logits at least the k-th largest (ties kept); top-p then
    the largest weights, ties by the lower token id first, up to the first
    whose running sum reaches top_p of those weights' total; min-p last, as
    a share of the top weight."""
    # the CPU kernels' draw where they are built: the one a head stage makes
    # (~50 us in NumPy for 49k logits, 13 % of a serving step at 8 streams;
    # ~200 with top-p)
    tok = cpu.sample_np(logits, temperature, min_p, r, top_k, top_p)
    if tok is not None:
        return tok
    # float32, in place in one buffer: ~0.1 ms for 49k logits. Where every
    # step allocated its arrays (196 KB each, mmap'ed and unmapped by malloc)
    # their page faults alone took 0.2 ms a row
    if buf is None or buf.shape != logits.shape:
        buf = np.empty_like(logits)
    z = np.divide(logits, np.float32(temperature), out=buf)
    if top_k and top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z[z < kth] = -np.inf
    z -= z.max()
    w = np.exp(z, out=z)  # probabilities times a constant; the top one is 1
    kept = _top_p_mask(w, top_p) if top_p < 1.0 else None
    if min_p > 0:  # probability >= min_p * the top one's
        w[w < np.float32(min_p)] = 0
    if kept is not None:
        w[~kept] = 0
    return _inverse_cdf(w, r)


def draw_rows(logits: np.ndarray, d: Draw) -> np.ndarray:
    """`d`'s tokens from float32 logits (B, V) on the host: int32 (B,), -1 for
    a row with a NaN, or none finite to sample by (what a head stage that
    draws gives; see Draw)."""
    out = np.empty(len(d.r), np.int32)
    rows = zip(d.temperature, d.min_p, d.r, d.top_k, d.top_p, strict=True)
    for i, (t, mp, r, k, p) in enumerate(rows):
        row = np.asarray(logits[i], dtype=np.float32)
        if np.isnan(row).any():
            out[i] = -1
        elif t == 0:
            out[i] = int(np.argmax(row))
        elif not np.isfinite(row.max()):
            out[i] = -1  # no finite maximum: no weights to draw by
        else:
            out[i] = draw(row, t, mp, r, k, p)
    return out


def _inverse_cdf(w: np.ndarray, r: float) -> int:
    """The index i where r * sum(w) falls in the running sum of weights `w`, never
    one of weight 0: blocks of 256 first (a full running sum of 49k float32s
    takes 0.1 ms), then the running sum inside the block."""
    starts = np.arange(0, w.size, _BLOCK)
    blocks = np.cumsum(np.add.reduceat(w, starts), dtype=np.float64)
    u = r * blocks[-1]
    b = min(int(np.searchsorted(blocks, u, side="right")), blocks.size - 1)
    while b > 0 and blocks[b] == blocks[b - 1]:  # rounding put u in an empty block
        b -= 1
    inner = np.cumsum(w[starts[b] : starts[b] + _BLOCK], dtype=np.float64)
    i = int(np.searchsorted(inner, u - (blocks[b - 1] if b else 0.0), side="right"))
    if i >= inner.size or w[starts[b] + i] == 0:  # rounding again: the last weight
        i = int(np.flatnonzero(w[starts[b] : starts[b] + _BLOCK])[-1])
    return int(starts[b]) + i


_BLOCK = 256


def _top_p_mask(w: np.ndarray, top_p: float) -> np.ndarray:
    """The smallest set of the largest weights, ties by the lower index first,
    whose mass reaches top_p of the total (always the first): sorted among the
    ~1024 largest first (every weight at least the 1024th), the whole
    vocabulary only when those do not reach it."""
    total = float(w.sum(dtype=np.float64))
    for k in (min(1024, w.size), w.size):
        if k < w.size:
            top = np.flatnonzero(w >= np.partition(w, w.size - k)[w.size - k])
        else:
            top = np.arange(w.size)
        order = top[np.argsort(-w[top], kind="stable")]  # top is in index order
        cum = np.cumsum(w[order], dtype=np.float64)
        if cum[-1] >= top_p * total or k == w.size:
            cut = int(np.searchsorted(cum, top_p * total)) + 1
            kept = np.zeros(w.size, bool)
            kept[order[:cut]] = True
            return kept
    raise AssertionError("unreachable")


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


def apply_openai_penalties(
    logits: np.ndarray, counts: dict[int, int], presence: float, frequency: float
) -> np.ndarray:
    """logits - count * frequency - (count > 0) * presence (OpenAI's definition)."""
    ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    n = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
    out = logits.copy()
    out[ids] -= n * frequency + presence
    return out


def top_logprobs(
    logits: np.ndarray, token: int, k: int
) -> tuple[float, list[tuple[int, float]]]:
    """(log-probability of `token`, the k most likely (id, log-probability)) under
    the model's own distribution: the raw logits, before any sampling setting."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max()
    lse = m + np.log(np.exp(x - m).sum())
    top: list[tuple[int, float]] = []
    if k > 0:
        k = min(k, x.size)
        idx = np.argpartition(-x, k - 1)[:k]
        idx = idx[np.argsort(-x[idx], kind="stable")]
        top = [(int(i), float(x[i] - lse)) for i in idx]
    return float(x[token] - lse), top


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()
