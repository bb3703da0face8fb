"""The float tile formats (F16P, BF16P, F32P: src/gemm16.cc) against the NumPy
reference.

Where the build has AVX-512 (BF16P: AVX-512 BF16), repack_np stores F16, BF16
and F32 matrices of whole 32-row tiles as the panel GEMM's panels. A tiled
matrix must multiply like the reference on the original (within float32
rounding, as in test_kernels_cpu) for every M, with every output's bits
independent of the other rows and tiles of its call; widen back to the
original exactly; follow the layout gemm16.cc documents; and go through the
XLA FFI like through ctypes. Builds without AVX-512 keep the matrices as stored.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from cake.kernels import cpu
from cake.kernels.cpu import reference as ref
from tests.test_kernels_cpu import (
    FORMATS,
    _rms_input,
    assert_matmul_close,
    one_thread_matches,
)

FLOATS = [f for f in FORMATS if f.name in cpu.FLOATS]
MS = [1, 3, 8, 9, 17, 70]  # 70: more than one pass of 64 rows
NKS = [(32, 2), (96, 577 - 1), (160, 1536)]  # one tile; a few; enough for the pool
DTYPES = {"F16": np.float16, "BF16": ml_dtypes.bfloat16, "F32": np.float32}


def tiled(lib, fmt: str) -> str:
    """fmt's tile format, or a skip where this build has none."""
    name = cpu.REPACKED[fmt]
    if name not in lib.codes:
        pytest.skip(f"{name} needs AVX-512 (BF16P: AVX-512 BF16) in this build")
    return name


