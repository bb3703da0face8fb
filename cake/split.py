"""`cake split`: one folder per worker holding only that worker's tensors.

Each folder is a model folder that `open_checkpoint` opens, plus
`cake-shard.json` recording which layers it holds. Tensors are copied as
stored, never decoded, so a part is as large as its share of the original. A
safetensors source (float, or mlx-quantized) gives `model.safetensors` beside
its config.json and tokenizer files. A GGUF source gives `model.gguf`: the
part's tensors under their GGUF names in their stored types and all of the
original metadata (tokenizer included), beside a config.json of the whole
model (a part lacks tensors the GGUF reader infers facts from, such as an
untied head) and tokenizer files exported from cake's tokenizer. See
docs/bench.md.
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

import gguf
import ml_dtypes
import numpy as np

from cake.config import ModelConfig
from cake.errors import CakeError
from cake.shard import Shard
from cake.topology import Topology, load_topology, placements
from cake.weights.cache import raw_entries
from cake.weights.checkpoint import open_checkpoint
from cake.weights.gguf import GGUFSource, tensor_names
from cake.weights.names import head_tensor_names, shard_tensor_names
from cake.weights.packed import Packed, Stored, stored_tensor
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
GGUF_PART = "model.gguf"  # a part of a GGUF source
SAFETENSORS_PART = "model.safetensors"  # a part of a safetensors source
MASTER = "master"  # the folder of the master's part (embedding, head, its layers)

_CODES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float64): "F64",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.uint32): "U32",  # mlx-quantized weights
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}


def _raw_tensors(name: str, w: Stored) -> list[tuple[str, np.ndarray]]:
    """The safetensors entries that store `w`: one array, or an mlx-quantized
    matrix's packed weight, scales and biases (mlx-lm's names)."""
    if isinstance(w, Packed) and not w.is_mlx:
        raise CakeError(
            f"tensor {name} is stored as {w.format} blocks, which a safetensors "
            "file cannot hold: split the GGUF file itself"
        )
    base = name.removesuffix("weight")
    return [(name if role == "data" else base + role, a) for role, a in raw_entries(w)]


def _entry_bounds(tensors: TensorSource, name: str) -> list[tuple[str, tuple]]:
    """Names and shape bounds of `name`'s entries, for the header's room: an mlx
    matrix's three entries are each at most its logical shape."""
    shape = tuple(int(n) for n in tensors.shape(name))
    fmt = getattr(tensors, "format", None)
    if fmt is not None and fmt(name).startswith("MLX"):
        base = name.removesuffix("weight")
        return [(name, shape), (base + "scales", shape), (base + "biases", shape)]
    return [(name, shape)]


