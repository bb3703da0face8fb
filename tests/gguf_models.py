"""Tiny quantized GGUF models for the tests, and their float twins for HF.

`write_gguf` turns a tiny HF checkpoint (tests/models.py) into a GGUF of its
family's llama.cpp architecture (llama, olmo2, phi3, gemma, gemma2, gemma3,
qwen2moe, qwen3moe, and Mixtral as llama: tensor names, metadata, rotary
layout, Gemma's norms + 1 and the experts stacked per projection as llama.cpp's
convert_hf_to_gguf writes them) whose matrices
are in a chosen type: quantized from the HF weights where
gguf-py can quantize that type, else random valid blocks of the same spread
(gguf-py has no K-quant quantizer). `hf_twin` writes the GGUF's weights,
dequantized by gguf-py, as an HF folder: the oracle for every quantized run.
"""

from __future__ import annotations

import json
import re
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
    "self_attn.qkv_proj": "attn_qkv",  # phi3
    "mlp.gate_up_proj": "ffn_up",  # phi3: gate|up stacked as llama.cpp's ffn_up
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_feedforward_layernorm": "post_ffw_norm",  # olmo2
    # mixtures of experts: the router, Qwen2-MoE's shared expert and its gate
    "block_sparse_moe.gate": "ffn_gate_inp",
    "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
# one expert's projection: stacked by the converter into blk.N.ffn_{kind}_exps
_EXPERT = re.compile(r"model\.layers\.(\d+)\.\w+\.experts\.(\d+)\.(\w+)\.weight")
_EXPERT_KIND = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate",
                "up_proj": "up", "down_proj": "down"}  # fmt: skip
# kept in float32 whatever the file type, as convert_hf_to_gguf keeps them
_F32 = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")
# olmo2's and Gemma 2/3's post_attention_layernorm is on the attention's
# output; Gemma 2/3's norm before the MLP is llama.cpp's ffn_norm
_SANDWICH = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
}
_ARCH_LAYER = {
    "olmo2": {"post_attention_layernorm": "post_attention_norm"},
    "gemma2": _SANDWICH,
    "gemma3": _SANDWICH,
}
_TOP = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}


def gguf_name(hf: str, arch: str = "llama") -> str:
    base, suffix = hf.rsplit(".", 1)
    if base in _TOP:
        return f"{_TOP[base]}.{suffix}"
    _, _, i, rest = base.split(".", 3)
    return f"blk.{i}.{_ARCH_LAYER.get(arch, {}).get(rest) or _LAYER[rest]}.{suffix}"


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
    stack_experts: bool = True,
) -> Path:
    """A GGUF of the HF checkpoint with matrices as `fmt` (a type name, or
    a function of the HF tensor name for mixed files); vectors stay F32.

    fan_in_scale: rescale each matrix to a spread of 1/sqrt(in), as trained
    models have; the tests' tiny checkpoints are drawn wider, which makes their
    activations heavy-tailed (and per-block activation rounding coarse).
    stack_experts: a MoE layer's experts as one (E, out, in) tensor per
    projection (`blk.N.ffn_gate_exps`), as llama.cpp converts them, else one
    tensor each (`blk.N.ffn_gate.E`), as llama.cpp once wrote Mixtral.
    """
    cfg, src = open_checkpoint(hf_folder)
    pick = fmt if callable(fmt) else (lambda _name: fmt)
    arch = cfg.family.gguf_arch
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    if arch != "phi3":  # llama.cpp's Phi-3 converter writes no key length
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.rotary_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    if arch in ("phi3", "gemma2", "gemma3"):
        w.add_sliding_window(cfg.sliding_window or 0)
    if arch == "gemma2":  # as convert_hf_to_gguf's Gemma2Model
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if arch == "gemma3" and cfg.final_logit_softcapping:
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    rs = cfg.rope_scaling
    if rs is not None and rs.rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rs.factor)
    if rs is not None and rs.rope_type == "longrope":
        # as convert_hf_to_gguf's Phi3MiniModel: the factors as tensors
        w.add_rope_scaling_orig_ctx_len(rs.original_max_position_embeddings)
        w.add_rope_scaling_attn_factors(rs.attention_factor)
        for kind in ("long", "short"):
            factors = np.asarray(getattr(rs, f"{kind}_factor"), np.float32)
            w.add_tensor(f"rope_factors_{kind}.weight", factors)
    moe = cfg.moe
    if moe is not None:  # as convert_hf_to_gguf's TextModel and Qwen2MoeModel
        w.add_expert_count(moe.num_experts)
        w.add_expert_used_count(moe.top_k)
        if arch != "llama":
            w.add_expert_feed_forward_length(moe.intermediate_size)
        if moe.shared_intermediate_size:
            w.add_expert_shared_feed_forward_length(moe.shared_intermediate_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng_seed = seed
    stacks: dict[str, dict[int, np.ndarray]] = {}  # GGUF name -> expert -> (out, in)
    first: dict[str, str] = {}  # GGUF name -> its expert 0's HF name, for `fmt`

    def add(out: str, a: np.ndarray, kind: str) -> None:
        nonlocal rng_seed
        if kind in _QUANTIZABLE and a.shape[-1] % gguf.GGML_QUANT_SIZES[Q[kind]][0]:
            kind = "F16"  # rows the blocks do not tile: the converter's fallback
        if kind == "F32":
            w.add_tensor(out, a)
        elif kind in ("F16", "BF16"):
            w.add_tensor(out, quantize(a, Q[kind]), raw_dtype=Q[kind])
        elif kind in _QUANTIZABLE:
            w.add_tensor(out, quantize(a, Q[kind]), raw_dtype=Q[kind])
        else:
            rows, cols = a.shape[-2:]
            raws = []
            for _ in range(len(a) if a.ndim == 3 else 1):  # each expert of a stack
                rng_seed += 1
                raws.append(random_weight(kind, rows, cols, float(a.std()), rng_seed))
            raw = np.stack(raws) if a.ndim == 3 else raws[0]
            w.add_tensor(out, raw, raw_dtype=Q[kind])

    for name in sorted(src.keys()):
        a = np.asarray(src.get(name), np.float32)
        if fan_in_scale and a.ndim == 2:
            a = a * np.float32(1 / np.sqrt(a.shape[1]) / a.std())
        if cfg.family.norm_offset and name.endswith("norm.weight"):
            a = a + np.float32(cfg.family.norm_offset)  # Gemma: 1 + w, as converted
        if arch == "llama" and ".q_proj." in name:
            a = _permute(a, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            a = _permute(a, cfg.num_key_value_heads)
        if m := _EXPERT.fullmatch(name):
            i, e, kind = m[1], int(m[2]), _EXPERT_KIND[m[3]]
            if not stack_experts:
                add(f"blk.{i}.ffn_{kind}.{e}.weight", a, pick(name))
                continue
            out = f"blk.{i}.ffn_{kind}_exps.weight"
            stacks.setdefault(out, {})[e] = a
            if e == 0:
                first[out] = name
            continue
        out = gguf_name(name, arch)
        kind = "F32" if a.ndim == 1 or out.endswith(_F32) else pick(name)
        add(out, a, kind)
    for out, experts in stacks.items():  # (E, out, in): GGUF's (in, out, E)
        add(out, np.stack([experts[e] for e in range(len(experts))]), pick(first[out]))
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
