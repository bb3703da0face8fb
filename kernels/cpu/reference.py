"""The CPU kernels' arithmetic written plainly in NumPy: what the tests compare with.

`matmul_ref(x, w, fmt, k) = quantize_activations(x, fmt) @ dequantize(w).T`.
The block formats first quantize x in blocks of 32 (Q4_0 ... Q8_0) or 256
(the K-quants) values, as the kernels do (kernels/cpu/src/qdot.h):

    d = max|x_blk| / 127 in float32 (d = 0 -> all q = 0)
    q = rint(x_blk / d), a float32 division rounded half to even, |q| <= 127

F16 and F32 use x as it is; BF16 rounds it to bfloat16.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize

from cake.kernels.cpu import check_format


def activation_block(fmt: str) -> int:
    """Values per activation block: 32, 256 (K-quants), or 0 (x stays float)."""
    check_format(fmt)
    if fmt.removesuffix("P") in ("F16", "BF16", "F32"):
        return 0
    return 256 if fmt.removesuffix("R8").endswith("_K") else 32


def quantize_q8(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """x (..., K) -> (d float32 (..., K // block), q int8 (..., K)), per the rule above."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % block:
        raise ValueError(f"K={x.shape[-1]} is not a multiple of the block ({block})")
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    d = np.abs(xb).max(axis=-1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d == 0, np.float32(0), np.rint(xb / d))
    q = np.clip(q, -127, 127).astype(np.int8)
    return d[..., 0], q.reshape(x.shape)


def quantize_activations(x: np.ndarray, fmt: str) -> np.ndarray:
    """x (..., K) as the kernels see it for `fmt`, in float64 (d * q exactly)."""
    block = activation_block(fmt)
    x = np.asarray(x, dtype=np.float32)
    if fmt in ("BF16", "BF16P"):  # rounded to bfloat16, to nearest even (as llama.cpp)
        return x.astype(ml_dtypes.bfloat16).astype(np.float64)
    if block == 0:
        return x.astype(np.float64)
    d, q = quantize_q8(x, block)
    k = x.shape[-1]
    qb = q.reshape(*x.shape[:-1], k // block, block).astype(np.float64)
    return (qb * d[..., None].astype(np.float64)).reshape(x.shape)


def dequantize_ref(w: np.ndarray, fmt: str, k: int) -> np.ndarray:
    """The N x K weights in `fmt` as float32 (N, K): gguf's own dequantizer."""
    # gguf reads every format from the file's bytes, float32 / 16 / bfloat16 included
    out = dequantize(np.ascontiguousarray(w).view(np.uint8), GGMLQuantizationType[fmt])
    return np.asarray(out, dtype=np.float32).reshape(-1, k)


def matmul_ref(x: np.ndarray, w: np.ndarray, fmt: str, k: int) -> np.ndarray:
    """`quantize_activations(x) @ W^T` in float64: (..., K) -> (..., N)."""
    x = np.asarray(x)
    if x.shape[-1] != k:
        raise ValueError(f"x must be (..., K={k}); got shape {x.shape}")
    return quantize_activations(x, fmt) @ dequantize_ref(w, fmt, k).astype(np.float64).T