def case(fmt: str, m: int, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([m, n, k, list(DTYPES).index(fmt)])
    w = rng.standard_normal((n, k)).astype(DTYPES[fmt])
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, : k // 2] *= 100.0
    return x, w


@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
@pytest.mark.parametrize("n,k", NKS)
@pytest.mark.parametrize("m", MS)
def test_tiled_matmul_equals_reference(lib, fmt, m, n, k):
    name = tiled(lib, fmt.name)
    x, w = case(fmt.name, m, n, k)
    got, packed = cpu.repack_np(w, fmt.name)
    assert got == name and packed.shape == w.shape and packed.dtype == w.dtype
    assert packed.ctypes.data % 64 == 0  # XLA aliases it without a copy
    assert_matmul_close(cpu.matmul_np(x, packed, name), x, w, fmt.name)


@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
def test_tiled_outputs_do_not_depend_on_the_call(lib, fmt):
    name = tiled(lib, fmt.name)
    x, w = case(fmt.name, 40, 96, 576)  # F16P widens its tiles past 16 rows
    _, packed = cpu.repack_np(w, fmt.name)
    whole = cpu.matmul_np(x, packed, name)
    for m in [*range(1, 18), 40]:
        np.testing.assert_array_equal(cpu.matmul_np(x[:m], packed, name), whole[:m])
    np.testing.assert_array_equal(cpu.matmul_np(x[20], packed, name), whole[20])
    for t in range(3):  # each tile alone
        part = packed[32 * t : 32 * t + 32]
        np.testing.assert_array_equal(
            cpu.matmul_np(x, part, name), whole[:, 32 * t : 32 * t + 32]
        )
    one_thread_matches(lib, x, packed, name, whole)


@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
def test_tiles_follow_their_documented_layout(lib, fmt):
    name = tiled(lib, fmt.name)
    n, k = 64, 10
    _, w = case(fmt.name, 1, n, k)
    _, packed = cpu.repack_np(w, fmt.name)
    flat = packed.reshape(-1)
    for r in (0, 5, 31, 32, 63):
        t, c = divmod(r, 32)
        for kk in range(k):
            if name == "BF16P":  # pairs (2p, 2p + 1) of row c, 2p first
                at = t * 32 * k + (kk // 2) * 64 + 2 * c + kk % 2
            else:
                at = t * 32 * k + kk * 32 + c
            assert flat[at] == w[r, kk]
    np.testing.assert_array_equal(
        cpu.dequantize_np(packed, name, k), w.astype(np.float32)
    )


@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
@pytest.mark.parametrize("m", [1, 9])
def test_tiled_prologues_and_residual(lib, fmt, m):
    name = tiled(lib, fmt.name)
    k, n = 576, 64
    rng = np.random.default_rng([m, 12])
    _, w = case(fmt.name, m, n, k)
    _, packed = cpu.repack_np(w, fmt.name)
    x = rng.standard_normal((m, k)).astype(np.float32) * 3.0
    norm = rng.uniform(0.5, 2.0, k).astype(np.float32)
    res = rng.standard_normal((m, n)).astype(np.float32)
    got = cpu.matmul_np(
        x, packed, name, prologue="rms", norm=norm, eps=1e-5, residual=res
    )
    assert_matmul_close(got - res, _rms_input(x, norm, 1e-5), w, fmt.name, True)
    gu = rng.standard_normal((m, 2 * k)).astype(np.float32)
    got = cpu.matmul_np(gu, packed, name, prologue="swiglu")
    g, u = gu[:, :k].astype(np.float64), gu[:, k:].astype(np.float64)
    act = (g / (1 + np.exp(-g)) * u).astype(np.float32)
    assert_matmul_close(got, act, w, fmt.name, True)


@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
def test_tiled_jax_ffi_in_jit_equals_ctypes(lib, fmt):
    jax = pytest.importorskip("jax")
    name = tiled(lib, fmt.name)
    k = 576
    x, w = case(fmt.name, 10, 64, k)
    _, packed = cpu.repack_np(w, fmt.name)
    y = jax.jit(lambda x, w: cpu.matmul(x, w, name, k))(x.reshape(2, 5, k), packed)
    np.testing.assert_array_equal(
        np.asarray(y).reshape(10, -1), cpu.matmul_np(x, packed, name)
    )
    d = jax.jit(lambda w: cpu.dequantize(w, name, k))(packed)
    np.testing.assert_array_equal(np.asarray(d), w.astype(np.float32))


def test_float_matrices_that_do_not_tile_stay_as_stored(lib):
    rng = np.random.default_rng(13)
    w40 = rng.standard_normal((40, 64)).astype(np.float16)  # N % 32 != 0
    assert cpu.repack_np(w40, "F16") == ("F16", w40)
    odd = rng.standard_normal((32, 63)).astype(ml_dtypes.bfloat16)  # BF16P: K even
    assert cpu.repack_np(odd, "BF16") == ("BF16", odd)
    with pytest.raises(ValueError, match="multiple of 32"):
        cpu.weight_spec("F32P", 40, 64)
    with pytest.raises(ValueError, match="K to be even"):
        cpu.weight_spec("BF16P", 32, 63)


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])
def test_builds_without_avx512_keep_floats_as_stored(portable_libs, march):
    lib = portable_libs[march]
    for fmt in cpu.FLOATS:
        assert cpu.REPACKED[fmt] not in lib.codes
        w = np.ones((64, 32), DTYPES[fmt])
        assert lib.repack(w, fmt) == (fmt, w)


def test_reference_rounds_bf16_tiles_like_bf16():
    x = np.linspace(-3, 3, 64, dtype=np.float32).reshape(2, 32)
    np.testing.assert_array_equal(
        ref.quantize_activations(x, "BF16P"), ref.quantize_activations(x, "BF16")
    )


@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
def test_rows_of_a_tiled_table(lib, fmt):
    """linear.take_rows reads embedding rows out of the tiles (a tied head
    repacked for its products doubles as the embedding table)."""
    jax = pytest.importorskip("jax")
    from cake.backends.jax.linear import QMat, take_rows

    name = tiled(lib, fmt.name)
    _, w = case(fmt.name, 1, 96, 34)
    _, packed = cpu.repack_np(w, fmt.name)
    table = QMat(jax.device_put(packed), fmt=name, cols=34, kernel=True)
    ids = np.array([[0, 31, 32, 95], [7, 7, 64, 1]], np.int32)
    rows = jax.jit(lambda t, i: take_rows(t, i, transposed=False))(table, ids)
    np.testing.assert_array_equal(np.asarray(rows), w.astype(np.float32)[ids])
