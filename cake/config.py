"""ModelConfig: the Hugging Face `config.json` fields cake uses, as a frozen dataclass."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cake.errors import ModelError
from cake.family import Family, family_of


@dataclass(frozen=True)
class RopeScaling:
    """`rope_scaling` of type llama3 (Llama 3.1+), longrope (Phi-3; "su" in
    older configs) or linear (Gemma 3's global layers); other types are
    rejected at load."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192
    # longrope: divisors of the inverse frequencies, (rotary_dim / 2,) each; the
    # short ones within original_max_position_embeddings, the long ones beyond
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0  # longrope: the rotated q and k are scaled by it

    def hf_dict(self) -> dict[str, Any]:
        """The fields of this type, as config.json's `rope_scaling` holds them."""
        d = dataclasses.asdict(self)
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in d.items()
            if k in _ROPE_FIELDS[self.rope_type]
        }


_ROPE_FIELDS = {
    "llama3": (
        "rope_type",
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    ),
    "longrope": (
        "rope_type",
        "factor",
        "original_max_position_embeddings",
        "short_factor",
        "long_factor",
        "attention_factor",
    ),
    "linear": ("rope_type", "factor"),
}


@dataclass(frozen=True)
class Moe:
    """A mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): the sparse layers'
    MLP is the sum of the `top_k` experts the router picks for each token,
    each weighted by its softmax probability over all experts (renormalised
    over the top k when `normalize`), plus the shared expert where
    `shared_intermediate_size` is non-zero (gated by sigmoid(x . gate))."""

    num_experts: int
    top_k: int
    intermediate_size: int  # each expert's
    normalize: bool
    shared_intermediate_size: int = 0
    decoder_sparse_step: int = 1  # layer i is sparse where (i + 1) % step == 0
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not one of these

    def sparse(self, i: int) -> bool:
        return i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0


ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # the MLP activations the blocks compute
LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (qwen2)
    partial_rotary_factor: float = 1.0  # RoPE turns the first rotary_dim of each head
    sliding_window: int | None = None  # attend to at most this many past positions
    # per layer "sliding_attention" (the window applies, and the local RoPE base)
    # or "full_attention"; () when every layer is alike (the window, if any, on all)
    layer_types: tuple[str, ...] = ()
    rope_local_base_freq: float | None = None  # sliding layers' RoPE base, unscaled
    query_pre_attn_scalar: float | None = None  # scores scaled by it ** -0.5, not hd's
    attn_logit_softcapping: float | None = None  # scores -> tanh(s / cap) * cap
    final_logit_softcapping: float | None = None  # logits -> tanh(z / cap) * cap
    hidden_act: str = "silu"  # one of ACTIVATIONS
    moe: Moe | None = None  # the experts of a mixture-of-experts family
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def family(self) -> Family:
        """The architecture family of `model_type` (cake.family)."""
        return family_of(self.model_type)

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that RoPE turns (all, or a partial_rotary_factor)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def qk_norm(self) -> bool:
        """Whether q and k are RMS-normed before RoPE (the family's kind)."""
        return self.family.qk_norm is not None

    @property
    def attn_scale(self) -> float:
        """What attention scores q . k are multiplied by: query_pre_attn_scalar
        ** -0.5 where the config gives it (Gemma), else head_dim ** -0.5."""
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def is_sliding(self, i: int) -> bool:
        """Whether layer i (of the whole model) is a local, sliding-window layer."""
        if self.layer_types:
            return self.layer_types[i] == "sliding_attention"
        return self.sliding_window is not None

    def window(self, i: int) -> int | None:
        """The sliding window of layer i (of the whole model), or None: it
        attends to every past position."""
        return self.sliding_window if self.is_sliding(i) else None

    def is_moe(self, i: int) -> bool:
        """Whether layer i (of the whole model) routes its MLP through experts."""
        return self.moe is not None and self.moe.sparse(i)

    def local_rope(self, i: int) -> bool:
        """Whether layer i turns with rope_local_base_freq (unscaled) rather than
        rope_theta and rope_scaling."""
        return self.rope_local_base_freq is not None and self.is_sliding(i)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config dict; unknown keys are ignored."""
        mt = d.get("model_type")
        fam = family_of(mt)
        try:
            n_heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            head_dim = d.get("head_dim") or hidden // n_heads
            eos = d.get("eos_token_id")
            eos_t = (
                tuple(eos)
                if isinstance(eos, list)
                else (() if eos is None else (int(eos),))
            )
            act = _activation(d, fam)
            if d.get("use_bidirectional_attention"):
                raise ModelError(
                    "use_bidirectional_attention is not supported: cake runs "
                    "causal decoders"
                )
            # transformers >= 5 writes `rope_parameters` (theta included), per
            # layer type where those differ (Gemma 3); older configs have
            # `rope_theta` and `rope_scaling` (and Gemma 3 `rope_local_base_freq`)
            params = d.get("rope_parameters") or {}
            per_type = any(t in params for t in LAYER_TYPES)
            rope = {"rope_theta": d.get("rope_theta"), **(d.get("rope_scaling") or {})}
            rope.update(params.get("full_attention") or {} if per_type else params)
            local = _local_rope(d, fam, params if per_type else None)
            # Phi-3 keeps these beside rope_scaling; transformers 5 copies them in
            for key in ("original_max_position_embeddings", "partial_rotary_factor"):
                rope.setdefault(key, d.get(key))
            partial = float(rope.get("partial_rotary_factor") or 1.0)
            if int(int(head_dim) * partial) % 2 or not 0 < partial <= 1:
                raise ModelError(
                    f"partial_rotary_factor {partial} of head_dim {head_dim} does "
                    "not give an even number of rotary dimensions"
                )
            max_pos = int(d.get("max_position_embeddings", 4096))
            n_layers = int(d["num_hidden_layers"])
            flag = fam.sliding_window
            on = flag in ("always", "layer_types") or (
                flag != "never" and bool(d.get(flag))
            )
            window = d.get("sliding_window") if on else None
            layer_types = (
                _layer_types(d, fam, n_layers) if flag == "layer_types" else ()
            )
            keys = {k: _positive(d, k) for k in fam.config_keys}
            return cls(
                model_type=mt,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=n_layers,
                num_attention_heads=n_heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or n_heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta") or 10000.0),
                rope_scaling=_rope_scaling(rope, max_pos),
                max_position_embeddings=max_pos,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", fam.tie_default)),
                attention_bias=bool(d.get("qkv_bias", fam.qkv_bias))
                or bool(d.get("attention_bias", False)),
                partial_rotary_factor=partial,
                sliding_window=int(window) if window else None,
                layer_types=layer_types,
                rope_local_base_freq=local,
                **keys,
                hidden_act=act,
                moe=_moe(d, fam, n_layers),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=eos_t,
                torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
            )
        except KeyError as e:
            raise ModelError(f"config.json lacks the field {e.args[0]!r}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ModelError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ModelError(f"{path} is not valid JSON: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d


def _moe(d: dict[str, Any], fam: Family, n_layers: int) -> Moe | None:
    """The experts of a MoE family's config (None for a dense family, or a
    Qwen MoE config with no experts: every layer dense, as transformers runs it)."""
    names = fam.moe
    if names is None:
        return None
    n = int(next((d[k] for k in names.count_keys if d.get(k)), 0))
    if n == 0 and names.sparse_keys:
        return None
    k = int(d.get("num_experts_per_tok") or 0)
    if not 0 < k <= n:
        raise ModelError(
            f"num_experts_per_tok {k} must be between 1 and the {n} experts "
            f"({names.count_keys[0]})"
        )
    size = d.get(names.size_key) if names.size_key else d["intermediate_size"]
    step = int(d.get("decoder_sparse_step") or 1) if names.sparse_keys else 1
    only = (
        tuple(int(i) for i in d.get("mlp_only_layers") or ())
        if names.sparse_keys
        else ()
    )
    moe = Moe(
        num_experts=n,
        top_k=k,
        intermediate_size=int(size),
        normalize=True
        if names.normalize_key is None
        else bool(d.get(names.normalize_key, False)),
        shared_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0)
        if names.shared
        else 0,
        decoder_sparse_step=step,
        mlp_only_layers=only,
    )
    if not any(moe.sparse(i) for i in range(n_layers)):
        return None
    return moe


def _activation(d: dict[str, Any], fam: Family) -> str:
    act = next((d[k] for k in fam.act_keys if d.get(k)), fam.act_default)
    act = dict(fam.act_aliases).get(act, act)
    if act not in ACTIVATIONS:
        raise ModelError(
            f"unsupported activation {act!r}: cake runs {', '.join(ACTIVATIONS)}"
        )
    return act


def _positive(d: dict[str, Any], key: str) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, int | float) or v <= 0:
        raise ModelError(f"{key} must be a positive number or null; got {v!r}")
    return float(v)


def _layer_types(d: dict[str, Any], fam: Family, n_layers: int) -> tuple[str, ...]:
    """Each layer's attention type: config.json's `layer_types`, else (older
    configs) all but every `sliding_window_pattern`-th layer slide, as
    transformers builds it."""
    types = d.get("layer_types")
    if types is None:
        period = int(d.get("sliding_window_pattern") or fam.sliding_pattern)
        types = [
            "sliding_attention" if (i + 1) % period else "full_attention"
            for i in range(n_layers)
        ]
    if len(types) != n_layers or any(t not in LAYER_TYPES for t in types):
        raise ModelError(
            f"layer_types must give each of the {n_layers} layers one of "
            f"{', '.join(LAYER_TYPES)}; got {types!r}"
        )
    return tuple(types)


def _local_rope(
    d: dict[str, Any], fam: Family, per_type: dict[str, Any] | None
) -> float | None:
    """The sliding layers' RoPE base, for a family whose sliding layers have
    their own (rope_parameters' sliding_attention, or rope_local_base_freq)."""
    local = (per_type or {}).get("sliding_attention") or {}
    if fam.rope_local_default is None:
        if per_type is not None and local and local != per_type.get("full_attention"):
            raise ModelError(
                f"rope_parameters differ by layer type, which {fam.model_type} "
                "models do not do: cake cannot run this config"
            )
        return None
    kind = local.get("rope_type", local.get("type", "default"))
    if kind != "default":
        raise ModelError(
            f"rope scaling of type {kind!r} on the sliding layers is not "
            "supported: cake scales only the global layers' RoPE"
        )
    theta = local.get("rope_theta") or d.get("rope_local_base_freq")
    return float(theta or fam.rope_local_default)


def _rope_scaling(
    d: dict[str, Any], max_position_embeddings: int
) -> RopeScaling | None:
    kind = d.get("rope_type", d.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling(rope_type=kind, factor=float(d["factor"]))
    old = d.get("original_max_position_embeddings")
    if kind in ("longrope", "su"):
        if old is None:
            raise ModelError(
                "longrope rope_scaling needs original_max_position_embeddings"
            )
        old = int(old)
        # as transformers: the context's growth unless given, and its attention
        # factor sqrt(1 + ln(factor) / ln(original context)) unless given
        factor = float(d.get("factor") or max_position_embeddings / old)
        attn = d.get("attention_factor")
        if attn is None:
            attn = (
                math.sqrt(1 + math.log(factor) / math.log(old)) if factor > 1 else 1.0
            )
        return RopeScaling(
            rope_type="longrope",
            factor=factor,
            original_max_position_embeddings=old,
            short_factor=tuple(float(x) for x in d["short_factor"]),
            long_factor=tuple(float(x) for x in d["long_factor"]),
            attention_factor=float(attn),
        )
    if kind != "llama3":
        raise ModelError(
            f"unsupported rope_scaling type {kind!r}: cake runs llama3, longrope "
            "and linear"
        )
    return RopeScaling(
        rope_type=kind,
        factor=float(d["factor"]),
        low_freq_factor=float(d.get("low_freq_factor", 1.0)),
        high_freq_factor=float(d.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(old or 8192),
    )
