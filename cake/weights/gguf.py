"""GGUF checkpoints (llama.cpp) as a TensorSource: the architectures a family
of cake.family names as its `gguf_arch` (llama, olmo2, phi3, gemma, gemma2,
gemma3, qwen2moe, qwen3moe; a llama file with experts is Mixtral).

The file is memory-mapped by `gguf.GGUFReader`. `stored` hands a tensor out as
the file holds it (float arrays, quantized types as `Packed` blocks, no
decoding pass); `get` is the float view, decoded only when asked for. Names
are mapped to Hugging Face names, shapes are (out, in) as in PyTorch, and the
Q/K projections of llama GGUFs are un-permuted from llama.cpp's rotary layout
back to Hugging Face's (the other architectures keep Hugging Face's: llama.cpp
rotates them in halves, as transformers does). Gemma files hold their RMSNorm
weights with the 1 of `1 + w` already added (convert_hf_to_gguf adds it);
`stored`/`get` give them back as Hugging Face holds them (w), so the family's
norm offset applies to every checkpoint alike. A MoE layer's experts are
stacked in one tensor per projection (`blk.N.ffn_gate_exps`, (E, out, in));
each expert's Hugging Face name is a view of its slice of the stack.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

from cake.config import ModelConfig
from cake.errors import ModelError
from cake.family import FAMILIES, Family
from cake.weights.packed import (
    GGUF_FORMATS,
    Packed,
    Stored,
    as_float,
    release_pages,
)

Q = GGMLQuantizationType
_FLOAT = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: ml_dtypes.bfloat16}
_QUANT = tuple(Q[f] for f in GGUF_FORMATS)

_TOP = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_qkv": "self_attn.qkv_proj",  # phi3
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",  # olmo2
    "post_ffw_norm": "post_feedforward_layernorm",  # olmo2
}
# the norm before the MLP is `ffn_norm` in every llama.cpp architecture: the
# Gemma 2/3 sandwich's pre_feedforward_layernorm
_ARCH_LAYER = {
    "gemma2": {"ffn_norm": "pre_feedforward_layernorm"},
    "gemma3": {"ffn_norm": "pre_feedforward_layernorm"},
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)")
# a MoE layer's experts, stacked (E, out, in) as the family's gate, up, down
_STACKS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
# one tensor per expert, as older llama.cpp wrote Mixtral: blk.N.ffn_gate.E
_PER_EXPERT = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)")
_ROW = ".shared_expert_gate."  # a (1, D) matrix in HF, whatever the file holds
_SHARED = {"ffn_gate_shexp": "gate_proj", "ffn_up_shexp": "up_proj",
           "ffn_down_shexp": "down_proj"}  # fmt: skip
# llama.cpp's converter reorders Q/K rows for the architectures it rotates in
# adjacent pairs (rope type NORM); of those cake reads, only llama (Mixtral too)
_PERMUTED = {"llama"}
# architecture -> {whether the file has experts: family}; llama is both
_GGUF_FAMILIES = {
    arch: {f.moe is not None: f for f in FAMILIES.values() if f.gguf_arch == arch}
    for arch in dict.fromkeys(f.gguf_arch for f in FAMILIES.values() if f.gguf_arch)
}
# whether llama.cpp renormalises the top-k routing weights (build_moe_ffn's
# norm_w, fixed per architecture in src/models/*.cpp; the converter writes no
# norm_topk_prob): llama (Mixtral) always does, as the family does
_RENORMALISED = {"qwen2moe": False, "qwen3moe": True}


def _arch_family(arch: str, moe: bool) -> Family | None:
    """The family of a llama.cpp architecture: its MoE one where `moe` and it
    has one, else its dense one (or its only one)."""
    by = _GGUF_FAMILIES.get(arch)
    if by is None:
        return None
    return by.get(moe) or next(iter(by.values()))


def _moe_name(base: str, arch: str) -> str | None:
    """The Hugging Face name (less its suffix) of a MoE layer's router, shared
    expert or old-style per-expert tensor; None for any other."""
    fam = _arch_family(arch, moe=True)
    if fam is None or fam.moe is None:
        return None
    names = fam.moe
    if m := _PER_EXPERT.fullmatch(base):
        leaf = (*names.gate_up, names.down)[("gate", "up", "down").index(m[2])]
        return f"model.layers.{m[1]}.{names.block}.experts.{m[3]}.{leaf}"
    m = _BLOCK.fullmatch(base)
    if m is None:
        return None
    block = f"model.layers.{m[1]}.{names.block}."
    if m[2] == "ffn_gate_inp":
        return block + "gate"
    if names.shared and m[2] in _SHARED:
        return f"{block}{names.shared}.{_SHARED[m[2]]}"
    if names.shared_gate and m[2] == "ffn_gate_inp_shexp":
        return block + names.shared_gate
    return None


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if
    the tensor has no Hugging Face counterpart (e.g. `rope_freqs.weight`) or
    is a stack of experts, which has one per expert (`hf_names`).

    `ffn_up` is the stacked gate|up (`mlp.gate_up_proj`) of an architecture
    whose family fuses them (phi3), as llama.cpp writes it."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _TOP:
        return f"{_TOP[base]}.{suffix}"
    if (moe := _moe_name(base, arch)) is not None:
        return f"{moe}.{suffix}"
    m = _BLOCK.fullmatch(base)
    if m and m[2] in _LAYER:
        part = _ARCH_LAYER.get(arch, {}).get(m[2]) or _LAYER[m[2]]
        fam = _arch_family(arch, moe=False)
        if part == "mlp.up_proj" and fam is not None and len(fam.gate_up) == 1:
            part = "mlp." + fam.gate_up[0]
        return f"model.layers.{m[1]}.{part}.{suffix}"
    return None


def hf_names(gguf_name: str, arch: str = "llama", experts: int = 0) -> list[str]:
    """Every Hugging Face name of a GGUF tensor: `[hf_name(...)]`, or [] where
    it has none; a stack of `experts` experts (`blk.3.ffn_gate_exps.weight`,
    (E, out, in)) has expert e's at e
    (`model.layers.3.block_sparse_moe.experts.{e}.w1.weight` for Mixtral)."""
    base, _, suffix = gguf_name.rpartition(".")
    m = _BLOCK.fullmatch(base)
    fam = _arch_family(arch, moe=True)
    if m and m[2] in _STACKS and fam is not None and fam.moe is not None:
        names = fam.moe
        leaf = (*names.gate_up, names.down)[_STACKS.index(m[2])]
        block = f"model.layers.{m[1]}.{names.block}.experts"
        return [f"{block}.{e}.{leaf}.{suffix}" for e in range(experts)]
    name = hf_name(gguf_name, arch)
    return [] if name is None else [name]


def tensor_names(tensor: Any, arch: str) -> list[str]:
    """`hf_names` of one of a GGUFReader's tensors; a stack's experts are its
    outermost dimension (GGUF lists it last)."""
    shape = tensor.shape.tolist()
    return hf_names(tensor.name, arch, int(shape[-1]) if len(shape) == 3 else 0)


class _Reader(GGUFReader):
    """gguf-py's reader, slicing a plain ndarray view of its memory map.

    Every metadata value is a slice of the map; np.memmap's Python-level
    __getitem__ and __array_finalize__ made parsing SmolLM2's 49k-token vocabulary
    take 2-6 s of a 4-9 s load (profiled). The plain view shares the pages; the
    map itself (`data`) stays, for tensors and for madvise.
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        count = int(count)
        end = offset + np.dtype(dtype).itemsize * count
        arr = plain[offset:end].view(dtype=dtype)[:count]
        order = self.byte_order if override_order is None else override_order
        return arr.view(arr.dtype.newbyteorder(order))


