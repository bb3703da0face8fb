"""Persistent compile-cache entries of background compiles, written once the
steps pause.

JAX writes a program to its persistent cache (`put_executable_and_time`)
right after compiling it, on the compiling thread, and serializing the
executable holds the GIL throughout: 55 ms for a SmolLM2 1024-position
decode program alone, 87-102 ms while a generation runs beside it (2 cores,
2026-12-06), and the decode step on the main thread waits that long. That
was the worst round of a generation on XLA's attention with an empty cache.
So writes asked for on a thread inside `deferring()` (the stages' background
compile threads) are kept, and `write_one` writes them later, when no step
has run for IDLE_S (`until_idle`; `Programs` calls it), or all of them at
exit. A step that starts during a write waits for that one entry.

JAX has no public hook for this: the wrapper replaces
`jax._src.compilation_cache.put_executable_and_time`, which JAX's compiler
looks up on that module at each write. Where a JAX lacks it, writes stay
where JAX makes them.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from . import jax_hooks

IDLE_S = 0.25  # no step for this long: the run has paused, write an entry

_local = threading.local()
_lock = threading.Lock()
_kept: deque[tuple[tuple, dict]] = deque()
_original: Callable[..., None] | None = None
_last_step = 0.0


def install() -> bool:
    """Put the deferring wrapper in JAX's place (once); False where JAX has no
    such function to wrap."""
    global _original
    with _lock:
        if _original is None:
            _original = jax_hooks.replace(
                "jax._src.compilation_cache", "put_executable_and_time", lambda _: _put
            )
        return _original is not None


def _put(*args: Any, **kwargs: Any) -> None:
    if getattr(_local, "defer", False):
        with _lock:
            _kept.append((args, kwargs))
        return
    assert _original is not None
    _original(*args, **kwargs)


@contextlib.contextmanager
def deferring() -> Iterator[None]:
    """Cache writes asked for on this thread inside are kept for `write_one`."""
    _local.defer = True
    try:
        yield
    finally:
        _local.defer = False


def note_step() -> None:
    """A step is being run now (called by every step's program lookup)."""
    global _last_step
    _last_step = time.monotonic()


def kept() -> int:
    """Entries waiting to be written."""
    return len(_kept)


def until_idle() -> float | None:
    """Seconds until an entry may be written (0: now), or None when none waits."""
    if not _kept:
        return None
    return max(0.0, IDLE_S - (time.monotonic() - _last_step))


def write_one() -> bool:
    """Write the oldest kept entry; False if there was none. A failed write
    warns, as JAX's own does, and is dropped (the program compiles again in a
    later process)."""
    with _lock:
        if not _kept:
            return False
        args, kwargs = _kept.popleft()
    assert _original is not None
    try:
        _original(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - a cache is an optimisation only
        warnings.warn(
            f"cake: writing a compile-cache entry failed: {type(e).__name__}: {e}",
            stacklevel=2,
        )
    return True


def write_all() -> int:
    """Write every kept entry (at exit); how many there were."""
    n = 0
    while write_one():
        n += 1
    return n
