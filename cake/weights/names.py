"""Which Hugging Face tensor names a shard of a model needs."""

from __future__ import annotations

from cake.config import ModelConfig
from cake.shard import Shard


def layer_tensor_names(config: ModelConfig, i: int) -> list[str]:
    p = f"model.layers.{i}."
    names = [
        p + "input_layernorm.weight",
        p + "post_attention_layernorm.weight",
        p + "self_attn.q_proj.weight",
        p + "self_attn.k_proj.weight",
        p + "self_attn.v_proj.weight",
        p + "self_attn.o_proj.weight",
        p + "mlp.gate_proj.weight",
        p + "mlp.up_proj.weight",
        p + "mlp.down_proj.weight",
    ]
    if config.attention_bias:
        names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
    if config.qk_norm:
        names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
    return names


def head_tensor_names(config: ModelConfig) -> list[str]:
    """Final norm and LM head; a tied head reads the embedding instead."""
    head = (
        "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    )
    return ["model.norm.weight", head]


def shard_tensor_names(config: ModelConfig, shard: Shard) -> list[str]:
    names: list[str] = []
    if shard.embed:
        names.append("model.embed_tokens.weight")
    for i in shard.layers:
        names += layer_tensor_names(config, i)
    if shard.head:
        names += [n for n in head_tensor_names(config) if n not in names]
    return names
