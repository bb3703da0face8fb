"""The repacked CPU formats (Q4_0R8 ... Q8_0R8) against the NumPy reference.

A matrix repacked by repack_np must multiply like the reference on the original
bytes (within float32 rounding, as in test_kernels_cpu) for every M, and widen
to gguf's dequantization of the original exactly, in the native, AVX2 and
plain C++ builds and through the XLA FFI.
"""

from __future__ import annotations

import numpy as np
import pytest

from cake.kernels import cpu
from cake.kernels.cpu import build
from cake.kernels.cpu import reference as ref
from tests.test_kernels_cpu import FORMATS, assert_matmul_close, random_weights

PLAIN = [f for f in FORMATS if f.name in cpu.REPACKED]
MS = [1, 3, 8, 17, 64]
# (N, K): one tile of one block; a few tiles; enough for the thread pool
NKS = [(8, 32), (40, 576), (136, 1536)]


@pytest.fixture(scope="module")
def lib():
    if build.compiler() is None:
        pytest.skip("no C++ compiler: the kernels cannot be built here")
    assert cpu.available(), "the CPU kernels failed to build (see stderr)"
    return cpu._load()


def case(fmt, m: int, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([m, n, k, PLAIN.index(fmt)])
    w = random_weights(fmt, n, k, rng)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, : k // 2] *= 100.0  # blocks of very different scales in one row
    return x, w


@pytest.mark.parametrize("fmt", PLAIN, ids=lambda f: f.name)
@pytest.mark.parametrize("n,k", NKS)
@pytest.mark.parametrize("m", MS)
def test_repacked_matmul_equals_reference(lib, fmt, m, n, k):
    x, w = case(fmt, m, n, k)
    name, packed = cpu.repack_np(w, fmt.name)
    assert name == cpu.REPACKED[fmt.name] and name in cpu.FORMATS
    assert packed.shape == w.shape and packed.dtype == w.dtype
    assert_matmul_close(cpu.matmul_np(x, packed, name), x, w, fmt.name)


@pytest.mark.parametrize("fmt", PLAIN, ids=lambda f: f.name)
def test_repacked_dequantize_equals_gguf(lib, fmt):
    k = 1536
    w = random_weights(fmt, 48, k, np.random.default_rng(7))
    name, packed = cpu.repack_np(w, fmt.name)
    np.testing.assert_array_equal(
        cpu.dequantize_np(packed, name, k), ref.dequantize_ref(w, fmt.name, k)
    )


@pytest.mark.parametrize("fmt", PLAIN, ids=lambda f: f.name)
def test_repacked_jax_ffi_in_jit_equals_ctypes(lib, fmt):
    jax = pytest.importorskip("jax")
    k = 576
    rng = np.random.default_rng(8)
    name, w = cpu.repack_np(random_weights(fmt, 64, k, rng), fmt.name)
    x = rng.standard_normal((2, 5, k)).astype(np.float32)
    y = jax.jit(lambda x, w: cpu.matmul(x, w, name, k))(x, w)
    np.testing.assert_array_equal(np.asarray(y), cpu.matmul_np(x, w, name))
    d = jax.jit(lambda w: cpu.dequantize(w, name, k))(w)
    np.testing.assert_array_equal(np.asarray(d), cpu.dequantize_np(w, name, k))


def test_not_repackable_is_returned_as_is(lib):
    q4_0, q4_k = FORMATS[0], FORMATS[7]
    w12 = random_weights(q4_0, 12, 64, np.random.default_rng(9))  # N % 8 != 0
    assert cpu.repack_np(w12, "Q4_0") == ("Q4_0", w12)
    w = random_weights(q4_k, 16, 256, np.random.default_rng(9))  # no R8 form
    assert cpu.repack_np(w, "Q4_K") == ("Q4_K", w)
    with pytest.raises(ValueError, match="multiple of 8"):
        cpu.matmul_np(np.zeros((1, 64), np.float32), w12, "Q4_0R8")


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])
@pytest.mark.parametrize("fmt", PLAIN, ids=lambda f: f.name)
@pytest.mark.parametrize("m", [1, 5, 17])
def test_repacked_portable_paths(portable_libs, march, fmt, m):
    lib = portable_libs[march]
    n, k = 72, 576
    x, w = case(fmt, m, n, k)
    name, packed = lib.repack(w, fmt.name)
    assert name == cpu.REPACKED[fmt.name]
    assert_matmul_close(lib.matmul(x, packed, name), x, w, fmt.name)
    np.testing.assert_array_equal(
        lib.dequantize(packed, name, k), ref.dequantize_ref(w, fmt.name, k)
    )
