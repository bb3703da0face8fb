"""The continuous-batching engine: requests in, tokens out, one pipeline.

Each `step()`:

1. finishes cancelled requests and admits waiting ones into free sequences
   (cake.sequence), reusing a parked sequence's cache where it shares the
   prompt's prefix (a conversation's next turn);
2. runs one decode Step for every sequence with one token to feed: the whole
   batch travels through the pipeline as one Step per stage;
3. feeds one prefill chunk (Pipeline.prefill_chunk ids) of the prompt with the
   fewest ids left: prompts are fed chunk by chunk between decode steps, so
   running streams keep flowing;
and draws a token for every sequence whose ids are all fed.

Overlap (`Engine.overlap`): see cake.overlap.

Admission is by sequence: the stages allocate their KV caches for
`max_sequences` sequences of the full context when they load, so a request
that gets a sequence never runs out of cache memory; the others wait in a
queue of at most `max_waiting` (then QueueFullError).

Replay: a stage that lost its caches (a worker came back) raises StageReset;
every running sequence goes back to position 0 and is fed again (its ids are
all known), parked ones are forgotten. The output is unchanged.

The engine runs in the caller's thread (`events`, as `cake run` uses it) or in
a background thread of its own (`start`, as `cake serve` does); `submit` and
`cancel` may be called from any thread.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from cake.backends.base import Draw, Step
from cake.errors import CakeError, ContextLengthError, NetworkError
from cake.grammar import Constraint, GrammarError, Grammars
from cake.overlap import Ahead, Overlap
from cake.pipeline import Pipeline, StageReset
from cake.request import Event, Observer, QueueFullError, Request, TokenLogprob, emit
from cake.sampling import Sampler, top_logprobs
from cake.sequence import Sequence, SequencePool
from cake.stats import GenerationStats
from cake.stops import StopMatcher
from cake.warmup import prefill_widths, step_shapes

MAX_REPLAYS = 5  # replays in a row after stages lost their caches


@dataclass(eq=False)
class _Run:
    """A running request's generation state (the owner of its Sequence)."""

    request: Request
    sampler: Sampler
    decoder: object
    stops: StopMatcher
    started: float
    constraint: Constraint | None = None
    generated: int = 0
    prefilled: float = 0.0


