"""Tiny quantized GGUF models for the tests, and their float twins for HF.

`write_gguf` turns a tiny HF checkpoint (tests/models.py) into a llama GGUF
whose matrices are in a chosen type: quantized from the HF weights where
gguf-py can quantize that type, else random valid blocks of the same spread
(gguf-py has no K-quant quantizer). `hf_twin` writes the GGUF's weights,
dequantized by gguf-py, as an HF folder: the oracle for every quantized run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import quantize

from cake.weights.checkpoint import open_checkpoint
from cake.weights.gguf import GGUFSource
from tests.blocks import random_weight

Q = gguf.GGMLQuantizationType
_QUANTIZABLE = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}
_LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}


def gguf_name(hf: str) -> str:
    base, suffix = hf.rsplit(".", 1)
    if base in _TOP:
        return f"{_TOP[base]}.{suffix}"
    _, _, i, rest = base.split(".", 3)
    return f"blk.{i}.{_LAYER[rest]}.{suffix}"


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `LlamaModel.permute` (HF -> GGUF rows)."""
    rows = w.shape[0]
    return (
        w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(
    hf_folder: Path,
    path: Path,
    fmt: str | Callable[[str], str],
    seed: int = 0,
    fan_in_scale: bool = False,
) -> Path:
    """A llama GGUF of the HF checkpoint with matrices as `fmt` (a type name, or
    a function of the HF tensor name for mixed files); vectors stay F32.

    fan_in_scale: rescale each matrix to a spread of 1/sqrt(in), as trained
    models have; the tests' tiny checkpoints are drawn wider, which makes their
    activations heavy-tailed (and per-block activation rounding coarse).
    """
    cfg, src = open_checkpoint(hf_folder)
    pick = fmt if callable(fmt) else (lambda _name: fmt)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng_seed = seed
    for name in sorted(src.keys()):
        a = np.asarray(src.get(name), np.float32)
        if fan_in_scale and a.ndim == 2:
            a = a * np.float32(1 / np.sqrt(a.shape[1]) / a.std())
        if ".q_proj." in name:
            a = _permute(a, cfg.num_attention_heads)
        elif ".k_proj." in name:
            a = _permute(a, cfg.num_key_value_heads)
        kind = "F32" if a.ndim == 1 else pick(name)
        if kind == "F32":
            w.add_tensor(gguf_name(name), a)
        elif kind in ("F16", "BF16"):
            w.add_tensor(gguf_name(name), quantize(a, Q[kind]), raw_dtype=Q[kind])
        elif kind in _QUANTIZABLE:
            w.add_tensor(gguf_name(name), quantize(a, Q[kind]), raw_dtype=Q[kind])
        else:
            rng_seed += 1
            raw = random_weight(kind, *a.shape, float(a.std()), seed=rng_seed)
            w.add_tensor(gguf_name(name), raw, raw_dtype=Q[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_twin(gguf_path: Path, hf_folder: Path, out: Path) -> Path:
    """An HF folder holding the GGUF's weights as float32 (HF's config kept)."""
    from safetensors.numpy import save_file

    src = GGUFSource(gguf_path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {n: np.ascontiguousarray(src.get(n), np.float32) for n in src.keys()},
        out / "model.safetensors",
        metadata={"format": "pt"},
    )
    config = json.loads((hf_folder / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config))
    return out
