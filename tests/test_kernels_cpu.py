"""The CPU kernels (kernels/cpu) against the NumPy reference, format by format.

Weights are random blocks: random bytes with the float16 scale fields set to
finite values of a sensible size. matmul_np must equal matmul_ref within float32
rounding (relative to sum |x| |w|), dequantize_np must equal gguf's dequantizer,
and the JAX FFI path inside jit must equal matmul_np bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from cake.kernels import cpu
from cake.kernels.cpu import reference as ref


@dataclass(frozen=True)
class Format:
    name: str
    scales: tuple[int, ...]  # byte offsets of the float16 scale fields in one block
    exact_dequant: bool = True  # False: dequantize_np within float32 rounding


# Every format, in one place (block layouts: gguf.quants / ggml-common.h).
FORMATS = [
    Format("Q4_0", (0,)),
    Format("Q4_1", (0, 2)),
    Format("Q5_0", (0,)),
    Format("Q5_1", (0, 2)),
    Format("Q8_0", (0,)),
    Format("Q2_K", (80, 82)),
    Format("Q3_K", (108,)),
    Format("Q4_K", (0, 2)),
    Format("Q5_K", (0, 2)),
    Format("Q6_K", (208,)),
    Format("F16", ()),
    Format("BF16", ()),
    Format("F32", ()),
]
assert [f.name for f in FORMATS] == list(cpu.ALL_FORMATS)

# (M, which K, N): M = 1, 3, 8 and 17 / 70 (more than a tile, more than a chunk);
# N = 129 with K = 1536 is enough work for the thread pool.
CASES = [(1, 0, 5), (3, 1, 64), (8, 2, 40), (17, 2, 129), (70, 1, 33)]


def ks(fmt: str) -> tuple[int, int, int]:
    """Three K for `fmt`: multiples of its block (floats: any K, tails included)."""
    block = ref.activation_block(fmt)
    if block == 0:
        return (7, 577, 1536)
    return (block, 576 if block == 32 else 768, 1536)


def random_weights(fmt: Format, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    shape, dtype = cpu.weight_spec(fmt.name, n, k)
    if fmt.name in ("F16", "BF16", "F32"):
        return rng.standard_normal(shape).astype(dtype)
    w = rng.integers(0, 256, shape, dtype=np.uint8)
    block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[fmt.name]][1]
    blocks = w.reshape(n, -1, block_bytes)
    for off in fmt.scales:
        d = rng.uniform(0.5, 1.5, blocks.shape[:2]) * rng.choice(
            [-1, 1], blocks.shape[:2]
        )
        blocks[:, :, off : off + 2] = (
            (d / 64).astype(np.float16)[..., None].view(np.uint8)
        )
    return w


def one_thread_matches(lib, x, w, fmt: str, want) -> None:
    """The product on the kernels' pool cut to one thread equals `want` bit for bit."""
    lib.raw.cake_set_num_threads(1)
    try:
        np.testing.assert_array_equal(cpu.matmul_np(x, w, fmt), want)
    finally:
        lib.raw.cake_set_num_threads(0)


def compiled(lib, fmt: Format) -> None:
    if fmt.name not in lib.codes:
        pytest.skip(f"{fmt.name} is not compiled in (its kernel file is absent)")