def open_gguf(path: str | Path) -> GGUFReader:
    """Memory-map a GGUF file; any unreadable file becomes a one-line ModelError."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"no GGUF file at {path}")
    try:
        return _Reader(path, "r")
    except Exception as e:  # gguf/numpy raise ValueError, IndexError, OSError, ...
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise ModelError(
            f"{path} is not a valid GGUF file ({why}); it may be truncated or "
            "corrupt: download or convert it again"
        ) from None


def _meta(reader: GGUFReader, key: str, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise ModelError(f"GGUF metadata lacks {key!r}: the file is incomplete")
        return default
    return field.contents()


def _family(reader: GGUFReader) -> Family:
    arch = _meta(reader, "general.architecture")
    experts = _meta(reader, f"{arch}.expert_count", 0) or 0
    fam = _arch_family(arch, moe=int(experts) > 0)
    if fam is None:
        raise ModelError(
            f"GGUF architecture {arch!r} is not supported: cake reads "
            f"{', '.join(_GGUF_FAMILIES)} GGUFs"
        )
    return fam


def _unpermute(w: Stored, n_head: int) -> Stored:
    """Undo llama.cpp's `LlamaModel.permute` on the rows of a Q or K projection.

    llama.cpp rotates adjacent pairs (2i, 2i+1) of each head; Hugging Face
    rotates halves (i, i + head_dim/2). The converter reordered each head's
    rows from (2, head_dim/2) to (head_dim/2, 2); swap them back. Only rows
    move, so quantized blocks move whole and stay as they are.
    """
    rows = w.shape[0]
    # row order (n_head, head_dim/2, 2) -> (n_head, 2, head_dim/2)
    order = np.arange(rows).reshape(n_head, rows // n_head // 2, 2).swapaxes(1, 2)
    order = order.reshape(-1)
    return w.take_rows(order) if isinstance(w, Packed) else w[order]


def llama3_rope_factors(
    head_dim: int,
    theta: float,
    factor: float,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_position_embeddings: int = 8192,
) -> np.ndarray:
    """The (head_dim/2,) frequency divisors llama.cpp stores as `rope_freqs.weight`."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * math.pi / freqs
    old = original_max_position_embeddings
    smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen > old / low_freq_factor, factor, mid)
    return np.where(wavelen < old / high_freq_factor, 1.0, out).astype(np.float32)


