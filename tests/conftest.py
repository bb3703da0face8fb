"""Fixtures shared by several test files."""

from __future__ import annotations

import importlib
import platform
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent.parent


def _prefer_installed(name: str) -> None:
    """Import the installed package `name` ahead of this repository's folder of
    that name. The repository's root is on sys.path for `tests.*`, and its
    `kernels/` (installed as cake.kernels) would stand in for HF's `kernels`,
    which transformers >= 5.25 requires and imports: "cannot import name
    'CUDAProperties' from 'kernels'" in every test that loads transformers.
    Without such a package nothing is imported, as before."""
    here = [p for p in sys.path if Path(p or ".").resolve() == _ROOT]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if p not in here]
    try:
        importlib.import_module(name)
    except ImportError:
        pass
    finally:
        sys.path[:] = saved


_prefer_installed("kernels")


@pytest.fixture(scope="module")
def lib():
    """The CPU kernel library (ctypes), built if need be; a skip without a compiler."""
    from cake.kernels import cpu
    from cake.kernels.cpu import build

    if build.compiler() is None:
        pytest.skip("no C++ compiler: the kernels cannot be built here")
    assert cpu.available(), "the CPU kernels failed to build (see stderr)"
    return cpu._load()


@pytest.fixture(scope="session")
def portable_libs(tmp_path_factory):
    """The CPU kernels' AVX2 and plain C++ paths, built once from a clean cache
    (no FFI: faster), for the kernel tests of every format."""
    from cake.kernels import cpu
    from cake.kernels.cpu import build

    if platform.machine().lower() not in ("x86_64", "amd64") or not build.compiler():
        pytest.skip("the AVX2 / plain builds are checked on x86-64 with a compiler")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAKE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        return {
            m: cpu._Library(str(build.build(march=m, ffi=False)))
            for m in ("x86-64-v3", "x86-64")
        }
