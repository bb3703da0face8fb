"""What a caller hands the engine (cake.engine) and what it gets back: a
Request, the Events of its generation, the Observer hooks a server counts
metrics with, and the error of a full queue."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from cake.errors import CakeError
from cake.sampling import SamplingParams
from cake.stats import GenerationStats


class QueueFullError(CakeError):
    """Every sequence runs and the waiting queue is full."""


@dataclass(frozen=True)
class TokenLogprob:
    """A drawn token's log-probability and the most likely alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Event:
    """What one request got from one step: new text and token ids; `finish` is set
    on its last event (a GenerationStats.stop_reason), `error` when it failed."""

    text: str = ""
    tokens: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish: str | None = None
    error: BaseException | None = None


@dataclass(eq=False)
class Request:
    """One generation: prompt ids, how to sample, when to stop.

    logprobs: None, or k: each token's log-probability with k alternatives (of
      the distribution sampled from: under a grammar, the tokens it allows).
    grammar: None, or a grammar (cake.grammar) every drawn token must follow.
    on_event: called from the engine's thread with each Event.
    """

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    grammar: str | None = None
    on_event: Callable[[Event], None] | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)
    done: bool = False
    cancelled: bool = False
    submitted: float = 0.0


class Observer:
    """Hooks the engine calls (from its thread); cake.server counts metrics here."""

    def step(self, kind: str, batch: int, tokens: int, seconds: float) -> None:
        """A forward call: kind "decode" or "prefill", sequences, ids fed."""

    def first_token(self, req: Request) -> None: ...

    def finished(self, req: Request) -> None: ...


def emit(req: Request, ev: Event) -> None:
    """Hand `ev` to the request's callback, if it has one."""
    if req.on_event is not None:
        req.on_event(ev)
