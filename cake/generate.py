"""One stream at a time in the caller's thread, on top of the engine (cake.engine).

`cake run` and the Python API generate this way; `cake serve` runs the same
engine in a thread of its own with many sequences.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from cake.engine import Engine
from cake.pipeline import Pipeline
from cake.request import Request
from cake.sampling import SamplingParams
from cake.stats import GenerationStats


class Generator:
    """Generates for one sequence at a time, reusing its cached prefix: a chat
    turn feeds only what follows the ids the cache already holds."""

    def __init__(self, pipeline: Pipeline, tokenizer, max_sequences: int = 1) -> None:
        self.engine = Engine(pipeline, tokenizer, max_sequences=max_sequences)
        self.stats = GenerationStats()

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
    ) -> Iterator[str]:
        """Yield text pieces of the continuation of `prompt_ids`."""
        req = Request(list(prompt_ids), params, max_tokens, tuple(stop))
        events = self.engine.events(req)
        first = next(events)  # submits: a CakeError for a bad prompt comes here
        self.stats = req.stats
        for ev in _chain(first, events):
            if ev.error is not None:
                raise ev.error
            if ev.text:
                yield ev.text

    def release(self) -> None:
        self.engine.close()


def _chain(first, rest):
    yield first
    yield from rest