def write_safetensors(
    path: str | os.PathLike[str],
    names: Sequence[str],
    tensors: TensorSource,
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> int:
    """Write `names` from `tensors` as one safetensors file, each tensor as the
    checkpoint stores it (its dtype; an mlx-quantized matrix as its packed
    weight, scales and biases); returns the data bytes. on_tensor(name) after
    each.

    Streams: one tensor is in memory at a time (safetensors' own `save_file`
    wants them all at once). The header goes last, into room reserved for its
    largest possible size and padded with spaces, which the format allows:
    8-byte little-endian header length, JSON header {name: {dtype, shape,
    data_offsets}}, then the raw data.
    """
    bounds = [e for name in names for e in _entry_bounds(tensors, name)]
    bound = 8 * sum(math.prod(s) for _, s in bounds)  # no dtype is over 8 bytes

    def header(entries: dict[str, Any]) -> bytes:
        meta = {"__metadata__": metadata} if metadata else {}
        return json.dumps({**meta, **entries}, separators=(",", ":")).encode()

    worst = header(
        {
            n: {"dtype": "BOOL", "shape": list(s), "data_offsets": [bound, bound]}
            for n, s in bounds
        }
    )
    room = len(worst) + (-(8 + len(worst)) % 8)  # data starts 8-byte aligned
    planned = dict(bounds)
    entries: dict[str, Any] = {}
    offset = 0
    with open(path, "wb") as f:
        f.seek(8 + room)
        for name in names:
            for raw, a in _raw_tensors(name, stored_tensor(tensors, name)):
                a = np.ascontiguousarray(a)
                code, bound_shape = _CODES.get(a.dtype), planned.get(raw, ())
                fits = a.ndim == len(bound_shape) and all(
                    n <= b for n, b in zip(a.shape, bound_shape, strict=True)
                )
                if code is None or not fits:
                    raise CakeError(
                        f"tensor {raw}: cannot write dtype {a.dtype} shape {a.shape}"
                    )
                f.write(a.reshape(-1).view(np.uint8).data)
                entries[raw] = {
                    "dtype": code,
                    "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes],
                }
                offset += a.nbytes
            if on_tensor is not None:
                on_tensor(name)
        head = header(entries)
        f.seek(0)
        f.write(struct.pack("<Q", room) + head + b" " * (room - len(head)))
    return offset


def write_gguf(
    path: str | os.PathLike[str],
    reader: gguf.GGUFReader,
    names: Sequence[str],
    on_tensor: Callable[[str], None] | None = None,
) -> int:
    """Write the tensors `names` (Hugging Face names) of the GGUF file `reader`
    as a GGUF file with all of its metadata; returns the tensor data bytes.

    Each tensor keeps its GGUF name, its stored type and llama.cpp's Q/K row
    order, its bytes copied as they are (the reader un-permutes on reading);
    a stack of experts (`blk.N.ffn_gate_exps`) goes whole into the part that
    asks for any of them; tensors with no Hugging Face name
    (`rope_freqs.weight`, Phi-3's `rope_factors_*.weight`) go into every part.
    The vocabulary size is added to the metadata if missing: the reader takes
    it from `token_embd.weight`, which only the master's part holds.
    """
    keep = set(names)
    arch = reader.fields["general.architecture"].contents()
    hf = {t.name: tensor_names(t, arch) for t in reader.tensors}
    picked = [t for t in reader.tensors if not hf[t.name] or keep & set(hf[t.name])]
    found = {n for t in picked for n in hf[t.name]}
    if missing := [n for n in names if n not in found]:
        raise CakeError(f"the GGUF file has no tensor for {missing[0]}")
    writer = gguf.GGUFWriter(path, arch)
    align = reader.fields.get("general.alignment")
    if align is not None:
        writer.data_alignment = int(align.contents())
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # the writer's own: architecture, version, counts
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    if f"{arch}.vocab_size" not in reader.fields:
        vocab = next(
            (int(t.shape[1]) for t in reader.tensors if t.name == "token_embd.weight"),
            None,
        )
        if vocab is not None:
            writer.add_vocab_size(vocab)
    for t in picked:
        writer.add_tensor_info(
            t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = 0
    for t in picked:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
        total += int(t.n_bytes)
        if on_tensor is not None:
            for name in hf[t.name]:
                if name in keep:
                    on_tensor(name)
    writer.close()
    return total


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """config.json fields (Hugging Face names) that `ModelConfig.from_dict` reads
    back to an equal config."""
    d = config.to_dict()
    d.pop("moe")
    fam = config.family
    window = d.pop("sliding_window")
    if fam.sliding_window != "never":
        d["sliding_window"] = window
    if fam.sliding_window not in ("always", "never", "layer_types"):
        d[fam.sliding_window] = window is not None
    # the family's optional keys stay (null where unset: transformers would
    # put its own default in); the others are not the family's
    for key in (
        "query_pre_attn_scalar",
        "attn_logit_softcapping",
        "final_logit_softcapping",
    ):
        if key not in fam.config_keys:
            d.pop(key)
    if not d["layer_types"]:
        d.pop("layer_types")
    if fam.rope_local_default is None:
        d.pop("rope_local_base_freq")
    for key in fam.act_keys:  # Gemma 2/3 read hidden_activation, Gemma hidden_act
        d[key] = config.hidden_act
    eos = list(config.eos_token_id)
    d["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
    rs = config.rope_scaling
    if rs is None:
        d.pop("rope_scaling")
    else:
        d["rope_scaling"] = rs.hf_dict()
        if rs.rope_type == "longrope":  # where Phi-3's config keeps it
            d["original_max_position_embeddings"] = rs.original_max_position_embeddings
    if config.partial_rotary_factor == 1.0:
        d.pop("partial_rotary_factor")
    d.update(_moe_keys(config))
    return {"architectures": [fam.architecture], **d}


def _moe_keys(config: ModelConfig) -> dict[str, Any]:
    """The config keys of the family's experts (cake.family.MoeNames), for
    `hf_config_dict`; a MoE family's config without experts says so."""
    names, moe = config.family.moe, config.to_dict().get("moe")
    if names is None:
        return {}
    if moe is None:
        return {names.count_keys[0]: 0}
    d: dict[str, Any] = {
        names.count_keys[0]: moe["num_experts"],
        "num_experts_per_tok": moe["top_k"],
    }
    if names.size_key:
        d[names.size_key] = moe["intermediate_size"]
    if names.normalize_key:
        d[names.normalize_key] = moe["normalize"]
    if names.shared:
        d["shared_expert_intermediate_size"] = moe["shared_intermediate_size"]
    if names.sparse_keys:
        d["decoder_sparse_step"] = moe["decoder_sparse_step"]
        d["mlp_only_layers"] = list(moe["mlp_only_layers"])
    return d


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
    model_path: Path,
    config: ModelConfig,
    folder: Path,
    done: Path | None,
    reader: gguf.GGUFReader | None,
) -> None:
    """config.json and tokenizer files; copied from `done`, a finished folder.
    reader: the source's, when it is a GGUF file."""
    if done is not None:
        model_path = done
    elif model_path.is_file():  # GGUF: build them from its metadata
        _write_json(folder / "config.json", hf_config_dict(config))
        if reader is not None and "tokenizer.ggml.tokens" in reader.fields:
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
        reader = tensors.reader if isinstance(tensors, GGUFSource) else None
        _write_meta(
            model_path, config, folder, next(iter(folders.values()), None), reader
        )
        tick = _ticker(progress, name, len(names))
        if reader is not None:
            file = folder / GGUF_PART
            nbytes = write_gguf(file, reader, names, tick)
        else:
            file = folder / SAFETENSORS_PART
            nbytes = write_safetensors(file, names, tensors, {"format": "pt"}, tick)
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
                "file": file.name,
                "bytes": nbytes,  # of tensor data, as stored
            },
        )
        folders[name] = folder
    return folders


def _ticker(progress, part: str, total: int) -> Callable[[str], None]:
    """A per-tensor callback calling progress(part, tensors done, total)."""
    done = 0

    def tick(_: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(part, done, total)

    return tick
