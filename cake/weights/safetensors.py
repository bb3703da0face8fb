"""Lazy reader for Hugging Face safetensors checkpoints, single file or sharded.

The header is parsed here and each tensor is a view into a read-only memory map,
so a stage touches only the bytes of the tensors it asks for. The `safetensors`
package's NumPy path cannot return bfloat16 (NumPy has no such type), hence
the direct read of its documented layout: 8-byte little-endian header length,
JSON header {name: {dtype, shape, data_offsets}}, then the raw data.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from cake.errors import ModelError

_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER = 100 * 1024 * 1024


class _File:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) != 8:
                    raise ModelError(f"{path} is not a safetensors file (too short)")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER:
                    raise ModelError(f"{path} is not a safetensors file (bad header)")
                header = json.loads(f.read(n))
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise ModelError(f"cannot read safetensors file {path}: {e}") from None
        header.pop("__metadata__", None)
        self.start = 8 + n
        self.entries: dict[str, dict] = header

    def get(self, name: str) -> np.ndarray:
        e = self.entries[name]
        dtype = _DTYPES.get(e["dtype"])
        if dtype is None:
            raise ModelError(
                f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}"
            )
        a, b = e["data_offsets"]
        shape = tuple(e["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        if b - a != count * dtype.itemsize or self.start + b > len(self._mm):
            raise ModelError(f"{self.path}: tensor {name} is truncated or corrupt")
        return np.frombuffer(self._mm, dtype, count, self.start + a).reshape(shape)


class SafetensorsSource:
    """All `*.safetensors` of a model folder (via `model.safetensors.index.json` if sharded)."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        self._where: dict[str, Path] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ModelError(f"{index} is malformed: {e}") from None
            for name, fname in weight_map.items():
                self._where[name] = folder / fname
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise ModelError(f"no .safetensors files in {folder}")
            for f in files:
                for name in _File(f).entries:
                    self._where[name] = f
        self._files: dict[Path, _File] = {}

    def _file(self, path: Path) -> _File:
        f = self._files.get(path)
        if f is None:
            if not path.exists():
                raise ModelError(f"checkpoint shard {path} is missing")
            f = self._files[path] = _File(path)
        return f

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(self._path(name)).entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        return self._file(self._path(name)).get(name)

    def _path(self, name: str) -> Path:
        try:
            return self._where[name]
        except KeyError:
            raise ModelError(f"the checkpoint has no tensor {name}") from None