class Engine(Overlap):
    """Schedules requests over `max_sequences` sequences of one pipeline.

    max_sequences must not exceed what every stage was loaded with.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        tokenizer,
        *,
        max_sequences: int = 1,
        max_waiting: int = 64,
        prefill_chunk: int | None = None,
        observer: Observer | None = None,
        overlap: bool | None = None,
    ) -> None:
        self.pipeline, self.tokenizer = pipeline, tokenizer
        # the head stage draws where it can (see _step_draw); CAKE_STAGE_DRAW=0
        # draws every token here, from the logits (to measure the difference)
        self.stage_draws = os.environ.get("CAKE_STAGE_DRAW", "1") != "0"
        # overlap (see cake.overlap): the pipeline's choice unless told;
        # CAKE_OVERLAP=0/1 overrides both (to measure the difference)
        env = os.environ.get("CAKE_OVERLAP")
        if env in ("0", "1"):
            overlap = env == "1"
        elif overlap is None:
            overlap = pipeline.asynchronous
        self.overlap = overlap and pipeline.can_dispatch
        self._ahead: Ahead | None = None
        self.pool = SequencePool(max_sequences)
        self.max_waiting = max_waiting
        self.prefill_chunk = prefill_chunk or pipeline.prefill_chunk
        self.observer = observer or Observer()
        self._eos = frozenset(tokenizer.eos_token_ids)
        self.grammars = Grammars(tokenizer)
        self._waiting: deque[Request] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stepping = threading.Lock()
        self._resets = 0
        self._thread: threading.Thread | None = None
        self._closing = False  # no more requests
        self._stopping = False  # the thread ends

    # -- any thread ---------------------------------------------------------

    def submit(self, req: Request) -> Request:
        """Queue `req`; a CakeError now if it cannot run (empty or too long a
        prompt, a full queue)."""
        n, ctx = len(req.prompt_ids), self.pipeline.max_context
        if not n:
            raise ContextLengthError("the prompt is empty")
        if n >= ctx:
            raise ContextLengthError(
                f"the prompt has {n} tokens but the context holds {ctx}; "
                "shorten it or raise --context"
            )
        if req.max_tokens < 1:
            raise CakeError("max_tokens must be at least 1")
        with self._lock:
            if self._closing:
                raise CakeError("the engine is shutting down")
            # the queue holds max_waiting beyond what idle sequences take next
            if len(self._waiting) >= self.max_waiting + self.pool.idle():
                raise QueueFullError(
                    f"{self.pool.size} sequences are running and "
                    f"{len(self._waiting)} requests wait; try again later"
                )
            req.stats = GenerationStats(prompt_tokens=n)
            req.submitted = time.perf_counter()
            self._waiting.append(req)
            self._wake.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop `req` before the next step; its sequence is parked (cache kept)."""
        req.cancelled = True
        with self._lock:
            self._wake.notify()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self.pool.running)

    # -- the stepping thread ------------------------------------------------

    def events(self, req: Request) -> Iterator[Event]:
        """Submit `req` and step the engine in this thread until it finishes;
        its events. Closing the iterator early cancels the request."""
        got: deque[Event] = deque()
        req.on_event = got.append
        self.submit(req)
        try:
            while True:
                while not got:
                    if not self.step() and not got:
                        raise CakeError("the engine stopped before the request ended")
                ev = got.popleft()
                yield ev
                if ev.finish is not None:
                    return
        finally:
            if not req.done:
                self.cancel(req)
                with self._stepping:
                    self._reap()

    def warm_up(
        self, batches: Iterable[int] | None = None, widths: Iterable[int] | None = None
    ) -> tuple[int, float]:
        """Run once every step shape this engine will send, so that no generation
        waits for a compilation (a JAX stage compiles each new shape: 0.1-0.3 s
        each for SmolLM2 on 2 cores, from the persistent cache or not): decode
        steps of `batches` sequences (default 1..max_sequences), and prefill
        chunks of one sequence of `widths` ids (default: every width the stages
        pad to, powers of two up to prefill_chunk). Nothing may run; parked
        sequences are forgotten. (steps, seconds); no steps where no stage
        compiles."""
        if not self.pipeline.compiles:
            return 0, 0.0
        t0 = time.perf_counter()
        with self._stepping:
            if self.pool.running or self._waiting:
                raise CakeError("warm_up needs an idle engine")
            self._drain()
            ids = self.pool.forget_parked()
            if ids:
                self.pipeline.release(ids)
            if batches is None:
                batches = range(1, self.pool.size + 1)
            if widths is None:
                widths = prefill_widths(self.prefill_chunk)
            shapes = step_shapes(batches, widths)
            for b, n in shapes:  # the pool's own ids: all free now
                seqs = tuple(range(b))
                self.pipeline.forward(
                    np.zeros((b, n), np.int32), Step(seqs, (0,) * b, (n,) * b)
                )
                self.pipeline.release(seqs)
        return len(shapes), time.perf_counter() - t0

    def step(self) -> bool:
        """One round: admit, one decode step, one prefill chunk. False if idle.

        With overlap, the decode step dispatched by the last round is read
        here, after the step that follows it is queued where it can be."""
        with self._stepping:
            self._reap()
            self._admit()
            ahead, self._ahead = self._ahead, None
            if ahead is not None:
                self._ahead = self._chain(ahead)
                self._collect(ahead)
            elif not self.pool.running:
                return False
            busy = self._ahead.seqs if self._ahead is not None else ()
            decode = [s for s in self.pool.running if s.pending == 1 and s not in busy]
            if decode:
                self._forward(decode, 1, "decode")
            prefill = [s for s in self.pool.running if s.pending > 1]
            if prefill:
                s = min(prefill, key=lambda s: s.pending)
                self._forward([s], min(s.pending, self.prefill_chunk), "prefill")
            return True

    def start(self) -> None:
        """Run steps in a background thread until `close`."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="cake-engine", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop the background thread (what runs stays, for `step` or `start`)."""
        if self._thread is None:
            return
        with self._lock:
            self._stopping = True
            self._wake.notify()
        self._thread.join()
        self._thread, self._stopping = None, False

    def close(self) -> None:
        """Stop the thread, cancel what is left and free every sequence."""
        self.stop()
        with self._lock:
            self._closing = True
        with self._stepping:
            for req in list(self._waiting):
                req.cancelled = True
            for s in self.pool.running:
                s.owner.request.cancelled = True
            self._reap()
            self._drain()
            ids = [s.seq_id for s in self.pool.parked]
            self.pool.forget_parked()
            if ids:
                try:
                    self.pipeline.release(ids)
                except Exception as e:  # a worker already gone: nothing to free
                    print(f"cake: releasing sequences failed: {e}", file=sys.stderr)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self.pool.running):
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # never lose the thread: fail what ran
                print(f"cake: engine step failed: {e!r}", file=sys.stderr)
                for s in list(self.pool.running):
                    self._fail(s, e)

    def _reap(self) -> None:
        """Finish cancelled requests, waiting or running."""
        with self._lock:
            gone = [r for r in self._waiting if r.cancelled]
            for r in gone:
                self._waiting.remove(r)
        for r in gone:
            self._end(r, "cancelled")
        for s in list(self.pool.running):
            run: _Run = s.owner
            if run.request.cancelled:
                self._finish(s, "cancelled", "")

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._waiting or not self.pool.has_room():
                    return
                req = self._waiting.popleft()
            try:
                constraint = (
                    self.grammars.constraint(req.grammar) if req.grammar else None
                )
            except GrammarError as e:
                self._end(req, "error", Event(error=e))
                continue
            got = self.pool.take(req.prompt_ids, None)
            assert got is not None  # has_room() held and only this thread takes
            s, common = got
            s.owner = _Run(
                req,
                Sampler(req.params),
                self.tokenizer.stream_decoder(),
                StopMatcher(req.stop),
                time.perf_counter(),
                constraint,
            )
            req.stats.cached_tokens = common

    def _forward(self, seqs: list[Sequence], n: int, kind: str) -> None:
        ids = np.array([s.feed(n) for s in seqs], np.int32)
        draw = self._step_draw(seqs, ids.shape[1])
        step = Step(
            tuple(s.seq_id for s in seqs),
            tuple(s.cached for s in seqs),
            tuple(ids.shape[1] for _ in seqs),
            draw=draw,
        )
        if self.overlap and draw is not None and kind == "decode":
            self._ahead = self._dispatch(seqs, ids, step)
            return
        t, compiled = time.perf_counter(), self.pipeline.compile_s
        try:
            out = self.pipeline.forward(ids, step)
        except StageReset:
            self._replay()
            return
        except Exception as e:  # the stages' error: these requests fail
            for s in seqs:
                self._fail(s, e)
            return
        self._resets = 0
        self.observer.step(kind, len(seqs), ids.size, time.perf_counter() - t)
        self._fed(seqs, ids.shape[1], self.pipeline.compile_s - compiled)
        for i, s in enumerate(seqs):
            if s.pending == 0:
                if draw is None:
                    self._draw(s, out[i])
                else:
                    self._drawn(s, int(out[i]))

    def _fed(self, seqs: list[Sequence], n: int, compiled: float) -> None:
        """The stages hold `n` more ids of each of `seqs`, whose step waited
        `compiled` seconds for a compilation."""
        for s in seqs:
            s.cached += n
            self.pool.touch(s)
            if compiled:
                st = s.owner.request.stats
                if s.owner.generated:  # its step draws a decode token
                    st.decode_compile_s += compiled
                    st.decode_compile_tokens += 1
                else:
                    st.prompt_compile_s += compiled
                    st.prompt_compile_tokens += n

    def _step_draw(self, seqs: list[Sequence], n: int) -> Draw | None:
        """The step's Draw where the head stage can draw every token it ends
        with (Pipeline.forward): then only the ids leave the stage's device,
        not B rows of logits (on the CPU: no copy of them, and no pass of
        this thread over them). Only where every sequence of the step draws
        after it and none needs the logits (log-probabilities, a grammar's
        mask) or a draw the stage does not make (penalties)."""
        if not self.stage_draws:
            return None
        runs: list[_Run] = [s.owner for s in seqs]
        if not all(
            s.pending == n
            and r.constraint is None
            and r.request.logprobs is None
            and r.sampler.device_drawable
            for s, r in zip(seqs, runs, strict=True)
        ):
            return None
        rows = [r.sampler.for_device() for r in runs]
        return Draw(*(tuple(col) for col in zip(*rows, strict=True)))

    def _replay(self) -> None:
        self._resets += 1
        if self._resets > MAX_REPLAYS:
            self._resets = 0
            err = NetworkError(
                f"a worker lost its caches {MAX_REPLAYS + 1} times in a row; "
                "check the workers' logs"
            )
            for s in list(self.pool.running):
                self._fail(s, err)
            return
        self.pool.forget_parked()
        for s in self.pool.running:
            s.cached = 0

    def _draw(self, s: Sequence, logits: np.ndarray) -> None:
        run: _Run = s.owner
        req = run.request
        if run.constraint is not None:
            try:
                logits = run.constraint.mask(logits)
            except GrammarError as e:
                self._fail(s, e)
                return
        tok = run.sampler(logits, s.tokens)
        lp: tuple[TokenLogprob, ...] = ()
        if req.logprobs is not None:
            value, top = top_logprobs(logits, tok, req.logprobs)
            lp = (TokenLogprob(tok, value, tuple(top)),)
        self._take(s, tok, lp)

    def _drawn(self, s: Sequence, tok: int) -> None:
        """`tok`, drawn by the head stage (see _step_draw); -1: none could be."""
        if tok < 0:
            self._fail(
                s,
                CakeError(
                    "no token could be drawn: the model's logits hold a NaN or "
                    "no finite value (a broken checkpoint, or float16 overflow)"
                ),
            )
            return
        s.owner.sampler.record(tok)
        self._take(s, tok, ())

    def _take(self, s: Sequence, tok: int, lp: tuple[TokenLogprob, ...]) -> None:
        run: _Run = s.owner
        req = run.request
        now = time.perf_counter()
        run.generated += 1
        if run.generated == 1:
            run.prefilled = now
            req.stats.prompt_s = now - run.started
            req.stats.first_token_s = now - req.submitted
            self.observer.first_token(req)
        if tok in self._eos:
            self._finish(s, "eos", "", (tok,), lp)
            return
        if run.constraint is not None:
            try:
                run.constraint.accept(tok)  # the mask allowed it
            except GrammarError as e:  # this request fails, not the whole batch
                self._fail(s, e)
                return
        s.tokens.append(tok)
        text, hit = run.stops.push(run.decoder.push(tok))
        if hit:
            self._finish(s, "stop", text, (tok,), lp)
        elif run.constraint is not None and run.constraint.complete:
            self._finish(s, "eos", text, (tok,), lp)  # the grammar allows only EOS
        elif run.generated >= req.max_tokens:
            self._finish(s, "max_tokens", text, (tok,), lp)
        elif len(s.tokens) > self.pipeline.max_context:  # no room to feed it
            self._finish(s, "context", text, (tok,), lp)
        else:
            emit(req, Event(text, (tok,), lp))

    def _finish(
        self,
        s: Sequence,
        reason: str,
        text: str,
        tokens: tuple[int, ...] = (),
        lp: tuple[TokenLogprob, ...] = (),
    ) -> None:
        run: _Run = s.owner
        if reason != "stop":  # what the decoder and the stop matcher held back
            tail, _ = run.stops.push(run.decoder.flush(), final=True)
            text += tail
        st = run.request.stats
        st.decode_tokens = run.generated
        if run.generated:
            st.decode_s = time.perf_counter() - run.prefilled
        self.pool.park(s)
        self._end(run.request, reason, Event(text, tokens, lp))

    def _fail(self, s: Sequence, err: BaseException) -> None:
        run: _Run | None = s.owner
        self.pool.drop(s)
        try:
            self.pipeline.release([s.seq_id])
        except Exception:  # the failing stage may not answer; its id is reused anyway
            pass
        if run is not None:
            self._end(run.request, "error", Event(error=err))

    def _end(self, req: Request, reason: str, ev: Event | None = None) -> None:
        req.stats.stop_reason = reason
        req.done = True
        ev = ev or Event()
        emit(
            req,
            Event(ev.text, ev.tokens, ev.logprobs, finish=reason, error=ev.error),
        )
        self.observer.finished(req)