def _rope_scaling(
    reader: GGUFReader, arch: str, head_dim: int, theta: float
) -> dict[str, Any] | None:
    kind = _meta(reader, f"{arch}.rope.scaling.type", None)
    old = _meta(reader, f"{arch}.rope.scaling.original_context_length", 8192)
    if kind and kind != "none":  # linear, yarn: ModelConfig rejects them by name
        factor = _meta(reader, f"{arch}.rope.scaling.factor", 1.0)
        return {
            "rope_type": kind,
            "factor": factor,
            "original_max_position_embeddings": old,
        }
    tensors = {t.name: t for t in reader.tensors}
    if "rope_factors_long.weight" in tensors:
        # Phi-3 longrope: llama.cpp stores both factor sets as tensors
        def factors(name: str) -> list[float]:
            data = np.asarray(tensors[name].data, dtype=np.float32).reshape(-1)
            return data.tolist()

        d = {
            "rope_type": "longrope",
            "short_factor": factors("rope_factors_short.weight"),
            "long_factor": factors("rope_factors_long.weight"),
            "original_max_position_embeddings": old,
        }
        attn = _meta(reader, f"{arch}.rope.scaling.attn_factor", None)
        return d if attn is None else {**d, "attention_factor": float(attn)}
    stored = tensors.get("rope_freqs.weight")
    if stored is None:
        return None
    # Llama 3.1+: llama.cpp stores the computed divisors, not the parameters.
    # Recover them as the published defaults with the largest divisor as factor,
    # and refuse a file whose divisors those do not reproduce.
    got = np.asarray(stored.data, dtype=np.float32).reshape(-1)
    params = {"factor": float(got.max()), "original_max_position_embeddings": old}
    want = llama3_rope_factors(head_dim, theta, **params)
    if want.shape != got.shape or not np.allclose(want, got, rtol=1e-4):
        raise ModelError(
            "GGUF rope_freqs.weight does not match Llama 3 rope scaling with "
            "low/high frequency factors 1 and 4: cake cannot run this file"
        )
    return {"rope_type": "llama3", **params}


