"""Figures of one generation: tokens, seconds, why it stopped."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    first_token_s: float = 0.0
    stop_reason: str = (
        ""  # "eos", "stop", "max_tokens", "context", "cancelled", "error"
    )
    cached_tokens: int = 0  # prompt ids a parked sequence already held (not fed again)

    @property
    def prompt_tokens_per_s(self) -> float:
        fed = self.prompt_tokens - self.cached_tokens
        return fed / self.prompt_s if self.prompt_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["prompt_tokens_per_s"] = self.prompt_tokens_per_s
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        return d
