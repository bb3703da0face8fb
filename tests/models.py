"""Tiny random Hugging Face checkpoints of every supported architecture, and HF's outputs.

Shared by the oracle tests of every backend: `make_checkpoint` writes a folder
that both HF transformers and cake can load; `hf_reference` runs HF on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# hidden 64, 4 heads of 16, 2 KV heads (GQA), 3 layers, vocab 128
_BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)

ARCHS: dict[str, dict] = {
    "llama": dict(model_type="llama", rope_theta=10000.0, tie_word_embeddings=False),
    "llama3": dict(
        model_type="llama",
        rope_theta=500000.0,
        tie_word_embeddings=True,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
    ),
    "mistral": dict(model_type="mistral", rope_theta=10000.0, sliding_window=6),
    "qwen2": dict(model_type="qwen2", rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", head_dim=24, rope_theta=1000000.0),
    # norms after each sublayer, q/k norm over the whole projection
    "olmo2": dict(model_type="olmo2", rope_theta=500000.0),
    # fused qkv_proj and gate_up_proj, a sliding window
    "phi3": dict(model_type="phi3", sliding_window=6, pad_token_id=0),
    # longrope with its long factors in use: the prompt already passes the
    # original context (transformers) and so does the cache (cake)
    "phi3-longrope": dict(
        model_type="phi3",
        pad_token_id=0,
        original_max_position_embeddings=8,
        rope_scaling=dict(
            rope_type="longrope",
            short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0],
            long_factor=[1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 14.0, 20.0],
        ),
    ),
    # Phi-4-mini's shape: partial rotary (12 of 16 dims), tied head, longrope
    # with its short factors in use and an attention factor of 1.07
    "phi4-mini": dict(
        model_type="phi3",
        pad_token_id=0,
        tie_word_embeddings=True,
        partial_rotary_factor=0.75,
        original_max_position_embeddings=128,
        rope_scaling=dict(
            rope_type="longrope",
            short_factor=[1.0, 1.2, 1.5, 2.0, 3.0, 5.0],
            long_factor=[1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
        ),
    ),
    # Gemma: the llama block with (1 + w) norms, GELU-tanh, scaled embeddings
    "gemma": dict(model_type="gemma", head_dim=16, pad_token_id=0),
    # Gemma 2: 4 layers alternating local (window 4 < the prompt) and global,
    # soft-caps that bite (scores reach 3.3 caps, logits 2), a query scalar
    # that is not head_dim
    "gemma2": dict(
        model_type="gemma2",
        num_hidden_layers=4,
        head_dim=16,
        sliding_window=4,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=10.0,
        final_logit_softcapping=8.0,
        rope_theta=10000.0,
        pad_token_id=0,
    ),
    # Gemma 3: per-head q/k norms; local layers 0, 1, 3 (every third global,
    # window 4) turning with a base of their own (100), global ones with a
    # linearly scaled base; a final soft-cap; transformers 5's rope_parameters
    "gemma3": dict(
        model_type="gemma3_text",
        num_hidden_layers=4,
        head_dim=16,
        sliding_window=4,
        sliding_window_pattern=3,
        query_pre_attn_scalar=24,
        final_logit_softcapping=8.0,
        rope_parameters=dict(
            full_attention=dict(rope_type="linear", factor=4.0, rope_theta=10000.0),
            sliding_attention=dict(rope_type="default", rope_theta=100.0),
        ),
        pad_token_id=0,
    ),
    # mixtures of experts: Mixtral (4 experts, top 2, always renormalised, a
    # sliding window), Qwen2-MoE (a shared expert with its sigmoid gate, q/k/v
    # bias, top-2 weights not renormalised, layer 1 dense), Qwen3-MoE (per-head
    # q/k norms, 8 experts of which 3 are picked, renormalised)
    "mixtral": dict(
        model_type="mixtral",
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=6,
        rope_theta=1000000.0,
    ),
    "qwen2_moe": dict(
        model_type="qwen2_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        mlp_only_layers=[1],
        rope_theta=1000000.0,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        head_dim=24,
        num_experts=8,
        num_experts_per_tok=3,
        moe_intermediate_size=24,
        norm_topk_prob=True,
        rope_theta=1000000.0,
    ),
}


def hf_config(arch: str, **overrides):
    import transformers

    kw = {**_BASE, **ARCHS[arch], **overrides}
    mt = kw.pop("model_type")
    return transformers.AutoConfig.for_model(mt, **kw)


def make_checkpoint(
    arch: str,
    folder: Path,
    *,
    dtype: str = "float32",
    shards: int = 1,
    seed: int = 0,
    **overrides,
) -> Path:
    """Write a random tiny model of `arch` (see ARCHS) to `folder` and return it.

    `overrides` replace config fields (e.g. vocab_size=49152 to pair the model with
    SmolLM2's tokenizer).
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(arch, **overrides))
    with torch.no_grad():  # larger than init so that layers matter in the logits
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model = model.to(getattr(torch, dtype)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    shard_size = total // shards + 1 if shards > 1 else None
    kw = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(folder, **kw)
    return folder


def hf_reference(folder: Path, ids: list[int], steps: int = 8):
    """HF's prefill logits (L, V) and `steps` greedy tokens with their logits (float32)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        prefill = out.logits[0].float().numpy()
        past = out.past_key_values
        tok = int(prefill[-1].argmax())
        tokens, step_logits = [tok], []
        for _ in range(steps):
            out = model(torch.tensor([[tok]]), cache=past, use_cache=True)
            past = out.past_key_values
            lg = out.logits[0, -1].float().numpy()
            step_logits.append(lg)
            tok = int(lg.argmax())
            tokens.append(tok)
    return prefill, tokens, np.stack(step_logits)
