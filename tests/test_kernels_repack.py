"""The repacked CPU formats (Q4_0R8 ... Q8_0R8, Q2_KR8 ... Q6_KR8) against the
NumPy reference.

A matrix repacked by repack_np must multiply like the reference on the original
bytes (within float32 rounding, as in test_kernels_cpu) for every M, and widen
to gguf's dequantization of the original exactly, in the native, AVX2 and
plain C++ builds and through the XLA FFI. The K-quant tiles are also undone in
NumPy from the layout their source documents (src/repack_k.cc), byte for byte.
"""

from __future__ import annotations

import numpy as np
import pytest

from cake.kernels import cpu
from cake.kernels.cpu import reference as ref
from tests.test_kernels_cpu import (
    FORMATS,
    _rms_input,
    assert_matmul_close,
    ks,
    one_thread_matches,
    random_weights,
)

# the block formats' tiles of 8 rows (the float tiles: test_kernels_tiles.py)
PLAIN = [f for f in FORMATS if f.name in cpu.REPACKED and f.name not in cpu.FLOATS]
KQUANTS = [f for f in PLAIN if f.name.endswith("_K")]
# 70: more than one pass of 64 activation rows, and not a multiple of 8
MS = [1, 3, 8, 17, 64, 70]
# (N, which K of ks()): one tile of one block; a few tiles; enough for the thread pool
NKS = [(8, 0), (40, 1), (136, 2)]


