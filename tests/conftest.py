"""Fixtures shared by several test files."""

from __future__ import annotations

import platform

import pytest


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
