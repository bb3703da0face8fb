"""XLA's compiler threads, found by what they do and niced like the thread
that asks for a compile.

`Programs` compiles ahead on a thread at niceness 10, so that the steps keep
the cores. But XLA:CPU does not compile on the calling thread: the PjRt
client hands the work to thread pools of its own (its compiler pool, the
code generator's, LLVM's workers), which it starts with the client, at the
niceness of whoever first touched JAX (normal). Per-thread CPU time of a
SmolLM2 process on XLA's attention path, 2 cores, an empty cache
(2026-12-07, /proc/self/task/*/schedstat): in 8 s of background compiling
with no step, 4.7 s ran on four such threads and LLVM's two workers, 0.34 s
on the niced thread itself (its lowering); in a generation of 40 tokens the
same four threads took 9 s against the steps' 3.6 s, and a decode step that
takes 18-20 ms quiet took 50-110 ms beside them.

JAX names none of these pools, nor exposes their threads, so they are told
apart by behaviour. A window is one call of JAX's `backend_compile_and_load`
(any thread's; `install` wraps it). A thread that ran inside windows (twice,
or for MIN_INSIDE_NS in all) and never between them is a compiler thread and
gets the background thread's niceness (NICE); a compile in the foreground
then runs niced too, which costs it nothing on cores nobody else wants. A
step's threads (XLA's tf_XLAEigen pool, the client's, the CPU kernels'
workers) run between compiles and are never taken; Python threads set their
own niceness. Linux only (elsewhere nothing happens). Raising a thread's
niceness is allowed to its own process; lowering it back is not, without
privileges, hence the care before.

Same stall script, 3 alternating processes each (worst engine round after
the first token, 300 tokens after a 1- / 300-token prompt): before 106-130 /
54-169 ms, niced 73-86 / 32-140 ms (the 140 was a cache write, see
stage.py's settled programs). SCHED_IDLE instead of niceness starved the
compile: the whole-cache decode program answered for longer and the median
round of the 1-token case went from 18-23 to 42-51 ms.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

from . import jax_hooks

TASKS = "/proc/self/task"
NICE = 10  # the background compile thread's niceness (programs.Programs._work)
EXECUTION_POOLS = ("tf_XLAEigen",)  # XLA:CPU's intra-op pool runs the steps
# A thread is taken once it ran in two windows, or for this long in them: the
# compiler's threads ran 0.6-1.1 s each in the first (a SmolLM2 decode step),
# anything else beside them at most a few ms (transfers still in flight).
MIN_WINDOWS = 2
MIN_INSIDE_NS = 100_000_000

_lock = threading.Lock()
_depth = 0
_last: dict[int, int] = {}  # tid -> run time (ns) at the last edge (install, windows)
_outside: set[int] = set()  # ran between windows: never niced
_inside: dict[int, tuple[int, int]] = {}  # tid -> (windows it ran in, ns in them)
niced: set[int] = set()
_original: Callable[..., Any] | None = None


def install() -> bool:
    """Wrap JAX's compile (once) in `window`; False where JAX has no such
    function to wrap (then nothing is niced)."""
    global _original
    with _lock:
        if _original is None:
            _original = jax_hooks.replace(
                "jax._src.compiler", "backend_compile_and_load", _in_window
            )
            # what runs from here to the first window is no compile
            _last.update(_run_times())
        return _original is not None


def _in_window(compile_: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with window():
            return compile_(*args, **kwargs)

    return wrapped


def _run_times() -> dict[int, int]:
    out = {}
    try:
        tids = os.listdir(TASKS)
    except OSError:
        return out
    for t in tids:
        try:
            with open(f"{TASKS}/{t}/schedstat") as f:
                out[int(t)] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that ended meanwhile
    return out


def _ran(now: dict[int, int]) -> dict[int, int]:
    """Threads that ran since the last edge, and for how long (ns)."""
    return {t: ns - _last.get(t, 0) for t, ns in now.items() if ns > _last.get(t, 0)}


def _name(tid: int) -> str:
    try:
        with open(f"{TASKS}/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _nice_compilers() -> None:
    python = {t.native_id for t in threading.enumerate()}
    for tid, (n, ns) in _inside.items():
        if n < MIN_WINDOWS and ns < MIN_INSIDE_NS:
            continue
        if tid in _outside or tid in niced or tid in python:
            continue
        if _name(tid) in EXECUTION_POOLS:
            continue
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < NICE:
                os.setpriority(os.PRIO_PROCESS, tid, NICE)
            niced.add(tid)
        except OSError:
            pass  # ended, or not allowed: it stays as it is


@contextlib.contextmanager
def window() -> Iterator[None]:
    """Around one XLA compile (windows of several threads may overlap)."""
    global _depth, _last
    if not os.path.isdir(TASKS):
        yield
        return
    with _lock:
        if _depth == 0:
            now = _run_times()
            if _last:
                between = set(_ran(now))
                _outside.update(between)
                for tid in niced & between:  # taken wrongly: back, if allowed
                    with contextlib.suppress(OSError):
                        os.setpriority(os.PRIO_PROCESS, tid, 0)
                niced.difference_update(between)
            _last = now
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                now = _run_times()
                for t, ns in _ran(now).items():
                    n, total = _inside.get(t, (0, 0))
                    _inside[t] = (n + 1, total + ns)
                _last = now
                _nice_compilers()
