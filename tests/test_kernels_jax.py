"""kernels/jax: packed GGUF and MLX matrices decoded under jax.jit against Packed."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from cake.kernels.jax import dequantize, matmul
from cake.weights.packed import (
    GGUF_FORMATS,
    MLX_BITS,
    MLX_GROUPS,
    Packed,
    gguf_block,
    mlx_format,
    parse_mlx_format,
)
from tests.blocks import random_blocks

MLX_FORMATS = tuple(mlx_format(b, g) for b in MLX_BITS for g in MLX_GROUPS)
FORMATS = GGUF_FORMATS + MLX_FORMATS

jit_dequantize = jax.jit(dequantize, static_argnames=("fmt", "cols", "dtype"))
jit_matmul = jax.jit(matmul, static_argnames=("fmt", "cols", "compute_dtype"))


def pack_mlx(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes (rows, cols) < 2**bits -> uint32 (rows, cols * bits / 32): code j at
    bits [j*bits, (j+1)*bits) of the row's little-endian bit stream."""
    rows = codes.shape[0]
    stream = (codes[..., None] >> np.arange(bits)) & 1  # (rows, cols, bits)
    packed = np.packbits(stream.reshape(rows, -1).astype(np.uint8), 1, "little")
    return packed.view("<u4").astype(np.uint32)


def random_packed(fmt: str, rows: int, units: int, seed: int = 0) -> Packed:
    """A random (rows, units blocks or groups) matrix in `fmt`."""
    if not fmt.startswith("MLX"):
        cols = units * gguf_block(fmt)[0]
        return Packed(fmt, (rows, cols), random_blocks(fmt, rows, cols, seed))
    bits, group = parse_mlx_format(fmt)
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << bits, (rows, units * group))
    scales = rng.uniform(1e-3, 1e-1, (rows, units)).astype(np.float16)
    biases = rng.uniform(-0.1, 0.1, (rows, units)).astype(np.float16)
    return Packed(fmt, codes.shape, pack_mlx(codes, bits), scales, biases)


def args(p: Packed) -> dict:
    """The keyword arguments of `dequantize`/`matmul` for `p`."""
    out = {"data": p.data, "fmt": p.format, "cols": p.shape[1]}
    return out | ({"scales": p.scales, "biases": p.biases} if p.is_mlx else {})


@functools.cache
def reference(fmt: str, rows: int, units: int) -> tuple[Packed, np.ndarray]:
    p = random_packed(fmt, rows, units, seed=rows * 100 + units)
    return p, p.dequantize()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows, units", [(1, 1), (3, 2), (6, 3)])
def test_dequantize_is_exact(fmt, rows, units):
    p, want = reference(fmt, rows, units)
    got = jit_dequantize(**args(p))
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gathered_rows_equal_those_rows(fmt):
    # the embedding lookup: ids (B, L) gathered from the packed rows, then decoded
    p, want = reference(fmt, 6, 3)
    ids = np.array([[5, 0, 2], [2, 2, 4]])

    @jax.jit
    def lookup(ids, data, scales, biases):
        data, scales, biases = (
            None if a is None else a[ids] for a in (data, scales, biases)
        )
        return dequantize(data, p.format, p.shape[1], scales=scales, biases=biases)

    got = lookup(ids, p.data, p.scales, p.biases)  # (2, 3, cols)
    np.testing.assert_array_equal(np.asarray(got), want[ids])


def assert_product(got, x, w, eps):
    # within the rounding of a length-K float sum at precision eps
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    bound = x.shape[-1] * eps * (np.abs(x).astype(np.float64) @ np.abs(w).T)
    assert got.dtype == jnp.float32
    assert np.all(np.abs(np.asarray(got) - exact) <= bound + 1e-30)


@pytest.mark.parametrize("fmt", FORMATS)
def test_matmul_is_the_product(fmt):
    p, w = reference(fmt, 6, 3)
    x = np.random.default_rng(1).standard_normal((2, 3, p.shape[1]), np.float32)
    assert_product(jit_matmul(x, **args(p)), x, w, np.finfo(np.float32).eps)


@pytest.mark.parametrize("fmt", ["Q4_K", "Q8_0", "MLX4G64"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_narrow_matmul_decodes_to_that_dtype(fmt, dtype):
    p, w = reference(fmt, 6, 3)
    narrow = np.dtype(dtype)
    got = jit_dequantize(**args(p), dtype=dtype)
    np.testing.assert_array_equal(np.asarray(got), w.astype(narrow))
    x = np.random.default_rng(2).standard_normal((4, p.shape[1])).astype(narrow)
    # the product of the rounded operands, accumulated in float32
    xr, wr = x.astype(np.float32), w.astype(narrow).astype(np.float32)
    assert_product(jit_matmul(x, **args(p)), xr, wr, np.finfo(np.float32).eps)
    got32 = jit_matmul(x.astype(np.float32), **args(p), compute_dtype=dtype)
    assert_product(got32, xr, wr, np.finfo(np.float32).eps)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32])
def test_mlx_scales_are_read_as_stored(dtype):
    p, _ = reference("MLX4G32", 3, 2)
    rng = np.random.default_rng(3)
    scales = rng.uniform(1e-3, 1e-1, p.scales.shape).astype(dtype)
    p = Packed(p.format, p.shape, p.data, scales, p.biases.astype(dtype))
    got, want = np.asarray(jit_dequantize(**args(p))), p.dequantize()
    if dtype == np.float32:
        # scale * q (< 1.5) is not exact: a fused multiply-add may differ by its ulp
        np.testing.assert_allclose(
            got, want, rtol=0, atol=1.5 * np.finfo(np.float32).eps
        )
    else:
        np.testing.assert_array_equal(got, want)


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="IQ4_XS"):
        dequantize(jnp.zeros((1, 136), jnp.uint8), "IQ4_XS", 256)


@pytest.mark.parametrize("bits", MLX_BITS)
def test_mlx_bit_layout_is_mlx_own(bits):
    mx = pytest.importorskip("mlx.core")
    p, want = reference(mlx_format(bits, 64), 3, 2)
    # float32 scales and biases holding the float16 values: mlx decodes in float32,
    # and scale * q is exact at float16 precision, so mlx equals ours bit for bit
    s, b = (mx.array(a.astype(np.float32)) for a in (p.scales, p.biases))
    theirs = mx.dequantize(mx.array(p.data), s, b, group_size=64, bits=bits)
    np.testing.assert_array_equal(np.array(theirs), want)
    # mlx's own packing decodes to mlx's values; its float32 scales use every bit,
    # and mlx rounds scale * q + bias once (a fused multiply-add), we twice
    w = mx.array(np.random.default_rng(bits).standard_normal((4, 128), np.float32))
    wq, s, b = mx.quantize(w, group_size=64, bits=bits)
    theirs = np.array(mx.dequantize(wq, s, b, group_size=64, bits=bits))
    mine = jit_dequantize(
        np.array(wq), mlx_format(bits, 64), 128, scales=np.array(s), biases=np.array(b)
    )
    np.testing.assert_allclose(np.asarray(mine), theirs, rtol=1e-6, atol=1e-6)
