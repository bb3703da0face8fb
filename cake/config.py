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
    """`rope_scaling` of type llama3 (Llama 3.1+) or longrope (Phi-3; "su" in
    older configs); other types are rejected at load."""

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
        drop = (
            ("low_freq_factor", "high_freq_factor")
            if self.rope_type == "longrope"
            else ("short_factor", "long_factor", "attention_factor")
        )
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in d.items()
            if k not in drop
        }


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
    hidden_act: str = "silu"
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
            act = d.get("hidden_act", d.get("hidden_activation", "silu"))
            if act != "silu":
                raise ModelError(f"unsupported hidden_act {act!r}: cake runs silu")
            # transformers >= 5 writes `rope_parameters` (theta included); older
            # configs have `rope_theta` and `rope_scaling`.
            rope = {"rope_theta": d.get("rope_theta"), **(d.get("rope_scaling") or {})}
            rope.update(d.get("rope_parameters") or {})
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
            flag = fam.sliding_window
            on = flag == "always" or (flag != "never" and bool(d.get(flag)))
            window = d.get("sliding_window") if on else None
            return cls(
                model_type=mt,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=n_heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or n_heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta") or 10000.0),
                rope_scaling=_rope_scaling(rope, max_pos),
                max_position_embeddings=max_pos,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=fam.qkv_bias or bool(d.get("attention_bias", False)),
                partial_rotary_factor=partial,
                sliding_window=int(window) if window else None,
                hidden_act=act,
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


def _rope_scaling(
    d: dict[str, Any], max_position_embeddings: int
) -> RopeScaling | None:
    kind = d.get("rope_type", d.get("type", "default"))
    if kind == "default":
        return None
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
            f"unsupported rope_scaling type {kind!r}: cake runs llama3 and longrope"
        )
    return RopeScaling(
        rope_type=kind,
        factor=float(d["factor"]),
        low_freq_factor=float(d.get("low_freq_factor", 1.0)),
        high_freq_factor=float(d.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(old or 8192),
    )
