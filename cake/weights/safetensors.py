"""Lazy reader for Hugging Face safetensors checkpoints, single file or sharded.

The header is parsed here and each tensor is a view into a read-only memory map,
so a stage touches only the bytes of the tensors it asks for. The `safetensors`
package's NumPy path cannot return bfloat16 (NumPy has no such type), hence
the direct read of its documented layout: 8-byte little-endian header length,
JSON header {name: {dtype, shape, data_offsets}}, then the raw data.

Folders quantized by mlx-lm (config.json "quantization": {group_size, bits},
optionally per module) store a linear `X.weight` as packed uint32 beside
`X.scales` and `X.biases`; `stored` hands those out as one `Packed` and `get`
dequantizes them.

mlx-lm folders of a mixture of experts (its models' `sanitize`) stack each
role's experts in one tensor, float or quantized:
`model.layers.N.<block>.switch_mlp.{gate_proj,up_proj,down_proj}.{weight,scales,biases}`,
(E, out, ...). Each expert's Hugging Face name
(`model.layers.N.block_sparse_moe.experts.E.w1.weight`) is a view of its
slice of the stack, as the GGUF reader hands out llama.cpp's stacks.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from cake.config import ModelConfig
from cake.errors import ModelError
from cake.weights.packed import Packed, Stored, mlx_format, parse_mlx_format

_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER = 100 * 1024 * 1024
# mlx-lm's stacked experts (SwitchGLU): layer, MoE block, role, entry; (E, out, ...)
_SWITCH = re.compile(
    r"model\.layers\.(\d+)\.(\w+)\.switch_mlp\.(\w+)\.(weight|scales|biases)"
)
_ROLES = ("gate_proj", "up_proj", "down_proj")  # the family's gate, up, down
_EXPERT = re.compile(r"(model\.layers\.\d+\.\w+)\.experts\.\d+\.(\w+)")


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
    """All `*.safetensors` of a model folder (via `model.safetensors.index.json` if sharded).

    quantization: config.json's "quantization" entry of an mlx-lm folder
    ({"group_size", "bits"} and optional per-module overrides), or None.
    config: the folder's config, which names a MoE family's experts; needed
    where the folder stacks them as mlx-lm does.
    """

    def __init__(
        self,
        folder: str | Path,
        quantization: dict | None = None,
        config: ModelConfig | None = None,
    ) -> None:
        folder = Path(folder)
        self._folder, self._config = folder, config
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
        # an expert's entry name -> (its stack's entry name, expert index)
        self._slices: dict[str, tuple[str, int]] = {}
        if any(_SWITCH.fullmatch(n) for n in self._where):
            self._unstack()
        self._quant = quantization or {}
        # X.weight -> its mlx format, for every X with X.scales beside it
        self._packed = {
            f"{m}.weight": self._format(m)
            for n in self._where
            if n.endswith(".scales") and f"{(m := n[: -len('.scales')])}.weight" in self
        }
        if self._packed and not self._quant:
            raise ModelError(
                f"{folder} holds quantized weights (.scales tensors) but config.json "
                "has no 'quantization' entry saying their bits and group size"
            )
        hidden = {
            n[: -len("weight")] + x for n in self._packed for x in ("scales", "biases")
        }
        self._names = [n for n in self._where if n not in hidden]

    def _unstack(self) -> None:
        """Put each expert's names of mlx-lm's stacks in `_where` in place of
        the stack's (`_slices` says where each is)."""
        c = self._config
        if c is None:
            raise ModelError(
                f"{self._folder} stacks its experts as mlx-lm does (switch_mlp): "
                "open it with its config (open_checkpoint reads config.json)"
            )
        names = None if c.moe is None else c.family.moe
        where: dict[str, Path] = {}
        for name, path in self._where.items():
            m = _SWITCH.fullmatch(name)
            if m is None:
                where[name] = path
                continue
            layer, block, role, entry = m.groups()
            if names is None or block != names.block or role not in _ROLES:
                what = "no mixture of experts" if names is None else c.model_type
                raise ModelError(
                    f"{self._folder} holds {name}, stacked experts that config.json "
                    f"({what}) does not have: the folder and its config.json do "
                    "not match"
                )
            shape = self._file(path).entries[name]["shape"]  # (E, out, ...)
            count = int(shape[0]) if len(shape) == 3 else None
            if count != c.moe.num_experts:
                raise ModelError(
                    f"{name} of shape {tuple(shape)} is not a stack of the "
                    f"{c.moe.num_experts} experts config.json says the model has: "
                    "the folder is inconsistent"
                )
            leaf = (*names.gate_up, names.down)[_ROLES.index(role)]
            for e in range(count):
                expert = f"model.layers.{layer}.{block}.experts.{e}.{leaf}.{entry}"
                where[expert] = path
                self._slices[expert] = (name, e)
        self._where = where

    def _quant_key(self, module: str) -> str:
        """The module whose entry in "quantization" holds `module`'s bits: an
        expert's is its stack's, as mlx-lm quantizes the stack (a part that
        `cake split` wrote holds the expert under its own name)."""
        m = _EXPERT.fullmatch(module)
        names = None if self._config is None else self._config.family.moe
        if m is None or names is None or m[2] not in (*names.gate_up, names.down):
            return module
        role = _ROLES[(*names.gate_up, names.down).index(m[2])]
        return f"{m[1]}.switch_mlp.{role}"

    def _format(self, module: str) -> str:
        q = self._quant.get(module, self._quant.get(self._quant_key(module)))
        if not isinstance(q, dict) or "bits" not in q:
            q = self._quant
        try:
            return mlx_format(int(q["bits"]), int(q["group_size"]))
        except (KeyError, TypeError, ValueError):
            raise ModelError(
                f"config.json 'quantization' lacks bits/group_size for {module}"
            ) from None

    def _file(self, path: Path) -> _File:
        f = self._files.get(path)
        if f is None:
            if not path.exists():
                raise ModelError(f"checkpoint shard {path} is missing")
            f = self._files[path] = _File(path)
        return f

    def _raw(self, name: str) -> np.ndarray:
        stack, e = self._slices.get(name, (name, None))
        a = self._file(self._path(name)).get(stack)
        return a if e is None else a[e]  # a view: the stack stays mapped

    def _entry(self, name: str) -> tuple[str, tuple[int, ...], int]:
        """dtype, shape and bytes of an entry (an expert's: its slice of the stack)."""
        stack, e = self._slices.get(name, (name, None))
        entry = self._file(self._path(name)).entries[stack]
        a, b = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if e is None:
            return entry["dtype"], shape, b - a
        return entry["dtype"], shape[1:], (b - a) // shape[0]

    def keys(self) -> list[str]:
        return list(self._names)

    def files(self) -> list[Path]:
        """The .safetensors files the tensors are read from."""
        return sorted(set(self._where.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        shape = self._entry(name)[1]
        fmt = self._packed.get(name)
        if fmt is None:
            return shape
        bits, _ = parse_mlx_format(fmt)
        return (shape[0], shape[1] * 32 // bits)

    def format(self, name: str) -> str:
        """mlx formats by name (MLX4G64), floats by safetensors dtype (BF16, F32)."""
        if name in self._packed:
            return self._packed[name]
        return self._entry(name)[0]

    def nbytes(self, name: str) -> int:
        fmt = self._packed.get(name)
        names = [name] if fmt is None else [name, *self._companions(name)]
        return sum(self._entry(n)[2] for n in names)

    def _companions(self, name: str) -> list[str]:
        base = name[: -len("weight")]
        return [base + "scales", base + "biases"]

    def stored(self, name: str) -> Stored:
        fmt = self._packed.get(name)
        if fmt is None:
            return self._raw(name)
        scales, biases = (self._raw(n) for n in self._companions(name))
        return Packed(fmt, self.shape(name), self._raw(name), scales, biases)

    def get(self, name: str) -> np.ndarray:
        w = self.stored(name)
        return w.dequantize() if isinstance(w, Packed) else w

    def _path(self, name: str) -> Path:
        try:
            return self._where[name]
        except KeyError:
            raise ModelError(f"the checkpoint has no tensor {name}") from None
