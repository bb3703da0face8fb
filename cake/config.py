"""ModelConfig: the Hugging Face `config.json` fields cake uses, as a frozen dataclass."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cake.errors import ModelError
from cake.family import Family, family_of


@dataclass(frozen=True)
class RopeScaling:
    """`rope_scaling` of type llama3 (Llama 3.1+); other types are rejected at load."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


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
                rope_scaling=_rope_scaling(rope),
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=fam.qkv_bias or bool(d.get("attention_bias", False)),
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


def _rope_scaling(d: dict[str, Any]) -> RopeScaling | None:
    kind = d.get("rope_type", d.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ModelError(f"unsupported rope_scaling type {kind!r}: cake runs llama3")
    return RopeScaling(
        rope_type=kind,
        factor=float(d["factor"]),
        low_freq_factor=float(d.get("low_freq_factor", 1.0)),
        high_freq_factor=float(d.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            d.get("original_max_position_embeddings", 8192)
        ),
    )
