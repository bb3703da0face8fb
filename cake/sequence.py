"""A sequence as the master sees it, and the pool of them the stages' caches hold.

One `Sequence` is the one home of a sequence's state on the master: its id in
every stage's KV cache, the token ids fed (or to feed) in order, how many of
them the stages hold, and the request that owns it. The engine (cake.engine)
builds every Step from these, so batching, release and replay read the same
numbers. A finished request's sequence is parked with its cache: a request
whose prompt starts with the same ids (a conversation's next turn) takes it
over and feeds only what follows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
