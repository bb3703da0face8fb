"""Overlap: the engine's decode steps dispatched, read one round later.

`Engine.overlap` (by default where the pipeline is one local stage
whose steps run after their call returns: JAX on a GPU or TPU, or on XLA's
attention path on the CPU; see JaxLlamaStage.asynchronous): a decode step whose
tokens the head stage draws is dispatched, not waited for; the next round
queues the step after it on the device, fed with its ids where they are,
before it reads its tokens and turns them into text. So the host's work per
token (text, stop strings, events, the next Step) runs while the device
computes. A sequence that ends on a token (EOS, a stop string) has had one
more step queued: its row is dropped, and its cache holds one position more
than the engine counts (a later prefix rewinds over it). The tokens are the
same as without overlap.

`Overlap` holds the engine's half of it (dispatch, chain, collect, drain);
cake.engine decides when a step goes this way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from cake.backends.base import Draw, Step
from cake.sequence import Sequence


@dataclass(eq=False)
class Ahead:
    """A dispatched decode step whose tokens are not read yet (see overlap)."""

    seqs: list[Sequence]
    runs: list[Any]  # the engine's _Run of each
    positions: tuple[int, ...]
    handle: Any  # Pipeline.dispatch's
    started: float
    compiled: float  # seconds its dispatch waited for a compilation


class Overlap:
    """Engine methods for dispatched steps: the Engine provides pipeline,
    pool, observer, _ahead and the per-token methods _fail, _fed, _drawn."""

    def _dispatch(self, seqs: list[Sequence], x, step: Step) -> Ahead | None:
        """Dispatch `step` (overlap); None if it failed (its requests with it)."""
        t, compiled = time.perf_counter(), self.pipeline.compile_s
        try:
            handle = self.pipeline.dispatch(x, step)
        except Exception as e:  # the stage's error: these requests fail
            for s in seqs:
                self._fail(s, e)
            return None
        runs = [s.owner for s in seqs]
        return Ahead(
            seqs, runs, step.positions, handle, t, self.pipeline.compile_s - compiled
        )

    def _chain(self, ahead: Ahead) -> Ahead | None:
        """Dispatch the decode step after `ahead`'s, fed with its drawn ids on
        the device, where the same sequences go on: none has been cancelled
        or would end by its length, none has a penalty (its next draw would
        depend on the token not read yet), no other sequence is ready to
        decode (it joins them, in a step of its own after this round's
        read). Else None: the next step waits for `ahead`'s tokens."""
        busy = ahead.seqs
        if any(s.pending == 1 and s not in busy for s in self.pool.running):
            return None
        ctx = self.pipeline.max_context
        for s, run, p in zip(ahead.seqs, ahead.runs, ahead.positions, strict=True):
            req = run.request
            if (
                s.owner is not run
                or req.cancelled
                or not run.sampler.draws_ahead
                or run.generated + 2 > req.max_tokens
                or p + 2 > ctx
            ):
                return None
        rows = [run.sampler.for_device(ahead=1) for run in ahead.runs]
        step = Step(
            tuple(s.seq_id for s in ahead.seqs),
            tuple(p + 1 for p in ahead.positions),
            (1,) * len(ahead.seqs),
            draw=Draw(*(tuple(col) for col in zip(*rows, strict=True))),
        )
        return self._dispatch(ahead.seqs, ahead.handle, step)

    def _collect(self, ahead: Ahead) -> None:
        """Read `ahead`'s tokens (waiting for its step) and take them, for the
        sequences whose requests still run."""
        live = [
            (i, s)
            for i, (s, run) in enumerate(zip(ahead.seqs, ahead.runs, strict=True))
            if s.owner is run
        ]
        try:
            ids = ahead.handle.result()
        except Exception as e:  # the stage's error: these requests fail
            for _, s in live:
                self._fail(s, e)
            return
        b = len(ahead.seqs)
        self.observer.step("decode", b, b, time.perf_counter() - ahead.started)
        self._fed([s for _, s in live], 1, ahead.compiled)
        for i, s in live:
            self._drawn(s, int(ids[i]))

    def _drain(self) -> None:
        """Wait for a dispatched step and take its tokens (none runs after)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            self._collect(ahead)
