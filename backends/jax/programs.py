"""The compiled steps of a JAX stage, one per static shape, and a thread that
compiles ahead the ones a run is about to reach.

A step compiles once per `Shape`. Where XLA's attention reads a static bucket
of cache positions (GPUs, TPUs, the CPU without the attention kernel, CPU
prefill chunks wider than the kernel's rows), a generation crosses into the
next bucket after 256, 512, 1024... positions, and that step compiled in the
middle of the generation: 4.2 s for SmolLM2 on 2 CPU cores without the
kernels (`cake run -n 400`, 2026-12-03). So each first use of a bucket queues
the next one for a background thread, which has until the cache fills the
current bucket (at least 128 more tokens) to compile it.

A compiled program called directly is as fast as the jitted function's own
dispatch (2.83 vs 2.85 ms a SmolLM2 decode step here), so every step goes
through this table, compiled in the foreground or the background alike.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any, NamedTuple

from cake import heap

from . import cache_writes, compile_threads

# While the background thread lowers a step (JAX traces it in Python, ~0.2 s
# for SmolLM2's 30 layers on XLA's attention path), it holds the GIL, and a
# decode step on the main thread takes it back at each of its hand-overs
# only when the holder's switch interval (5 ms by default) is up. SmolLM2,
# 2 cores, CAKE_CPU_ATTENTION=0, 300 tokens after a 1- and a 300-token
# prompt, worst step (median 5-9 ms): 133-228 ms at 5 ms, 74-108 ms at 0.5
# ms, 69-79 ms at 0.1 ms (2 processes each); every slow step fell inside a
# lowering, none in XLA's compile (which releases the GIL). So the interval
# is short while a lowering runs in the background; what is left is C code
# that holds the GIL for longer.
LOWERING_SWITCH_S = 0.0001
_switch_lock = threading.Lock()
_lowerings = 0
_saved_switch = 0.0


@contextlib.contextmanager
def _short_switch_interval():
    """sys.setswitchinterval(LOWERING_SWITCH_S) while any background lowering
    runs (threads of several stages may overlap), the old interval after."""
    global _lowerings, _saved_switch
    with _switch_lock:
        if _lowerings == 0:
            _saved_switch = sys.getswitchinterval()
            sys.setswitchinterval(min(_saved_switch, LOWERING_SWITCH_S))
        _lowerings += 1
    try:
        yield
    finally:
        with _switch_lock:
            _lowerings -= 1
            if _lowerings == 0:
                sys.setswitchinterval(_saved_switch)


class Shape(NamedTuple):
    """The static arguments of one compiled step (see JaxLlamaStage.forward)."""

    batch: int
    width: int  # padded ids (or hidden rows) per sequence
    t_len: int  # cache positions XLA's attention reads (unused by the kernel)
    all_logits: bool
    causal_chunk: int | None
    attention_kernel: bool


class Programs:
    """Compiled steps by `Shape`: `get` returns one, compiling it now if needed
    (or waiting for the background thread, if it is at it); `ahead` queues one
    for the background thread. `waited_s`: seconds `get` spent compiling or
    waiting, i.e. what the run stalled on; `compiled_ahead`: programs the
    thread finished."""

    def __init__(
        self,
        lower: Callable[[Shape], Any],
        options: Callable[[Shape], dict[str, Any] | None] = lambda _shape: None,
    ) -> None:
        self._lower = lower  # Shape -> jax.stages.Lowered
        self._options = options  # Shape -> XLA compiler options, or None
        self._ready: dict[Shape, Any] = {}
        self._pending: dict[Shape, Future] = {}
        self._queue: deque[Shape] = deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self.waited_s = 0.0
        self.compiled_ahead = 0
        cache_writes.install()
        compile_threads.install()
        _LIVE.add(self)

    def get(self, shape: Shape, instead: Iterable[Shape] = ()) -> Any:
        """The compiled step for `shape`; if it is not compiled yet, the first
        of `instead` that is (queueing `shape` for the background thread)."""
        cache_writes.note_step()
        prog = self._ready.get(shape)
        if prog is not None:
            return prog
        for other in instead:
            prog = self._ready.get(other)
            if prog is not None:
                self.ahead(shape, first=True)
                return prog
        t0 = time.perf_counter()
        with self._lock:
            fut = self._pending.get(shape)
            mine = fut is None or shape in self._queue  # not started: do it here
            if fut is not None and mine:
                self._queue.remove(shape)
        try:
            if mine:
                prog = self._compile(shape)
                heap.trim()  # what XLA freed after compiling
            else:
                prog = fut.result()
        except BaseException as e:
            if mine and fut is not None:
                self._settle(shape, fut, error=e)
            raise
        if mine and fut is not None:
            self._settle(shape, fut, prog)  # for drain()
        self.waited_s += time.perf_counter() - t0
        return prog

    def ahead(self, shape: Shape, *, first: bool = False) -> None:
        """Compile `shape` in the background unless it is known already; with
        `first`, before what is queued."""
        with self._lock:
            if self._closing or shape in self._ready or shape in self._pending:
                return
            self._pending[shape] = Future()
            if first:
                self._queue.appendleft(shape)
            else:
                self._queue.append(shape)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name="cake-compile", daemon=True
                )
                self._thread.start()
            self._lock.notify()

    def drain(self) -> None:
        """Wait until the background thread has compiled everything queued."""
        with self._lock:
            futs = list(self._pending.values())
        for f in futs:
            f.result()

    def ready(self, shape: Shape) -> Any:
        """The compiled step for `shape`, or None if it is not compiled yet."""
        return self._ready.get(shape)

    def known(self, shape: Shape) -> bool:
        """Compiled, or being compiled."""
        return shape in self._ready or shape in self._pending

    def close(self) -> None:
        """Drop what is queued and wait for the compile in progress (a process
        exiting while XLA compiles on another thread may crash)."""
        with self._lock:
            self._closing = True
            for s in self._queue:
                self._pending.pop(s).cancel()
            self._queue.clear()
            self._lock.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=30)

    def _compile(self, shape: Shape, background: bool = False) -> Any:
        with _short_switch_interval() if background else contextlib.nullcontext():
            lowered = self._lower(shape)
        options = self._options(shape)
        try:
            prog = lowered.compile(compiler_options=options) if options else None
        except Exception as e:  # an XLA without that option: as it is then
            if not any(k in str(e) for k in options):
                raise
            prog = None
        prog = prog or lowered.compile()
        self._ready[shape] = prog
        return prog

    def _work(self) -> None:
        # Below the stepping threads, which XLA's compile slowed by up to 0.37 s
        # a step at the same priority (2 cores, 2026-12-03); not 19, which
        # starved it while the steps kept both cores busy. Linux: niceness is
        # per thread, and the threads it starts inherit it; XLA's compiler
        # threads, started before it, follow it (compile_threads).
        try:
            os.setpriority(
                os.PRIO_PROCESS, threading.get_native_id(), compile_threads.NICE
            )
        except (AttributeError, OSError):
            pass
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    wait = cache_writes.until_idle()
                    if wait == 0.0:
                        break
                    self._lock.wait(wait)
                if self._closing:
                    return
                if not self._queue:  # the steps have paused: one cache entry
                    shape = None
                else:
                    shape = self._queue.popleft()
                    fut = self._pending[shape]
            if shape is None:
                cache_writes.write_one()
                continue
            try:
                with cache_writes.deferring():
                    prog = self._compile(shape, background=True)
                # malloc_trim holds each arena's lock while it walks it
                # (19-59 ms after a compile here), and a step that allocates
                # meanwhile waits: once when the queue is empty, not after
                # every program of it.
                with self._lock:
                    drained = not self._queue
                if drained:
                    heap.trim()
            except BaseException as e:  # the step that needs it raises it
                self._settle(shape, fut, error=e)
                continue
            self.compiled_ahead += 1
            self._settle(shape, fut, prog)

    def _settle(
        self,
        shape: Shape,
        fut: Future,
        prog: Any = None,
        error: BaseException | None = None,
    ) -> None:
        with self._lock:
            self._pending.pop(shape, None)
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(prog)


_LIVE: weakref.WeakSet[Programs] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for p in list(_LIVE):
        p.close()
    cache_writes.write_all()  # what the background compiles left to write