def case(fmt, m: int, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([m, n, k, PLAIN.index(fmt)])
    w = random_weights(fmt, n, k, rng)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, : k // 2] *= 100.0  # blocks of very different scales in one row
    return x, w


@pytest.mark.parametrize("fmt", PLAIN, ids=lambda f: f.name)
@pytest.mark.parametrize("n,ki", NKS)
@pytest.mark.parametrize("m", MS)
def test_repacked_matmul_equals_reference(lib, fmt, m, n, ki):
    k = ks(fmt.name)[ki]
    x, w = case(fmt, m, n, k)
    name, packed = cpu.repack_np(w, fmt.name)
    assert name == cpu.REPACKED[fmt.name] and name in cpu.FORMATS
    assert packed.shape == w.shape and packed.dtype == w.dtype
    assert_matmul_close(cpu.matmul_np(x, packed, name), x, w, fmt.name)


@pytest.mark.parametrize("fmt", PLAIN, ids=lambda f: f.name)
def test_repacked_outputs_do_not_depend_on_the_call(lib, fmt):
    """An output's bits do not depend on the other rows and tiles of its call:
    the kernels take a unit of two tiles at once where it is one
    (cpu.interleave, 512-bit builds) and tiles alone otherwise, activation rows in runs of up
    to 8, on any number of threads."""
    k = ks(fmt.name)[1]
    n = 8 * 7  # 3 units of two tiles and an odd one
    x, w = case(fmt, 16, n, k)
    name, packed = cpu.repack_np(w, fmt.name)
    whole = cpu.matmul_np(x, packed, name)
    assert_matmul_close(whole, x, w, fmt.name)
    for m in range(1, 17):
        np.testing.assert_array_equal(cpu.matmul_np(x[:m], packed, name), whole[:m])
    for i in (5, 15):
        np.testing.assert_array_equal(cpu.matmul_np(x[i], packed, name), whole[i])
    unit = 8 * cpu.interleave(name)
    for u in range(0, n, unit):  # each unit alone (a matrix from an even tile)
        part = packed[u : u + unit]
        np.testing.assert_array_equal(
            cpu.matmul_np(x, part, name), whole[:, u : u + unit]
        )
    # from the second unit on
    np.testing.assert_array_equal(
        cpu.matmul_np(x, packed[unit:], name), whole[:, unit:]
    )
    one_thread_matches(lib, x, packed, name, whole)


@pytest.mark.parametrize("fmt", PLAIN, ids=lambda f: f.name)
def test_repacked_dequantize_equals_gguf(lib, fmt):
    k = 1536
    w = random_weights(fmt, 48, k, np.random.default_rng(7))
    name, packed = cpu.repack_np(w, fmt.name)
    np.testing.assert_array_equal(
        cpu.dequantize_np(packed, name, k), ref.dequantize_ref(w, fmt.name, k)
    )


def unpack_tiles(packed: np.ndarray, fmt: str) -> np.ndarray:
    """The plain rows back from Q2_KR8 ... Q6_KR8 tiles, per repack_k.cc's layout."""
    n, row = packed.shape
    nbytes = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[fmt]
    nb = row // nbytes
    g = packed.reshape(n // 8, nb, 8 * nbytes)  # tile, block, group bytes
    t = g.shape[0]

    def per_row(a: np.ndarray, width: int) -> np.ndarray:
        # (t, nb, 8 rows * width) row-major by row -> (t, nb, 8, width)
        return a.reshape(t, nb, 8, width)

    if fmt in ("Q4_K", "Q5_K"):
        d, dmin = per_row(g[..., 0:16], 2), per_row(g[..., 16:32], 2)
        sc = g[..., 32:128].reshape(t, nb, 12, 8).transpose(0, 1, 3, 2)
        qs = g[..., 128:1152].reshape(t, nb, 16, 8, 8).transpose(0, 1, 3, 2, 4)
        qh = g[..., 1152:].reshape(t, nb, -1, 8, 8).transpose(0, 1, 3, 2, 4)
        qh = qh.reshape(t, nb, 8, -1)  # Q5_K's 32 bytes per row, Q4_K's none
        blocks = np.concatenate([d, dmin, sc, qh, qs.reshape(t, nb, 8, 128)], -1)
    elif fmt in ("Q3_K", "Q2_K"):
        # paired chunks: ql vector 4h + c, byte 8r + 4u + e = qs[32h + 16u
        # + 4c + e]; Q3_K's qh vector c, byte 8r + 4u + e = hmask[16u + 4c + e]
        ql0 = 112 if fmt == "Q3_K" else 160
        ql = g[..., ql0 : ql0 + 512].reshape(t, nb, 2, 4, 8, 2, 4)  # h, c, r, u, e
        ql = ql.transpose(0, 1, 4, 2, 5, 3, 6).reshape(t, nb, 8, 64)
        d = per_row(g[..., 0:16], 2)
        if fmt == "Q3_K":
            sc = g[..., 16:112].reshape(t, nb, 12, 8).transpose(0, 1, 3, 2)
            qh = g[..., 624:].reshape(t, nb, 4, 8, 2, 4)  # c, r, u, e
            qh = qh.transpose(0, 1, 3, 4, 2, 5)
            parts = [qh.reshape(t, nb, 8, 32), ql, sc, d]
        else:
            sc = g[..., 32:160].reshape(t, nb, 16, 8).transpose(0, 1, 3, 2)
            parts = [sc, ql, d, per_row(g[..., 16:32], 2)]
        blocks = np.concatenate(parts, axis=-1)
    else:
        d = per_row(g[..., 0:16], 2)
        sc = g[..., 16:144].reshape(t, nb, 16, 8).transpose(0, 1, 3, 2)
        v = g[..., 144:].reshape(t, nb, 8, 3, 8, 8)  # G, k, row, e
        v = v.transpose(0, 1, 4, 2, 3, 5)  # row, G, k, e
        q = np.empty((t, nb, 8, 8, 4, 8), np.uint8)  # row, G, chunk, e
        q[..., :3, :] = v & 63
        q[..., 3, :] = (v[..., 0, :] >> 6) | (v[..., 1, :] >> 6) << 2
        q[..., 3, :] |= (v[..., 2, :] >> 6) << 4
        q = q.reshape(t, nb, 8, 2, 4, 32)  # element 128h + 32j + l
        ql = (q[..., 0:2, :] & 15) | (q[..., 2:4, :] & 15) << 4  # h, a, l
        qh = sum(((q[..., j, :] >> 4) & 3) << (2 * j) for j in range(4))  # h, l
        blocks = np.concatenate(
            [ql.reshape(t, nb, 8, 128), qh.reshape(t, nb, 8, 64), sc, d], axis=-1
        )
    return blocks.astype(np.uint8).transpose(0, 2, 1, 3).reshape(n, row)


@pytest.mark.parametrize("fmt", KQUANTS, ids=lambda f: f.name)
def test_repacked_k_tiles_follow_their_documented_layout(lib, fmt):
    w = random_weights(fmt, 24, 768, np.random.default_rng(10))
    name, packed = cpu.repack_np(w, fmt.name)
    assert name == fmt.name + "R8"
    np.testing.assert_array_equal(unpack_tiles(packed, fmt.name), w)


@pytest.mark.parametrize("fmt", PLAIN, ids=lambda f: f.name)
def test_repacked_jax_ffi_in_jit_equals_ctypes(lib, fmt):
    jax = pytest.importorskip("jax")
    k = ks(fmt.name)[1]
    rng = np.random.default_rng(8)
    name, w = cpu.repack_np(random_weights(fmt, 64, k, rng), fmt.name)
    x = rng.standard_normal((2, 5, k)).astype(np.float32)
    y = jax.jit(lambda x, w: cpu.matmul(x, w, name, k))(x, w)
    np.testing.assert_array_equal(np.asarray(y), cpu.matmul_np(x, w, name))
    d = jax.jit(lambda w: cpu.dequantize(w, name, k))(w)
    np.testing.assert_array_equal(np.asarray(d), cpu.dequantize_np(w, name, k))


@pytest.mark.parametrize("fmt", KQUANTS, ids=lambda f: f.name)
@pytest.mark.parametrize("m", [1, 9])
def test_repacked_k_fused_rms_and_residual(lib, fmt, m):
    """The rms prologue and the residual on a K-quant tile format: the driver
    quantizes the normed rows to cake_q8_256 for it, as for the plain format."""
    k = 768
    rng = np.random.default_rng([m, 11])
    w = random_weights(fmt, 32, k, rng)
    name, packed = cpu.repack_np(w, fmt.name)
    x = rng.standard_normal((m, k)).astype(np.float32) * 3.0
    norm = rng.uniform(0.5, 2.0, k).astype(np.float32)
    res = rng.standard_normal((m, 32)).astype(np.float32)
    got = cpu.matmul_np(
        x, packed, name, prologue="rms", norm=norm, eps=1e-5, residual=res
    )
    assert_matmul_close(got - res, _rms_input(x, norm, 1e-5), w, fmt.name)


def test_not_repackable_is_returned_as_is(lib):
    q4_0 = FORMATS[0]
    w12 = random_weights(q4_0, 12, 64, np.random.default_rng(9))  # N % 8 != 0
    assert cpu.repack_np(w12, "Q4_0") == ("Q4_0", w12)
    q4_k = next(f for f in FORMATS if f.name == "Q4_K")
    k12 = random_weights(q4_k, 12, 256, np.random.default_rng(9))
    assert cpu.repack_np(k12, "Q4_K") == ("Q4_K", k12)
    # no R8 form, and too few rows for F16P's tiles of 32
    f16 = next(f for f in FORMATS if f.name == "F16")
    w = random_weights(f16, 16, 256, np.random.default_rng(9))
    assert cpu.repack_np(w, "F16") == ("F16", w)
    with pytest.raises(ValueError, match="multiple of 8"):
        cpu.matmul_np(np.zeros((1, 64), np.float32), w12, "Q4_0R8")


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])
@pytest.mark.parametrize("fmt", PLAIN, ids=lambda f: f.name)
@pytest.mark.parametrize("m", [1, 5, 17])
def test_repacked_portable_paths(portable_libs, march, fmt, m):
    lib = portable_libs[march]
    n, k = 72, ks(fmt.name)[1]
    x, w = case(fmt, m, n, k)
    name, packed = lib.repack(w, fmt.name)
    assert name == cpu.REPACKED[fmt.name]
    assert_matmul_close(lib.matmul(x, packed, name), x, w, fmt.name)
    np.testing.assert_array_equal(
        lib.dequantize(packed, name, k), ref.dequantize_ref(w, fmt.name, k)
    )


@pytest.mark.parametrize("fmt", PLAIN, ids=lambda f: f.name)
@pytest.mark.parametrize("n", [8 * 7, 8 * 4])
def test_rows_of_a_repacked_table(lib, fmt, n):
    """linear.take_rows reads embedding rows out of the R8 tiles (a tied head
    repacked for its products doubles as the embedding table): rows of units
    of two tiles and of an odd last tile alone, ids past the end clipped."""
    jax = pytest.importorskip("jax")
    from cake.backends.jax.linear import QMat, take_rows

    k = ks(fmt.name)[1]
    _, w = case(fmt, 1, n, k)
    name, packed = cpu.repack_np(w, fmt.name)
    table = QMat(jax.device_put(packed), fmt=name, cols=k, kernel=True)
    ids = np.array([[0, 15, 16, n - 1], [n - 8, 7, n + 5, 33]], np.int32)
    rows = jax.jit(lambda t, i: take_rows(t, i, transposed=False))(table, ids)
    want = ref.dequantize_ref(w, fmt.name, k)[np.minimum(ids, n - 1)]
    np.testing.assert_array_equal(np.asarray(rows), want)
