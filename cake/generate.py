"""Prefill then KV-cache decode for one sequence, streaming text as it is produced."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from cake.backends.base import Step
from cake.errors import ContextLengthError, NetworkError
from cake.pipeline import Pipeline, StageReset
from cake.sampling import Sampler, SamplingParams

PREFILL_CHUNK = 512  # prompt tokens per forward call: bounds activation memory
MAX_REPLAYS = 5  # replays of one step after stages lost their caches


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    first_token_s: float = 0.0
    stop_reason: str = ""  # "eos", "stop", "max_tokens", "context"

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["prompt_tokens_per_s"] = self.prompt_tokens_per_s
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        return d


@dataclass
class Generator:
    """Runs one sequence at a time through a pipeline, reusing its cached prefix.

    The ids of what is in the cache are remembered, so a chat turn re-sends only
    what follows the common prefix.
    """

    pipeline: Pipeline
    tokenizer: object
    seq_id: int = 0
    stats: GenerationStats = field(default_factory=GenerationStats)
    _cached: list[int] = field(default_factory=list)

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
    ) -> Iterator[str]:
        """Yield text pieces of the continuation of `prompt_ids`."""
        prompt_ids = list(prompt_ids)
        ctx = self.pipeline.max_context
        if not prompt_ids:
            raise ContextLengthError("the prompt is empty")
        if len(prompt_ids) >= ctx:
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens but the context holds "
                f"{ctx}; shorten it or raise --context"
            )
        self.stats = st = GenerationStats(prompt_tokens=len(prompt_ids))
        sampler = Sampler(params)
        eos = self.tokenizer.eos_token_ids
        decoder = self.tokenizer.stream_decoder()
        stops = _StopMatcher(stop)
        t0 = time.perf_counter()
        logits = self._prefill(prompt_ids)
        ids = list(prompt_ids)
        st.prompt_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        n = 0
        while True:
            tok = sampler(logits, ids)
            ids.append(tok)
            n += 1
            if n == 1:
                st.first_token_s = time.perf_counter() - t0
            if tok in eos:
                st.stop_reason = "eos"
                break
            text, hit = stops.push(decoder.push(tok))
            if text:
                yield text
            if hit:
                st.stop_reason = "stop"
                break
            if n >= max_tokens:
                st.stop_reason = "max_tokens"
                break
            if len(ids) > ctx:  # the next step would write past the cache
                st.stop_reason = "context"
                break
            logits = self._step([tok], len(ids) - 1)
        st.decode_tokens = n
        st.decode_s = time.perf_counter() - t1
        # _step keeps _cached: the last sampled token was never fed through the model.
        if st.stop_reason != "stop":
            tail, _ = stops.push(decoder.flush(), final=True)
            if tail:
                yield tail

    def release(self) -> None:
        self.pipeline.release([self.seq_id])
        self._cached = []

    def _prefill(self, ids: list[int]) -> np.ndarray:
        common = 0
        for a, b in zip(self._cached, ids[:-1], strict=False):
            if a != b:
                break
            common += 1
        return self._step(ids[common:], common)

    def _step(self, tokens: list[int], pos: int) -> np.ndarray:
        """Feed `tokens` at `pos` in chunks; the logits (V,) of the last one.

        `_cached` holds the ids fed so far. When a stage loses its caches (a worker
        came back after a failure) everything is replayed from position 0, so the
        result is the same as without the failure.
        """
        ids = self._cached  # grown in place: no copy of the history per token
        del ids[pos:]
        ids.extend(tokens)
        try:
            for _ in range(MAX_REPLAYS + 1):
                try:
                    logits = None
                    while pos < len(ids):
                        chunk = ids[pos : pos + PREFILL_CHUNK]
                        logits = self._forward(chunk, pos)
                        pos += len(chunk)
                    return logits
                except StageReset:
                    pos = 0
            raise NetworkError(
                f"a worker lost its caches {MAX_REPLAYS + 1} times in one step; "
                "check the workers' logs"
            )
        finally:
            del ids[pos:]  # keep exactly what the stages hold, even after an error

    def _forward(self, tokens: list[int], pos: int) -> np.ndarray:
        step = Step((self.seq_id,), (pos,), (len(tokens),))
        return self.pipeline.forward(np.array([tokens], np.int32), step)[0]


class _StopMatcher:
    """Holds back text that could be the start of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str, final: bool = False) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was hit)."""
        self.pending += text
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0:
                out, self.pending = self.pending[:i], ""
                return out, True
        if final or not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False
