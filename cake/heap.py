"""Give freed heap memory back to the operating system (glibc's malloc_trim).

Loading a stage copies some tensors (fused, repacked) and frees the
intermediates; compiling a JAX step allocates a few hundred MB and frees them.
glibc keeps such freed chunks in the process (its mmap threshold grows after
large frees), so resident memory stays high although nothing uses it: measured
+120-230 MB after the first compiled SmolLM2 steps. Elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os


@functools.cache
def libc():
    """The C library (glibc's malloc_trim and friends), or None."""
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def trim() -> None:
    """Return the free parts of the heap to the OS, where the C library can."""
    lib = libc()
    if lib is not None:
        lib.malloc_trim(0)


M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_arenas(n: int = 2) -> None:
    """At most `n` malloc arenas (glibc), unless $MALLOC_ARENA_MAX says.

    glibc gives threads that contend for the heap arenas of their own, up to 8
    per core, and what XLA's compile threads allocate and free there stays
    fragmented: 11 compiled SmolLM2 steps (cake serve's warm-up) added 109 MB,
    with 2 arenas 83 MB (2026-12-03). cake's threads allocate little while
    they step (the kernels and XLA's buffers are allocated per call, large
    ones by mmap), so sharing arenas costs no measurable speed.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    lib = libc()
    if lib is not None and hasattr(lib, "mallopt"):
        lib.mallopt(M_ARENA_MAX, n)
