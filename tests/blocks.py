"""Random valid GGUF blocks for the tests of readers and kernels."""

from __future__ import annotations

import gguf
import numpy as np

from cake.weights.packed import F16_FIELDS

Q = gguf.GGMLQuantizationType


def random_blocks(fmt: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random valid blocks of a GGUF type: random bytes, float16 scales set finite.

    The float16 fields (d, and dmin/m where the type has one) sit at the
    offsets gguf.quants reads them from; each gets a value in [1e-3, 1e-1).
    """
    elems, nbytes = gguf.GGML_QUANT_SIZES[Q[fmt]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // elems, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[fmt]:
        h = rng.uniform(1e-3, 1e-1, raw.shape[:2]).astype(np.float16)
        raw[..., off : off + 2] = h.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


def random_weight(fmt: str, rows: int, cols: int, std: float, seed: int = 0):
    """Random valid blocks of `fmt` whose decoded weights have mean ~0 and ~`std`.

    Decoding is linear in the float16 fields: the second field (a min) is
    scaled to cancel the mean the first one's codes give, then both by one
    factor for the spread.
    """
    from gguf.quants import dequantize

    raw = random_blocks(fmt, rows, cols, seed)
    elems, nbytes = gguf.GGML_QUANT_SIZES[Q[fmt]]
    blocks = raw.reshape(rows, cols // elems, nbytes)
    fields = F16_FIELDS[fmt]

    def decoded(scale: list[float]) -> np.ndarray:
        b = blocks.copy()
        for off, k in zip(fields, scale, strict=True):
            h = b[..., off : off + 2].copy().view(np.float16).astype(np.float32)
            b[..., off : off + 2] = (h * k).astype(np.float16).view(np.uint8)
        return b

    scale = [1.0] * len(fields)
    if len(fields) == 2:
        part_d = dequantize(decoded([1.0, 0.0]).reshape(rows, -1), Q[fmt]).mean()
        part_m = dequantize(decoded([0.0, 1.0]).reshape(rows, -1), Q[fmt]).mean()
        scale[1] = -part_d / part_m
    unit = np.std(dequantize(decoded(scale).reshape(rows, -1), Q[fmt]))
    return decoded([k * std / unit for k in scale]).reshape(rows, -1)