def assert_matmul_close(
    y: np.ndarray, x: np.ndarray, w: np.ndarray, fmt: str, one_step: bool = False
) -> None:
    """y = x @ W^T to 1e-5 of sum |x||w|. one_step: x is the reference's float32
    form of what the kernel computed itself (a fused prologue), which may land
    on the other side of a rounding boundary when quantized; then one
    activation per row may also sit one quantization step (max |x_row| / 127)
    away, against any weight of the column."""
    k = x.shape[-1]
    want = ref.matmul_ref(x, w, fmt, k)
    wd = np.abs(ref.dequantize_ref(w, fmt, k).astype(np.float64))
    scale = np.abs(ref.quantize_activations(x, fmt)) @ wd.T
    assert y.shape == want.shape and y.dtype == np.float32
    slack = 0.0
    if one_step and fmt not in ("F16", "BF16", "F32"):  # those take float activations
        slack = np.abs(x).max(axis=1, keepdims=True) / 127 * wd.max(axis=1)
    err = (np.abs(y - want) - slack) / np.maximum(scale, 1e-30)
    assert err.max() < 1e-5, f"{fmt}: max error {err.max():.2e} of sum |x||w|"


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("m,ki,n", CASES)
def test_matmul_equals_reference(lib, fmt, m, ki, n):
    compiled(lib, fmt)
    k = ks(fmt.name)[ki]
    rng = np.random.default_rng([m, k, n])
    w = random_weights(fmt, n, k, rng)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, : k // 2] *= 100.0  # blocks of very different scales in one row
    assert_matmul_close(cpu.matmul_np(x, w, fmt.name), x, w, fmt.name)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_dequantize_equals_gguf(lib, fmt):
    compiled(lib, fmt)
    k = ks(fmt.name)[2]
    w = random_weights(fmt, 37, k, np.random.default_rng(1))
    got, want = cpu.dequantize_np(w, fmt.name, k), ref.dequantize_ref(w, fmt.name, k)
    assert got.shape == (37, k) and got.dtype == np.float32
    if fmt.exact_dequant:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_jax_ffi_in_jit_equals_ctypes(lib, fmt):
    jax = pytest.importorskip("jax")
    compiled(lib, fmt)
    k = ks(fmt.name)[1]
    rng = np.random.default_rng(2)
    w = random_weights(fmt, 65, k, rng)
    x = rng.standard_normal((2, 3, k)).astype(np.float32)  # any leading shape
    y = jax.jit(lambda x, w: cpu.matmul(x, w, fmt.name, k))(x, w)
    np.testing.assert_array_equal(np.asarray(y), cpu.matmul_np(x, w, fmt.name))
    d = jax.jit(lambda w: cpu.dequantize(w, fmt.name, k))(w)
    np.testing.assert_array_equal(np.asarray(d), cpu.dequantize_np(w, fmt.name, k))


@pytest.mark.parametrize("fmt", ["Q4_0", "Q8_0", "Q4_K", "Q8_0R8", "BF16", "F32"])
def test_grouped_products_of_a_stack(lib, fmt):
    """matmul_grouped: rows grouped by expert (counts, some zero), each group
    times its expert's matrix, bit for bit what matmul gives each group alone;
    rows past the groups zero; a SwiGLU prologue as in matmul; bad counts fail."""
    jax = pytest.importorskip("jax")
    plain = fmt.removesuffix("R8")
    compiled(lib, Format(plain, ()))
    f = next(x for x in FORMATS if x.name == plain)
    k = ks(plain)[1]
    rng = np.random.default_rng(6)
    mats = [random_weights(f, 16, k, rng) for _ in range(4)]
    if fmt.endswith("R8"):
        mats = [cpu.repack_np(m, plain)[1] for m in mats]
    stack = np.stack(mats)
    counts = np.array([2, 0, 3, 1], np.int32)
    x = rng.standard_normal((8, 2 * k)).astype(np.float32)  # 6 rows in groups
    run = jax.jit(
        lambda x, w, c, pro: cpu.matmul_grouped(x, w, c, fmt, k, prologue=pro),
        static_argnames="pro",
    )
    for pro, xin in ((None, x[:, :k]), ("swiglu", x)):
        y = np.asarray(run(xin, stack, counts, pro=pro))
        start = 0
        for e, c in enumerate(counts):
            want = cpu.matmul_np(xin[start : start + c], stack[e], fmt, prologue=pro)
            np.testing.assert_array_equal(y[start : start + c], want)
            start += c
        assert not y[start:].any()
    with pytest.raises(Exception, match="counts"):
        np.asarray(run(x[:, :k], stack, np.array([5, 5, 0, 0], np.int32), pro=None))


def _rms_input(x, norm, eps):
    """The rms prologue as backends/jax/linear.py's prologue_of computes it."""
    inv = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return (x * inv * norm).astype(np.float32)


def _swiglu_input(x):
    g, u = np.split(x.astype(np.float64), 2, axis=-1)
    return (g / (1.0 + np.exp(-g)) * u).astype(np.float32)