def gguf_config(path_or_reader: str | Path | GGUFReader) -> ModelConfig:
    """Build the ModelConfig of a GGUF file from its metadata."""
    if isinstance(path_or_reader, GGUFReader):
        reader = path_or_reader
    else:
        reader = open_gguf(path_or_reader)
    fam = _family(reader)
    a = fam.gguf_arch
    tensors = {t.name: t for t in reader.tensors}
    hidden = int(_meta(reader, f"{a}.embedding_length"))
    n_heads = int(_meta(reader, f"{a}.attention.head_count"))
    # as llama.cpp: the key length, else hidden / heads; RoPE turns
    # rope.dimension_count of them (fewer: partial rotary)
    rot = _meta(reader, f"{a}.rope.dimension_count", None)
    key_length = _meta(reader, f"{a}.attention.key_length", None)
    head_dim = int(key_length or (rot if a == "llama" else None) or hidden // n_heads)
    theta = float(_meta(reader, f"{a}.rope.freq_base", 10000.0))
    if "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[1])  # ne = (hidden, vocab)
    elif "tokenizer.ggml.tokens" in reader.fields:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    else:
        vocab = int(_meta(reader, f"{a}.vocab_size"))
    eos = [
        int(v)
        for k in ("eos_token_id", "eot_token_id", "eom_token_id")
        if (v := _meta(reader, f"tokenizer.ggml.{k}", None)) is not None
    ]
    file_type = _meta(reader, "general.file_type", 0)
    d = {
        "model_type": fam.model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(_meta(reader, f"{a}.feed_forward_length")),
        "num_hidden_layers": int(_meta(reader, f"{a}.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(
            _meta(reader, f"{a}.attention.head_count_kv", n_heads)
        ),
        "head_dim": head_dim,
        "rms_norm_eps": float(
            _meta(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
        ),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(reader, a, head_dim, theta),
        "max_position_embeddings": int(_meta(reader, f"{a}.context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors
        or "blk.0.attn_qkv.bias" in tensors,
        "partial_rotary_factor": int(rot) / head_dim if rot else 1.0,
        # 0 or absent: none (Phi-4 writes 0)
        "sliding_window": _meta(reader, f"{a}.attention.sliding_window", None) or None,
        **_gemma(reader, a, hidden, n_heads, head_dim),  # its window wins
        **_experts(reader, fam, tensors),
        "bos_token_id": _meta(reader, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": list(dict.fromkeys(eos)),
        # llama_ftype: 1 = mostly F16, 32 = mostly BF16; quantized files decode to F32
        "torch_dtype": {1: "float16", 32: "bfloat16"}.get(file_type, "float32"),
    }
    return ModelConfig.from_dict(d)


def _experts(reader: GGUFReader, fam: Family, tensors: dict) -> dict[str, Any]:
    """The config.json keys of a MoE family's experts, as llama.cpp reads
    them: the expert width (else feed_forward_length / top-k), the shared
    expert's (else feed_forward_length), renormalisation as `_RENORMALISED`.
    A Qwen layer without a router whose dense MLP the file holds is one of
    `mlp_only_layers` (llama.cpp's converter writes such a layer's MLP as a
    dense one; llama.cpp itself runs none)."""
    names, a = fam.moe, fam.gguf_arch
    if names is None:
        return {}
    n_ff = int(_meta(reader, f"{a}.feed_forward_length"))
    top_k = int(_meta(reader, f"{a}.expert_used_count", 0))
    d: dict[str, Any] = {
        names.count_keys[0]: int(_meta(reader, f"{a}.expert_count", 0)),
        "num_experts_per_tok": top_k,
    }
    scale = float(_meta(reader, f"{a}.expert_weights_scale", 0.0))
    shared = int(_meta(reader, f"{a}.expert_shared_feed_forward_length", 0))
    if scale not in (0.0, 1.0) or (shared and not names.shared):
        what = "scaled expert weights" if scale not in (0.0, 1.0) else "shared experts"
        raise ModelError(
            f"this {a} GGUF has {what}, which {fam.model_type} models do not "
            "have: cake cannot run it"
        )
    if names.size_key:
        size = _meta(reader, f"{a}.expert_feed_forward_length", None)
        d[names.size_key] = int(size or n_ff // max(top_k, 1))
    if names.normalize_key:
        d[names.normalize_key] = _RENORMALISED[a]
    if names.shared:
        d["shared_expert_intermediate_size"] = shared or n_ff
    if names.sparse_keys:
        n_layers = int(_meta(reader, f"{a}.block_count"))
        d["mlp_only_layers"] = [
            i
            for i in range(n_layers)
            if f"blk.{i}.ffn_down.weight" in tensors
            and f"blk.{i}.ffn_gate_inp.weight" not in tensors
        ]
    return d


# llama.cpp's Gemma 2/3 27B (by its layer count) scale queries by
# (hidden / heads) ** -0.5, the others by head_dim ** -0.5 (gemma_pytorch's
# query_pre_attn_scalar); the file stores no scale
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _gemma(
    reader: GGUFReader, arch: str, hidden: int, n_heads: int, head_dim: int
) -> dict[str, Any]:
    """The config.json keys of a Gemma 2/3 file, as llama.cpp's loader reads it:
    the window (Gemma 2: 4096 unless given), soft-caps (Gemma 2: 50 and 30
    unless given), the query scale and (Gemma 3) the local layers' RoPE base
    (10000 unless `rope.freq_base_swa`). Which layers are local is the family's
    fixed pattern (every other; five in six), as llama.cpp has it."""
    if arch not in _GEMMA_27B_LAYERS:
        return {}
    n_layers = int(_meta(reader, f"{arch}.block_count"))
    big = n_layers == _GEMMA_27B_LAYERS[arch]
    gemma2 = arch == "gemma2"
    d = {
        "query_pre_attn_scalar": hidden // n_heads if big else head_dim,
        "sliding_window": _meta(
            reader, f"{arch}.attention.sliding_window", 4096 if gemma2 else ...
        ),
        "final_logit_softcapping": _meta(
            reader, f"{arch}.final_logit_softcapping", 30.0 if gemma2 else None
        ),
    }
    if gemma2:
        d["attn_logit_softcapping"] = _meta(
            reader, f"{arch}.attn_logit_softcapping", 50.0
        )
    else:
        d["rope_local_base_freq"] = _meta(reader, f"{arch}.rope.freq_base_swa", None)
    return d


class GGUFSource:
    """Lazy TensorSource over a GGUF file, speaking Hugging Face names.

    `stored(name)`: F32/F16/BF16 tensors as arrays of their dtype (BF16 as
    ml_dtypes.bfloat16) and the quantized types of `GGUF_FORMATS` as `Packed`,
    memory-mapped. `get(name)`: the float view (quantized types dequantized to
    float32). Any other type raises ModelError naming it. `config` is the
    file's ModelConfig.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._reader = open_gguf(self.path)
        self.config = gguf_config(self._reader)
        self.reader = self._reader  # shared with the tokenizer: parse the file once
        arch = self.config.family.gguf_arch
        self._permuted = arch in _PERMUTED
        self._norm_offset = self.config.family.norm_offset
        # HF name -> (reader tensor, expert e of a stack, or None)
        self._tensors: dict[str, tuple[Any, int | None]] = {}
        for t in self._reader.tensors:
            stacked = len(t.shape) == 3
            for e, hf in enumerate(tensor_names(t, arch)):
                self._tensors[hf] = (t, e if stacked else None)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def files(self) -> list[Path]:
        """The file the tensors are read from."""
        return [self.path]

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def _entry(self, name: str) -> tuple[Any, int | None]:
        entry = self._tensors.get(name)
        if entry is None:
            raise ModelError(f"{self.path} has no tensor {name!r}")
        return entry

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists ne[0] (the innermost, contiguous dim) first: reverse it;
        # an expert of a stack (E, out, in) is one (out, in) slice
        t, e = self._entry(name)
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        if e is not None:
            return shape[1:]
        # Qwen2-MoE's shared expert gate is (1, D) in HF; llama.cpp reads (D,)
        return (1, *shape) if len(shape) == 1 and _ROW in name else shape

    def format(self, name: str) -> str:
        """The stored type's name: F32, F16, BF16, Q4_K, ..."""
        return self._entry(name)[0].tensor_type.name

    def nbytes(self, name: str) -> int:
        """Bytes the tensor (an expert: its slice of the stack) takes in the file."""
        t, e = self._entry(name)
        return int(t.n_bytes) if e is None else int(t.n_bytes) // int(t.shape[-1])

    def stored(self, name: str) -> Stored:
        t, e = self._entry(name)
        data = t.data if e is None else t.data[e]  # a view: the stack stays mapped
        shape = self.shape(name)
        kind = t.tensor_type
        if kind in _FLOAT:
            # The reader exposes BF16 as raw bytes (rows, 2*cols): view as bfloat16.
            w: Stored = data.view(_FLOAT[kind]).reshape(shape)
        elif kind in _QUANT and len(shape) == 2:
            w = Packed(kind.name, shape, data.reshape(shape[0], -1))
        else:
            known = ", ".join(["F32", "F16", "BF16", *GGUF_FORMATS])
            raise ModelError(
                f"GGUF tensor {t.name!r} has type {kind.name}, which cake cannot "
                f"read: use a file quantized as one of {known}"
            )
        heads = {
            ".self_attn.q_proj.": self.config.num_attention_heads,
            ".self_attn.k_proj.": self.config.num_key_value_heads,
        }
        for part, n_head in heads.items():
            if self._permuted and part in name:
                w = _unpermute(w, n_head)
                release_pages(t.data)  # the file's copy: only the un-permuted stays
        return self._hf_norm(name, w)

    def _hf_norm(self, name: str, w: Stored) -> Stored:
        """A Gemma RMSNorm weight as Hugging Face holds it: the file's minus 1.
        Exact where the file's value is in [0.5, 2] (Sterbenz), else within an
        ulp of it; the family's offset adds the 1 back in float32."""
        if not (self._norm_offset and name.endswith("norm.weight")):
            return w
        offset = np.float32(self._norm_offset)
        return np.asarray(as_float(w), np.float32) - offset

    def get(self, name: str) -> np.ndarray:
        w = self.stored(name)
        return as_float(w) if isinstance(w, Packed) else np.array(w)
