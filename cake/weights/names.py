"""Which Hugging Face tensor names a shard of a model needs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import astuple, dataclass
from functools import lru_cache
from types import MappingProxyType

from cake.config import ModelConfig
from cake.shard import Shard


@dataclass(frozen=True)
class LayerNames:
    """The checkpoint names of one decoder layer's tensors, by the role the
    blocks give them (see cake.family): the families differ in the names, the
    roles are the same."""

    attn_norm: str
    mlp_norm: str
    qkv: tuple[str, ...]  # weights whose rows stack as q|k|v
    o: str
    # the dense MLP: weights whose rows stack as gate|up, and its down
    # projection; in a MoE layer the shared expert's (Qwen2-MoE), or () and None
    gate_up: tuple[str, ...]
    down: str | None
    qkv_bias: tuple[str, ...] = ()  # vectors stacking as the q|k|v bias
    q_norm: str | None = None
    k_norm: str | None = None
    attn_post_norm: str | None = None  # on the attention's output (Gemma 2/3)
    mlp_post_norm: str | None = None  # on the MLP's output
    # a MoE layer's router (E, D), each expert's gate|up names and down name,
    # and the shared expert's (1, D) sigmoid gate
    router: str | None = None
    expert_gate_up: tuple[tuple[str, ...], ...] = ()
    expert_down: tuple[str, ...] = ()
    shared_gate: str | None = None

    def all(self) -> list[str]:
        out: list[str] = []

        def add(part) -> None:
            if isinstance(part, tuple):
                for p in part:
                    add(p)
            elif part is not None:
                out.append(part)

        add(astuple(self))
        return out


def layer_names(config: ModelConfig, i: int) -> LayerNames:
    fam = config.family
    p = f"model.layers.{i}."
    at, mlp = p + "self_attn.", p + "mlp."
    qk, post = fam.qk_norm is not None, fam.post_norms
    gate_up, down = (
        tuple(mlp + x + ".weight" for x in fam.gate_up),
        mlp + "down_proj.weight",
    )
    moe: dict = {}
    if config.is_moe(i):
        m = fam.moe
        block = p + m.block + "."
        ex = [f"{block}experts.{e}." for e in range(config.moe.num_experts)]
        moe = dict(
            router=block + "gate.weight",
            expert_gate_up=tuple(
                tuple(x + g + ".weight" for g in m.gate_up) for x in ex
            ),
            expert_down=tuple(x + m.down + ".weight" for x in ex),
        )
        if m.shared and config.moe.shared_intermediate_size:
            sh = block + m.shared + "."
            gate_up = tuple(sh + x + ".weight" for x in ("gate_proj", "up_proj"))
            down = sh + "down_proj.weight"
            moe["shared_gate"] = block + m.shared_gate + ".weight"
        else:
            gate_up, down = (), None
    return LayerNames(
        attn_norm=p + fam.norms[0] + ".weight",
        mlp_norm=p + fam.norms[1] + ".weight",
        qkv=tuple(at + x + ".weight" for x in fam.qkv),
        o=at + "o_proj.weight",
        gate_up=gate_up,
        down=down,
        qkv_bias=tuple(at + x + ".bias" for x in fam.qkv)
        if config.attention_bias
        else (),
        q_norm=at + "q_norm.weight" if qk else None,
        k_norm=at + "k_norm.weight" if qk else None,
        attn_post_norm=p + post[0] + ".weight" if post else None,
        mlp_post_norm=p + post[1] + ".weight" if post else None,
        **moe,
    )


def layer_tensor_names(config: ModelConfig, i: int) -> list[str]:
    return layer_names(config, i).all()


def layer_shapes(config: ModelConfig, i: int) -> Mapping[str, tuple[int, ...]]:
    """The shape the config implies for each of layer i's tensors (read-only:
    one table per layer, kept, since loading asks once per tensor and a MoE
    layer holds hundreds)."""
    return _layer_shapes(config, i)


@lru_cache(maxsize=1024)
def _layer_shapes(config: ModelConfig, i: int) -> Mapping[str, tuple[int, ...]]:
    c, names = config, layer_names(config, i)
    d, hd, inter = c.hidden_size, c.head_dim, c.intermediate_size
    if names.router is not None:  # the MLP beside the experts is the shared one
        inter = c.moe.shared_intermediate_size
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    # stacked parts: one tensor per section, or one fused tensor of them all
    qkv = [q, kv, kv] if len(names.qkv) == 3 else [q + 2 * kv]
    gate_up = [inter, inter] if len(names.gate_up) == 2 else [2 * inter]
    shapes = {
        names.attn_norm: (d,),
        names.mlp_norm: (d,),
        names.o: (d, q),
        **{n: (r, d) for n, r in zip(names.qkv, qkv, strict=True)},
    }
    if names.down is not None:
        shapes[names.down] = (d, inter)
        shapes.update({n: (r, d) for n, r in zip(names.gate_up, gate_up, strict=True)})
    if names.router is not None:
        e_inter = c.moe.intermediate_size
        shapes[names.router] = (c.moe.num_experts, d)
        for parts, dn in zip(names.expert_gate_up, names.expert_down, strict=True):
            shapes.update({n: (e_inter, d) for n in parts})
            shapes[dn] = (d, e_inter)
        if names.shared_gate is not None:
            shapes[names.shared_gate] = (1, d)
    if names.qkv_bias:
        shapes.update({n: (r,) for n, r in zip(names.qkv_bias, qkv, strict=True)})
    if names.attn_post_norm is not None:
        shapes[names.attn_post_norm] = shapes[names.mlp_post_norm] = (d,)
    if names.q_norm is not None:
        per_head = c.family.qk_norm == "head"
        shapes[names.q_norm] = (hd,) if per_head else (q,)
        shapes[names.k_norm] = (hd,) if per_head else (kv,)
    return MappingProxyType(shapes)


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
