"""`cake split`: one folder per worker holding only that worker's tensors.

Each folder is a Hugging Face model folder (config.json, tokenizer files,
model.safetensors) that the normal reader opens, plus `cake-shard.json`
recording which layers it holds. A GGUF source is written in the Hugging Face
layout: tensors dequantized and un-permuted as `GGUFSource.get` returns them,
a config.json built from the GGUF metadata and a tokenizer.json exported from
cake's tokenizer. See docs/bench.md.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from cake.config import ModelConfig
from cake.errors import CakeError
from cake.shard import Shard
from cake.topology import Topology, load_topology, placements
from cake.weights.checkpoint import open_checkpoint
from cake.weights.names import head_tensor_names, shard_tensor_names
from cake.weights.source import TensorSource

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
SHARD_FILE = "cake-shard.json"
MASTER = "master"  # the folder of the master's part (embedding, head, its layers)

_CODES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float64): "F64",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def write_safetensors(
    path: str | os.PathLike[str],
    names: Sequence[str],
    tensors: TensorSource,
    metadata: dict[str, str] | None = None,
) -> int:
    """Write `names` from `tensors` as one safetensors file; returns the data bytes.

    Streams: one tensor is in memory at a time (safetensors' own `save_file`
    wants them all at once, too much for a dequantized GGUF). The header goes
    last, into room reserved for its largest possible size and padded with
    spaces, which the format allows: 8-byte little-endian header length, JSON
    header {name: {dtype, shape, data_offsets}}, then the raw data.
    """
    shapes = [tuple(int(n) for n in tensors.shape(name)) for name in names]
    bound = 8 * sum(math.prod(s) for s in shapes)  # no dtype is wider than 8 bytes

    def header(entries: dict[str, Any]) -> bytes:
        meta = {"__metadata__": metadata} if metadata else {}
        return json.dumps({**meta, **entries}, separators=(",", ":")).encode()

    worst = header(
        {
            n: {"dtype": "BOOL", "shape": list(s), "data_offsets": [bound, bound]}
            for n, s in zip(names, shapes, strict=True)
        }
    )
    room = len(worst) + (-(8 + len(worst)) % 8)  # data starts 8-byte aligned
    entries: dict[str, Any] = {}
    offset = 0
    with open(path, "wb") as f:
        f.seek(8 + room)
        for name, shape in zip(names, shapes, strict=True):
            a = np.ascontiguousarray(tensors.get(name))
            code = _CODES.get(a.dtype)
            if code is None or a.shape != shape:
                raise CakeError(
                    f"tensor {name}: cannot write dtype {a.dtype} shape {a.shape}"
                )
            f.write(a.reshape(-1).view(np.uint8).data)
            entries[name] = {
                "dtype": code,
                "shape": list(shape),
                "data_offsets": [offset, offset + a.nbytes],
            }
            offset += a.nbytes
        head = header(entries)
        f.seek(0)
        f.write(struct.pack("<Q", room) + head + b" " * (room - len(head)))
    return offset


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """config.json fields (Hugging Face names) that `ModelConfig.from_dict` reads
    back to an equal config."""
    d = config.to_dict()
    d.pop("qk_norm")  # implied by model_type qwen3
    window = d.pop("sliding_window")
    if config.model_type == "mistral":
        d["sliding_window"] = window
    elif config.model_type in ("qwen2", "qwen3"):
        d["use_sliding_window"] = window is not None
        d["sliding_window"] = window
    eos = list(config.eos_token_id)
    d["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
    if d["rope_scaling"] is None:
        d.pop("rope_scaling")
    return {"architectures": [_ARCHITECTURES[config.model_type]], **d}


def _export_tokenizer(model_path: Path, folder: Path) -> None:
    """tokenizer.json, tokenizer_config.json and generation_config.json of the
    tokenizer cake builds for `model_path` (a GGUF keeps it in its metadata)."""
    from cake.tokenizer import load_tokenizer

    tok = load_tokenizer(model_path)
    # Tokenizer wraps a `tokenizers.Tokenizer`, which saves itself whole:
    # vocabulary, merges, added tokens, pre-tokenizer and post-processor (BOS).
    tok._backend.save(str(folder / "tokenizer.json"))
    config = {**tok.special_tokens, "tokenizer_class": "PreTrainedTokenizerFast"}
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    _write_json(folder / "tokenizer_config.json", config)
    generation = {"eos_token_id": sorted(tok.eos_token_ids)}
    if tok.bos_token_id is not None:
        generation["bos_token_id"] = tok.bos_token_id
    _write_json(folder / "generation_config.json", generation)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _write_meta(
    model_path: Path, config: ModelConfig, folder: Path, done: Path | None
) -> None:
    """config.json and tokenizer files; copied from `done`, a finished folder."""
    if done is not None:
        model_path = done
    elif model_path.is_file():  # GGUF: build them from its metadata
        _write_json(folder / "config.json", hf_config_dict(config))
        _export_tokenizer(model_path, folder)
        return
    for f in ("config.json", *TOKENIZER_FILES):
        if (model_path / f).is_file():
            shutil.copy2(model_path / f, folder / f)


def _parts(topology: Topology, n_layers: int, master: bool):
    """(folder name, half-open ranges, embed/head) for each worker, then the master."""
    places = placements(topology, n_layers)  # validates against the model
    for w in topology.workers:
        ranges = [(p.start, p.end) for p in places if p.worker is w]
        yield w.name, ranges, False
    if master:
        yield MASTER, [(p.start, p.end) for p in places if p.worker is None], True


def split_model(
    model_path: str | os.PathLike[str],
    topology: Topology | str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    master: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Path]:
    """Write one folder per worker of `topology` under `output_dir`: name -> folder.

    master: also write a `master` folder with the embedding, final norm, head and
    the layers no worker holds. progress(folder, tensors done, tensors total).
    """
    model_path = Path(model_path).expanduser()
    if not isinstance(topology, Topology):
        topology = load_topology(topology)
    config, tensors = open_checkpoint(model_path)
    n = config.num_hidden_layers
    parts = list(_parts(topology, n, master))
    if master and any(w.name == MASTER for w in topology.workers):
        raise CakeError(
            f"a worker is named {MASTER!r}, the master's folder: rename it or "
            "split with --no-master"
        )
    out = Path(output_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CakeError(f"output folder {out} exists and is not empty: choose another")
    for name, _, _ in parts:
        if name in (".", "..") or Path(name).name != name:
            raise CakeError(f"worker name {name!r} cannot be a folder name: rename it")
    folders: dict[str, Path] = {}
    for name, ranges, is_master in parts:
        folder = out / name
        folder.mkdir(parents=True)
        names = ["model.embed_tokens.weight"] if is_master else []
        for start, end in ranges:
            names += shard_tensor_names(config, Shard(start, end, n))
        if is_master:
            names += [x for x in head_tensor_names(config) if x not in names]
        _write_meta(model_path, config, folder, next(iter(folders.values()), None))
        counted = _Counting(tensors, name, len(names), progress)
        nbytes = write_safetensors(
            folder / "model.safetensors", names, counted, {"format": "pt"}
        )
        _write_json(
            folder / SHARD_FILE,
            {
                "format": 1,
                "source": str(model_path),
                "name": name,
                "n_layers": n,
                "layers": [list(r) for r in ranges],  # half-open [start, end)
                "layers_inclusive": [f"model.layers.{a}-{b - 1}" for a, b in ranges],
                "embed": is_master,
                "head": is_master,
                "tensors": len(names),
                "bytes": nbytes,
            },
        )
        folders[name] = folder
    return folders


class _Counting:
    """Passes a TensorSource through, reporting each tensor read."""

    def __init__(self, inner: TensorSource, name: str, total: int, progress) -> None:
        self._inner, self._name, self._total = inner, name, total
        self._progress, self._done = progress, 0

    def shape(self, name: str) -> tuple[int, ...]:
        return self._inner.shape(name)

    def get(self, name: str) -> np.ndarray:
        a = self._inner.get(name)
        self._done += 1
        if self._progress is not None:
            self._progress(self._name, self._done, self._total)
        return a
