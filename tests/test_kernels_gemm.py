"""The panel GEMM of the 16-bit formats and F32 (kernels/cpu/src/gemm16.cc)
against the NumPy reference: what BF16, F16 and F32 products of many x rows (a
long prefill) go through. Several M (tiles of 8 rows and their rest), N not a
multiple of the panel's columns, K with tails (odd, past the 1536 of a panel
chunk), the prologues and the residual; each path the build may take (AVX-512
BF16 pairs here, AVX-512F / AVX2 / plain C++ float32 panels elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest

from cake.kernels import cpu
from cake.kernels.cpu import build
from cake.kernels.cpu import reference as ref
from tests.test_kernels_cpu import (
    Format,
    _rms_input,
    _swiglu_input,
    assert_matmul_close,
    random_weights,
)

FLOATS = [Format("BF16", ()), Format("F16", ()), Format("F32", ())]
# (M, K, N): M from the panel's threshold on (tiles of 8 and a rest of 1 ... 7),
# K odd / past a chunk of 1536 (3100 = 2 x 1536 + 28), N past whole panels
CASES = [
    (64, 577, 129),
    (65, 7, 50),
    (100, 1536, 5),
    (128, 3100, 50),
    (512, 576, 97),
]


@pytest.fixture
def panel_from(lib):  # noqa: F811
    """set(rows): the panel GEMM from that many x rows on; reset afterwards."""
    yield lambda rows: lib.raw.cake_set_panel_rows(rows)
    lib.raw.cake_set_panel_rows(0)


def _data(fmt: Format, m: int, k: int, n: int):
    rng = np.random.default_rng([m, k, n])
    w = random_weights(fmt, n, k, rng)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, : k // 2] *= 100.0  # values of very different sizes in one row
    return w, x, rng


@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
@pytest.mark.parametrize("m,k,n", CASES)
def test_panel_gemm_equals_reference(lib, fmt, m, k, n):  # noqa: F811
    w, x, rng = _data(fmt, m, k, n)
    assert_matmul_close(cpu.matmul_np(x, w, fmt.name), x, w, fmt.name)
    res = rng.standard_normal((m, n)).astype(np.float32)
    got = cpu.matmul_np(x, w, fmt.name, residual=res)
    np.testing.assert_array_equal(got, res + cpu.matmul_np(x, w, fmt.name))


def assert_prologue_close(y, x, w, fmt: str) -> None:
    """y = x @ W^T as assert_matmul_close, x being the reference's float32 form
    of what the kernel computed itself (a fused prologue): where the two differ
    in their last bit, BF16's rounding of x may land one bfloat16 step (2^-7
    of the value) apart, so one activation per row gets that slack against any
    weight of the column (measured: 2.2e-5 of sum |x||w| without it, M = 65,
    the dot kernels as the panel GEMM)."""
    k = x.shape[-1]
    want = ref.matmul_ref(x, w, fmt, k)
    wd = np.abs(ref.dequantize_ref(w, fmt, k).astype(np.float64))
    scale = np.abs(ref.quantize_activations(x, fmt)) @ wd.T
    slack = 0.0
    if fmt == "BF16":
        slack = np.abs(x).max(axis=1, keepdims=True) * 2.0**-7 * wd.max(axis=1)
    err = (np.abs(y - want) - slack) / np.maximum(scale, 1e-30)
    assert err.max() < 1e-5, f"{fmt}: max error {err.max():.2e} of sum |x||w|"


@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
@pytest.mark.parametrize("m", [65, 100])
def test_panel_gemm_prologues_and_residual(lib, fmt, m):  # noqa: F811
    k, n = 577, 70
    w, x, rng = _data(fmt, m, k, n)
    norm = rng.uniform(0.5, 2.0, k).astype(np.float32)
    res = rng.standard_normal((m, n)).astype(np.float32)
    got = cpu.matmul_np(
        x, w, fmt.name, prologue="rms", norm=norm, eps=1e-5, residual=res
    )
    assert_prologue_close(got - res, _rms_input(x, norm, 1e-5), w, fmt.name)
    x2 = rng.standard_normal((m, 2 * k)).astype(np.float32)
    got = cpu.matmul_np(x2, w, fmt.name, prologue="swiglu")
    assert_prologue_close(got, _swiglu_input(x2), w, fmt.name)


@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
def test_a_row_does_not_depend_on_the_others(lib, fmt):  # noqa: F811
    """Past the threshold each row's numbers are the same whatever M and
    whichever tile the row lands in (a chunk of a prompt, a reused prefix)."""
    w, x, _ = _data(fmt, 100, 577, 70)
    whole = cpu.matmul_np(x, w, fmt.name)
    for lo, hi in [(0, 64), (3, 100), (36, 100)]:
        np.testing.assert_array_equal(
            cpu.matmul_np(x[lo:hi], w, fmt.name), whole[lo:hi]
        )


@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
def test_panel_gemm_at_any_m(lib, panel_from, fmt):  # noqa: F811
    """The panel GEMM forced below its threshold: every tile height 1 ... 9;
    and the dot kernels forced above it still agree with the reference."""
    w, x, _ = _data(fmt, 70, 577, 50)
    panel_from(1)
    for m in range(1, 10):
        assert_matmul_close(cpu.matmul_np(x[:m], w, fmt.name), x[:m], w, fmt.name)
    panel_from(1 << 40)
    assert_matmul_close(cpu.matmul_np(x, w, fmt.name), x, w, fmt.name)


@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
def test_panel_gemm_in_jit_equals_ctypes(lib, fmt):  # noqa: F811
    jax = pytest.importorskip("jax")
    w, x, rng = _data(fmt, 96, 576, 65)
    x = x.reshape(2, 48, 576)  # any leading shape: 96 rows
    res = rng.standard_normal((2, 48, 65)).astype(np.float32)
    norm = rng.uniform(0.5, 2.0, 576).astype(np.float32)
    fused = jax.jit(
        lambda x, w, n, r: cpu.matmul(
            x, w, fmt.name, 576, prologue="rms", norm=n, eps=1e-5, residual=r
        )
    )
    np.testing.assert_array_equal(
        np.asarray(fused(x, w, norm, res)),
        cpu.matmul_np(
            x, w, fmt.name, prologue="rms", norm=norm, eps=1e-5, residual=res
        ),
    )


@pytest.fixture(scope="module")
def avx512f_lib(tmp_path_factory):
    """AVX-512 without BF16 (x86-64-v4): the float32 panel in zmm registers."""
    if not build.compiler():
        pytest.skip("no C++ compiler")
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("x86-64 only")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAKE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        return cpu._Library(str(build.build(march="x86-64-v4", ffi=False)))


@pytest.mark.parametrize("march", ["x86-64-v4", "x86-64-v3", "x86-64"])
@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
def test_panel_gemm_portable_paths(request, march, fmt):
    if march == "x86-64-v4":
        plib = request.getfixturevalue("avx512f_lib")
        cpuinfo = open("/proc/cpuinfo").read()
        if " avx512bw" not in cpuinfo or " avx512vl" not in cpuinfo:
            pytest.skip("this CPU cannot run an x86-64-v4 build")
    else:
        plib = request.getfixturevalue("portable_libs")[march]
    for m, k, n in [(70, 577, 50), (65, 3100, 17)]:
        w, x, rng = _data(fmt, m, k, n)
        assert_matmul_close(plib.matmul(x, w, fmt.name), x, w, fmt.name)
        res = rng.standard_normal((m, n)).astype(np.float32)
        got = plib.matmul(x, w, fmt.name, residual=res)
        np.testing.assert_array_equal(got, res + plib.matmul(x, w, fmt.name))


@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
def test_every_m_across_the_thresholds(lib, fmt):  # noqa: F811
    """M = 1 ... 70 at the default thresholds (dot kernels, then the panel GEMM
    from 24 / 32 rows): each against the reference, and F32 against NumPy's own
    float32 product too (K odd, N not a multiple of the panel or of 2)."""
    k, n = 577, 53
    w, x, _ = _data(fmt, 70, k, n)
    for m in range(1, 71):
        y = cpu.matmul_np(x[:m], w, fmt.name)
        assert_matmul_close(y, x[:m], w, fmt.name)
        if fmt.name == "F32":
            want = x[:m] @ w.T  # float32, BLAS's order of summation
            scale = np.abs(x[:m]) @ np.abs(w).T
            assert (np.abs(y - want) / scale).max() < 1e-5, m


@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
def test_dot_kernels_give_a_row_its_bits_at_any_m(lib, panel_from, fmt):  # noqa: F811
    """Below the threshold (decode, small batches) a row's numbers do not
    depend on the rows beside it either: alone, in a tile of 8, in the rest of
    one, or paired with its neighbour weight row (F32's and BF16's dot2)."""
    panel_from(1 << 40)
    w, x, _ = _data(fmt, 19, 577, 53)
    whole = cpu.matmul_np(x, w, fmt.name)
    for i in range(19):
        np.testing.assert_array_equal(
            cpu.matmul_np(x[i : i + 1], w, fmt.name)[0], whole[i]
        )
    for lo, hi in [(0, 8), (3, 11), (5, 19)]:
        np.testing.assert_array_equal(
            cpu.matmul_np(x[lo:hi], w, fmt.name), whole[lo:hi]
        )
