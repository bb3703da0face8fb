"""The K-quant kernels (kernels/cpu/src/kquants.cc) against gguf.quants.

kquants.cc is compiled alone: -march=native (AVX-512 VNNI here), AVX2 without
AVX-512, and with no -march at -O2 and -O3 (the portable scalar code); its
`cake_dot_*` / `cake_dequant_*` are called through ctypes on random
super-blocks, the activation rows built from reference.quantize_q8, so each
dot is checked against `reference.matmul_ref` with M rows in one call. The
same shapes then go through the library (matmul_np) and jax.jit."""

from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cake.kernels import cpu
from cake.kernels.cpu import reference as ref
from tests.blocks import random_blocks

SRC = Path(__file__).resolve().parents[1] / "kernels" / "cpu" / "src"
QK = 256
FORMATS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# The activation block of qdot.h: float d, int16 bsums[16], int8 qs[256].
Q8_256 = np.dtype([("d", "<f4"), ("bsums", "<i2", 16), ("qs", "i1", QK)])
assert Q8_256.itemsize == 292


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _variants() -> list[tuple[str, list[str]]]:
    # -O2 as well as -O3: GCC 12.2 once miscompiled the portable code at -O2 only.
    out = [("scalar-O2", ["-O2"]), ("scalar-O3", ["-O3"])]
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if x86 and "avx2" in _cpu_flags():
        out.append(("avx2", ["-O3", "-mavx2", "-mfma", "-mf16c"]))
    out.append(("native", ["-O3", "-march=native" if x86 else "-mcpu=native"]))
    return out


VARIANTS = _variants()


@pytest.fixture(scope="module", params=[v[0] for v in VARIANTS])
def lib(request, tmp_path_factory) -> ctypes.CDLL:
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    flags = dict(VARIANTS)[request.param]
    out = tmp_path_factory.mktemp("kquants") / f"kquants_{request.param}.so"
    cmd = [cxx, *flags, "-fPIC", "-shared", "-std=c++17", "-ffp-contract=off"]
    subprocess.run(
        [*cmd, f"-I{SRC}", str(SRC / "kquants.cc"), "-o", str(out)], check=True
    )
    lib = ctypes.CDLL(str(out))
    for fmt in FORMATS:
        name = fmt.lower()
        dot = getattr(lib, f"cake_dot_{name}")
        dot.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        dot.argtypes += [ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        dot.restype = None
        deq = getattr(lib, f"cake_dequant_{name}")
        deq.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        deq.restype = None
    return lib


def activation_rows(x: np.ndarray, pad: int = 0) -> np.ndarray:
    """(M, K) float32 -> (M, K // 256 + pad) Q8_256 rows, per reference.quantize_q8.

    `pad` zero blocks after each row make x_stride longer than a row.
    """
    m, k = x.shape
    d, q = ref.quantize_q8(x, QK)
    a = np.zeros((m, k // QK + pad), Q8_256)
    a["d"][:, : k // QK] = d
    qb = q.reshape(m, k // QK, QK)
    a["qs"][:, : k // QK] = qb
    a["bsums"][:, : k // QK] = qb.reshape(m, k // QK, 16, 16).sum(-1, dtype=np.int16)
    return a


def kernel_matmul(lib, fmt: str, x: np.ndarray, w: np.ndarray, pad: int = 0):
    """y (M, N) from cake_dot_* on each weight row, all M rows in one call."""
    m, k = x.shape
    a = activation_rows(x, pad)
    dot = getattr(lib, f"cake_dot_{fmt.lower()}")
    y = np.zeros((w.shape[0], m), np.float32)
    for n in range(w.shape[0]):
        row = np.ascontiguousarray(w[n])
        dot(k, row.ctypes.data, a.ctypes.data, a.strides[0], m, y[n].ctypes.data)
    return y.T


def assert_close(got: np.ndarray, x: np.ndarray, w: np.ndarray, fmt: str) -> None:
    """got == reference.matmul_ref within float32 rounding of sum |x| |w|."""
    k = x.shape[-1]
    want = ref.matmul_ref(x, w, fmt, k)
    scale = (
        np.abs(ref.quantize_activations(x, fmt))
        @ np.abs(ref.dequantize_ref(w, fmt, k).astype(np.float64)).T
    )
    err = np.abs(got - want) / scale
    assert err.max() < 1e-5, (fmt, x.shape, err.max())


SHAPES = [(m, k) for m in (1, 3, 8, 17) for k in (256, 512, 1536)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_dot_matches_reference(lib, fmt):
    rng = np.random.default_rng(FORMATS.index(fmt))
    for i, (m, k) in enumerate(SHAPES):
        w = random_blocks(fmt, 5, k, seed=i)
        x = rng.standard_normal((m, k)).astype(np.float32)
        assert_close(kernel_matmul(lib, fmt, x, w, pad=i % 2), x, w, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_matches_gguf(lib, fmt):
    k = 1536
    w = random_blocks(fmt, 4, k, seed=100)
    deq = getattr(lib, f"cake_dequant_{fmt.lower()}")
    got = np.empty((4, k), np.float32)
    for n in range(4):
        row = np.ascontiguousarray(w[n])
        deq(k, row.ctypes.data, got[n].ctypes.data)
    np.testing.assert_array_equal(got, ref.dequantize_ref(w, fmt, k))


@pytest.mark.parametrize("fmt", FORMATS)
def test_dot_zero_activations(lib, fmt):
    w = random_blocks(fmt, 2, 512, seed=7)
    assert np.all(kernel_matmul(lib, fmt, np.zeros((3, 512), np.float32), w) == 0)


@pytest.fixture(scope="module")
def library():
    if not cpu.available():
        pytest.skip("the CPU kernel library does not build here")
    return cpu


@pytest.mark.parametrize("fmt", FORMATS)
def test_library_and_jax_paths(library, fmt):
    """The same shapes through the driver (matmul_np) and inside jax.jit."""
    import jax

    rng = np.random.default_rng(50 + FORMATS.index(fmt))
    for i, (m, k) in enumerate(SHAPES):
        w = random_blocks(fmt, 33, k, seed=i)
        x = rng.standard_normal((m, k)).astype(np.float32)
        got = library.matmul_np(x, w, fmt)
        assert_close(got, x, w, fmt)
        jitted = jax.jit(lambda x, w, k=k: library.matmul(x, w, fmt, k))
        np.testing.assert_array_equal(np.asarray(jitted(x, w)), got)
        np.testing.assert_array_equal(
            library.dequantize_np(w, fmt, k), ref.dequantize_ref(w, fmt, k)
        )