@pytest.mark.parametrize("fmt", [*FORMATS, Format("Q8_0R8", ())], ids=lambda f: f.name)
@pytest.mark.parametrize("m", [1, 8, 19])
def test_fused_prologues_and_residual(lib, fmt, m):
    """matmul(x, prologue=..., residual=r) = r + (the prologue's x) @ W^T: the
    kernel applies the prologue in float32 before quantizing, so it matches the
    reference applied to the same transformed rows (to float32 rounding of
    the transformed x, which can move a quantized activation by one step)."""
    plain = fmt.name[:-2] if fmt.name.endswith("R8") else fmt.name
    compiled(lib, Format(plain, ()))
    k = ks(plain)[1]
    rng = np.random.default_rng([m, k])
    w = random_weights(next(f for f in FORMATS if f.name == plain), 64, k, rng)
    wk = w
    if fmt.name != plain:
        repacked, wk = cpu.repack_np(w, plain)
        assert repacked == fmt.name
    x = rng.standard_normal((m, k)).astype(np.float32) * 3.0
    norm = rng.uniform(0.5, 2.0, k).astype(np.float32)
    res = rng.standard_normal((m, 64)).astype(np.float32)
    got = cpu.matmul_np(
        x, wk, fmt.name, prologue="rms", norm=norm, eps=1e-5, residual=res
    )
    xn = _rms_input(x, norm, 1e-5)
    assert_matmul_close(got - res, xn, w, plain, one_step=True)
    x2 = rng.standard_normal((m, 2 * k)).astype(np.float32)
    got = cpu.matmul_np(x2, wk, fmt.name, prologue="swiglu")
    assert_matmul_close(got, _swiglu_input(x2), w, plain, one_step=True)
    jax = pytest.importorskip("jax")
    fused = jax.jit(
        lambda x, w, n, r: cpu.matmul(
            x, w, fmt.name, k, prologue="rms", norm=n, eps=1e-5, residual=r
        )
    )
    np.testing.assert_array_equal(
        np.asarray(fused(x, wk, norm, res)),
        cpu.matmul_np(
            x, wk, fmt.name, prologue="rms", norm=norm, eps=1e-5, residual=res
        ),
    )


def test_fused_arguments_fail_in_one_line(lib):
    w = random_weights(FORMATS[4], 8, 64, np.random.default_rng(4))
    x = np.ones((2, 64), np.float32)
    with pytest.raises(ValueError, match="unknown prologue"):
        cpu.matmul_np(x, w, "Q8_0", prologue="gelu")
    with pytest.raises(ValueError, match="takes a norm weight"):
        cpu.matmul_np(x, w, "Q8_0", prologue="rms")
    with pytest.raises(ValueError, match="norm weight must be"):
        cpu.matmul_np(x, w, "Q8_0", prologue="rms", norm=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="residual must be"):
        cpu.matmul_np(x, w, "Q8_0", residual=np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="swiglu prologue needs"):
        cpu.matmul_np(np.ones((2, 65), np.float32), w, "Q8_0", prologue="swiglu")


def test_zero_rows_and_empty_shapes(lib):
    x = np.zeros((4, 64), np.float32)  # d = 0 blocks: q = 0
    w = random_weights(FORMATS[0], 3, 64, np.random.default_rng(3))
    np.testing.assert_array_equal(cpu.matmul_np(x, w, "Q4_0"), np.zeros((4, 3)))
    assert cpu.matmul_np(np.zeros((0, 64), np.float32), w, "Q4_0").shape == (0, 3)


def test_shape_mismatch_fails_in_one_line(lib):
    w = random_weights(FORMATS[0], 3, 64, np.random.default_rng(4))
    cases = [
        (np.zeros((2, 96), np.float32), w),  # K does not match the rows' bytes
        (np.zeros((2, 64), np.float32), w.view(np.int8)),  # wrong dtype
        (np.zeros((2, 48), np.float32), w),  # K not a multiple of the block
    ]
    for x, bad in cases:
        with pytest.raises(ValueError) as e:
            cpu.matmul_np(x, bad, "Q4_0")
        assert "\n" not in str(e.value) and "Q4_0" in str(e.value)
    with pytest.raises(ValueError, match="Q4_0 weights for K=96"):
        cpu.matmul(np.zeros((2, 96), np.float32), w, "Q4_0", 96)
    with pytest.raises(ValueError, match="unknown weight format"):
        cpu.matmul_np(np.zeros((2, 64), np.float32), w, "Q4_2")


