"""Packed: a weight matrix in its stored, compact form (GGUF blocks, MLX affine).

A TensorSource hands out float tensors as NumPy arrays in their stored dtype
(float32, float16, bfloat16) and quantized ones as `Packed`: the format, the
logical (rows, cols) shape of the float matrix it stands for, and the raw bytes,
memory-mapped from the file where the reader allows. Backends multiply Packed
weights directly (see kernels/) or repack them once into a format of their own
of about the same size; `dequantize` is the readable float32 reference.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from cake.errors import ModelError

# GGUF quantized types cake computes (everything llama.cpp's usual presets write).
GGUF_FORMATS = (
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)
# Byte offsets of the float16 fields (d, and m / dmin where the type has one)
# inside one block of each GGUF type: what a tool setting scales needs.
F16_FIELDS = {
    "Q8_0": (0,),
    "Q4_0": (0,),
    "Q5_0": (0,),
    "Q4_1": (0, 2),
    "Q5_1": (0, 2),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}
MLX_BITS = (2, 3, 4, 5, 6, 8)
MLX_GROUPS = (32, 64, 128)


def gguf_block(fmt: str) -> tuple[int, int]:
    """(elements, bytes) of one block of a GGUF type, e.g. Q4_K -> (256, 144)."""
    return GGML_QUANT_SIZES[GGMLQuantizationType[fmt]]


def mlx_format(bits: int, group_size: int) -> str:
    """The format name of mlx-lm's affine quantization, e.g. 'MLX4G64'."""
    if bits not in MLX_BITS or group_size not in MLX_GROUPS:
        raise ModelError(
            f"mlx quantization with {bits} bits and groups of {group_size} is not "
            f"supported: bits must be one of {MLX_BITS}, group_size one of "
            f"{MLX_GROUPS}"
        )
    return f"MLX{bits}G{group_size}"


def parse_mlx_format(fmt: str) -> tuple[int, int]:
    """'MLX4G64' -> (4, 64)."""
    bits, group = fmt[3:].split("G")
    return int(bits), int(group)


@dataclass(frozen=True, eq=False)
class Packed:
    """A quantized (rows, cols) matrix as stored.

    GGUF formats: `data` is uint8 (rows, cols / block_elems * block_bytes), each
    row the file's blocks in order. MLX formats (`MLX{bits}G{group}`): `data` is
    uint32 (rows, cols * bits / 32), element j of a row at bits [j*bits,
    (j+1)*bits) of the row's little-endian bit stream; `scales` and `biases` are
    (rows, cols / group) in their stored float dtype; w = scale * q + bias.
    """

    format: str
    shape: tuple[int, int]
    data: np.ndarray
    scales: np.ndarray | None = None
    biases: np.ndarray | None = None

    def __post_init__(self) -> None:
        rows, cols = self.shape
        if self.is_mlx:
            bits, group = parse_mlx_format(self.format)
            ok = (
                cols % group == 0
                and self.data.dtype == np.uint32
                and self.data.shape == (rows, cols * bits // 32)
                and self.scales is not None
                and self.biases is not None
                and self.scales.shape == self.biases.shape == (rows, cols // group)
            )
        else:
            elems, nbytes = gguf_block(self.format)
            ok = (
                cols % elems == 0
                and self.data.dtype == np.uint8
                and self.data.shape == (rows, cols // elems * nbytes)
            )
        if not ok:
            raise ModelError(
                f"a {self.format} tensor of shape {self.shape} cannot be stored as "
                f"{self.data.dtype} {self.data.shape}: the file is inconsistent"
            )

    ndim = 2

    @property
    def is_mlx(self) -> bool:
        return self.format.startswith("MLX")

    @property
    def nbytes(self) -> int:
        extra = 0 if self.scales is None else self.scales.nbytes + self.biases.nbytes
        return self.data.nbytes + extra

    def take_rows(self, index: np.ndarray) -> Packed:
        """The matrix made of rows `index` (a copy): quantization is row by row."""
        pick = (
            None if a is None else np.ascontiguousarray(a[index])
            for a in (self.data, self.scales, self.biases)
        )
        data, scales, biases = pick
        return Packed(self.format, (len(index), self.shape[1]), data, scales, biases)

    def dequantize(self) -> np.ndarray:
        """The float32 (rows, cols) matrix: `gguf.quants.dequantize` for GGUF."""
        if not self.is_mlx:
            w = gguf_dequantize(self.data, GGMLQuantizationType[self.format])
            return np.asarray(w, np.float32).reshape(self.shape)
        bits, group = parse_mlx_format(self.format)
        rows, cols = self.shape
        # the little-endian bit stream of each row, then `bits` bits per element
        stream = np.unpackbits(
            self.data.astype("<u4").view(np.uint8), axis=1, bitorder="little"
        )
        q = stream.reshape(rows, cols, bits) @ (1 << np.arange(bits))
        q = q.astype(np.float32).reshape(rows, cols // group, group)
        s = self.scales.astype(np.float32)[..., None]
        b = self.biases.astype(np.float32)[..., None]
        return (q * s + b).reshape(rows, cols)


Stored = np.ndarray | Packed


def stored_tensor(source, name: str) -> Stored:
    """`source.stored(name)` where the source has it, else its float `get(name)`.

    Custom TensorSources written before Packed existed only offer `get`.
    """
    stored = getattr(source, "stored", None)
    return stored(name) if stored is not None else source.get(name)


def as_float(t: Stored) -> np.ndarray:
    """A stored tensor as floats: Packed dequantized to float32, arrays as they are."""
    return t.dequantize() if isinstance(t, Packed) else t


def lookup_rows(table: Stored, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` (any shape) of an embedding table, (*ids.shape, D).

    Float tables give their stored dtype; a packed table is decoded to float32
    only for the distinct rows taken.
    """
    flat = np.asarray(ids).reshape(-1)
    if isinstance(table, Packed):
        uniq, inverse = np.unique(flat, return_inverse=True)
        rows = table.take_rows(uniq).dequantize()[inverse]
    else:
        rows = table[flat]  # fancy indexing: a new, writable array
    return rows.reshape(*np.shape(ids), -1)


def release_pages(a: np.ndarray) -> None:
    """Drop the file pages under `a` from this process's resident memory.

    For a view of a read-only memory-mapped file (np.memmap, or mmap.mmap
    directly or through np.frombuffer's memoryview) that
    a backend has copied (e.g. fused with its neighbours): the copy is what it
    keeps, and the pages read to make it would otherwise stay resident beside it.
    Whole pages inside the array only; anything else is left alone.
    """
    base = a
    while isinstance(base, np.ndarray) and not isinstance(base, np.memmap):
        base = base.base
    if isinstance(base, memoryview):  # np.frombuffer(mmap): safetensors' views
        base = base.obj
    if isinstance(base, np.memmap):
        mm, start = getattr(base, "_mmap", None), base.ctypes.data
    elif isinstance(base, mmap.mmap):
        mm, start = base, np.frombuffer(base, np.uint8, 1).ctypes.data
    else:
        return
    if mm is None or not hasattr(mm, "madvise"):
        return
    offset = a.ctypes.data - start
    page = mmap.PAGESIZE
    lo = -(-offset // page) * page
    hi = (offset + a.nbytes) // page * page
    if hi > lo:
        try:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError):
            pass  # only memory is at stake
