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


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def trim() -> None:
    """Return the free parts of the heap to the OS, where the C library can."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)