@pytest.mark.parametrize("block", [32, 256])
def test_activation_quantization_is_the_reference(lib, block):
    rng = np.random.default_rng(block)
    x = rng.standard_normal((3, 4 * block)).astype(np.float32)
    x[1, :block] = 0.0  # d = 0
    x[2, :block] = 0.5  # every q a tie at first ...
    x[2, 0], x[2, 1:6] = 127.0, [2.5, 3.5, -2.5, 0.5, -126.5]  # ... d = 1: half to even
    if block == 32:
        dt = np.dtype([("d", "<f4"), ("s", "<f4"), ("qs", "i1", 32)])
        fn = lib.raw.cake_quantize_q8_32
    else:
        dt = np.dtype([("d", "<f4"), ("bsums", "<i2", 16), ("qs", "i1", 256)])
        fn = lib.raw.cake_quantize_q8_256
    d, q = ref.quantize_q8(x, block)
    for r in range(3):
        out = np.zeros(4, dt)
        fn(x[r].ctypes.data, out.ctypes.data, x.shape[1])
        np.testing.assert_array_equal(out["d"], d[r])
        np.testing.assert_array_equal(out["qs"].ravel(), q[r])
        sums = q[r].reshape(4, -1, 16).sum(-1)
        if block == 32:
            np.testing.assert_allclose(out["s"], d[r] * sums.sum(-1), rtol=1e-6)
        else:
            np.testing.assert_array_equal(out["bsums"], sums)
    assert list(q[2, 1:6]) == [2, 4, -2, 0, -126]


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_portable_paths(portable_libs, march, fmt):
    lib = portable_libs[march]
    compiled(lib, fmt)
    k = ks(fmt.name)[2]
    rng = np.random.default_rng(5)
    w = random_weights(fmt, 70, k, rng)
    x = rng.standard_normal((9, k)).astype(np.float32)
    assert_matmul_close(lib.matmul(x, w, fmt.name), x, w, fmt.name)
    got, want = lib.dequantize(w, fmt.name, k), ref.dequantize_ref(w, fmt.name, k)
    if fmt.exact_dequant:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_no_compiler_is_one_line_and_false(tmp_path):
    env = dict(
        os.environ, CXX=str(tmp_path / "no-such-compiler"), CAKE_CACHE_DIR=str(tmp_path)
    )
    code = "from cake.kernels import cpu; print(cpu.available(), cpu.FORMATS)"
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stdout.strip() == "False ()"
    assert len(r.stderr.strip().splitlines()) == 1 and "compiler" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "cake.kernels.cpu.build"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 1
    assert "fallback" in r.stdout and not r.stderr


def test_calls_are_whole_while_other_processes_take_the_cores(lib):
    """The pool's workers join a call only while the caller is still at its
    own share (matmul.cc, Pool), so that a call does not wait for a worker the
    scheduler has not run. With busy processes on every core, some calls run
    with a worker and some without: each must finish and give the same bits
    (every row is one thread's, whichever)."""
    if cpu.num_threads() < 2:
        pytest.skip("one thread: no pool")
    rng = np.random.default_rng(7)
    w = random_weights(Format("Q8_0", (0,)), 1024, 1536, rng)
    x = rng.standard_normal((3, 1536)).astype(np.float32)
    want = cpu.matmul_np(x, w, "Q8_0")
    spin = [sys.executable, "-c", "while True: pass"]
    busy = [subprocess.Popen(spin) for _ in range(os.cpu_count() or 2)]
    try:
        for _ in range(300):
            np.testing.assert_array_equal(cpu.matmul_np(x, w, "Q8_0"), want)
    finally:
        for p in busy:
            p.kill()
            p.wait()


@pytest.mark.parametrize("threads", [3, 5, 16])
@pytest.mark.parametrize(
    "fmt,n", [("Q8_0", 40), ("Q8_0", 129), ("Q4_1", 8 * 13), ("BF16", 33)]
)
def test_every_row_block_is_taken_once_whatever_the_threads(lib, fmt, n, threads):
    """The pool's counter gives each thread a part of the rows and lets a thread
    whose part is done take blocks from the back of the others' (matmul.cc,
    Counter): with more threads than cores (parts a late worker never reaches),
    parts of an odd number of tiles and rows that do not split evenly, every
    output is computed once and equals the one-thread product bit for bit."""
    spec = next(f for f in FORMATS if f.name == fmt)
    k = ks(fmt)[2]
    rng = np.random.default_rng([n, threads])
    w = random_weights(spec, n, k, rng)
    if fmt in cpu.REPACKED and fmt not in cpu.FLOATS:
        fmt, w = cpu.repack_np(w, fmt)
    x = rng.standard_normal((9, k)).astype(np.float32)
    lib.raw.cake_set_num_threads(1)
    try:
        want = {m: cpu.matmul_np(x[:m], w, fmt) for m in (1, 9)}
        lib.raw.cake_set_num_threads(threads)
        for m in (1, 9):
            for _ in range(20):
                np.testing.assert_array_equal(cpu.matmul_np(x[:m], w, fmt), want[m])
    finally:
        lib.raw.cake_set_num_threads(0)
