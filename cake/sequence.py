"""A sequence as the master sees it and as a stage holds it.

Master side: one `Sequence` is the one home of a sequence's state: its id in
every stage's KV cache, the token ids fed (or to feed) in order, how many of
them the stages hold, and the request that owns it. The engine (cake.engine)
builds every Step from these, so batching, release and replay read the same
numbers. A finished request's sequence is parked with its cache: a request
whose prompt starts with the same ids (a conversation's next turn) takes it
over and feeds only what follows.

Stage side: `StageSequences` is what one stage's caches hold of each sequence
(its slot and how many positions), the same in every backend, in the embedding
stage and, through its stages, in a worker (which only maps each master's ids
to its own). A Step is checked against it before any cache is touched, so a
stage and the master can never disagree silently about a position.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cake.errors import CacheFullError, ContextLengthError, PositionError

if TYPE_CHECKING:
    from cake.backends.base import Step


@dataclass(eq=False)
class Sequence:
    """seq_id: the stages' cache id; tokens: every id fed or still to feed;
    cached: how many of `tokens` the stages hold; owner: the request that runs
    it (None: parked, its cache kept for a later prefix)."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    cached: int = 0
    owner: Any = None
    used: int = 0  # when it last ran (the pool's clock), for eviction

    @property
    def pending(self) -> int:
        """Tokens still to feed before the next logits."""
        return len(self.tokens) - self.cached

    def feed(self, n: int) -> list[int]:
        """The next `n` tokens to feed (the caller advances `cached` after the step)."""
        return self.tokens[self.cached : self.cached + n]


class SequencePool:
    """`size` sequences (the stages' max_sequences): free, running or parked."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a sequence pool needs at least one sequence")
        self.size = size
        self._free = list(range(size - 1, -1, -1))  # pop() gives 0 first
        self._parked: dict[int, Sequence] = {}
        self.running: list[Sequence] = []
        self._clock = 0

    @property
    def parked(self) -> list[Sequence]:
        return list(self._parked.values())

    def has_room(self) -> bool:
        return bool(self._free or self._parked)

    def idle(self) -> int:
        """Sequences a request could take now (free or parked)."""
        return self.size - len(self.running)

    def take(self, prompt: list[int], owner: Any) -> tuple[Sequence, int] | None:
        """A sequence for `prompt` and the number of its ids already cached, or None
        when every sequence runs.

        A parked sequence sharing the longest prefix is taken over (at least one
        prompt id is left to feed: its logits start the answer); else a free one;
        else the parked one unused the longest, whose cache is overwritten.
        """
        best, common = None, 0
        for s in self._parked.values():
            n = _common_prefix(s.tokens, s.cached, prompt)
            if n > common:
                best, common = s, n
        if best is None:
            if self._free:
                best = Sequence(self._free.pop())
            elif self._parked:
                best = min(self._parked.values(), key=lambda s: s.used)
            else:
                return None
        self._parked.pop(best.seq_id, None)
        best.tokens = list(prompt)
        best.cached = common
        best.owner = owner
        self.touch(best)
        self.running.append(best)
        return best, common

    def touch(self, s: Sequence) -> None:
        self._clock += 1
        s.used = self._clock

    def park(self, s: Sequence) -> None:
        """`s` finished: keep what the stages hold of it for a later prefix."""
        self.running.remove(s)
        del s.tokens[s.cached :]  # the last drawn token was never fed
        s.owner = None
        self._parked[s.seq_id] = s

    def drop(self, s: Sequence) -> None:
        """Forget `s` (its cache is unusable); its id is free again."""
        if s in self.running:
            self.running.remove(s)
        self._parked.pop(s.seq_id, None)
        s.tokens, s.cached, s.owner = [], 0, None
        self._free.append(s.seq_id)

    def forget_parked(self) -> list[int]:
        """Drop every parked sequence (the stages lost their caches); their ids."""
        ids = list(self._parked)
        for s in list(self._parked.values()):
            self.drop(s)
        return ids


def _common_prefix(tokens: list[int], cached: int, prompt: list[int]) -> int:
    """Ids of `prompt` the cache already holds (leaving one to feed)."""
    limit = min(cached, len(prompt) - 1)
    n = 0
    while n < limit and tokens[n] == prompt[n]:
        n += 1
    return n


class StageSequences:
    """The sequences one stage's KV caches hold: seq_id -> slot (a row of
    preallocated cache buffers, in 0..max_sequences) and positions held."""

    def __init__(self, max_sequences: int, max_context: int) -> None:
        self.max_sequences, self.max_context = max_sequences, max_context
        self.slot: dict[int, int] = {}
        self.length: dict[int, int] = {}
        self._free = list(range(max_sequences - 1, -1, -1))  # pop() gives 0 first

    def __len__(self) -> int:
        return len(self.slot)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self.slot

    def check(self, step: Step) -> None:
        """Raise unless `step` fits: room for its new sequences, each position at
        most what is held (below it rewinds), the context not exceeded."""
        new = sum(1 for s in set(step.seq_ids) if s not in self.slot)
        if new > len(self._free):
            raise CacheFullError(
                f"the KV cache is full: {len(self.slot)} sequences held, at most "
                f"{self.max_sequences}; release finished sequences first"
            )
        for sid, pos, n in zip(step.seq_ids, step.positions, step.lengths, strict=True):
            have = self.length.get(sid, 0)
            if pos > have:
                raise PositionError(sid, have, pos)
            if pos + n > self.max_context:
                raise ContextLengthError(
                    f"sequence {sid} needs {pos + n} positions but the context "
                    f"holds {self.max_context}"
                )

    def admit(self, step: Step) -> list[int]:
        """`check`, then the slot of each of the step's sequences (new ones take a
        free slot, holding 0 positions until `advance`)."""
        self.check(step)
        for s in step.seq_ids:
            if s not in self.slot:
                self.slot[s] = self._free.pop()
                self.length[s] = 0
        return [self.slot[s] for s in step.seq_ids]

    def advance(self, step: Step) -> None:
        """The step ran: each sequence holds its positions up to the step's end."""
        for sid, pos, n in zip(step.seq_ids, step.positions, step.lengths, strict=True):
            self.length[sid] = pos + n

    def release(self, seq_ids: Iterable[int]) -> None:
        """Forget these sequences (unknown ids are ignored); their slots are free."""
        for s in seq_ids:
            if s in self.slot:
                self._free.append(self.slot.pop(s))
                del self.length[s]
