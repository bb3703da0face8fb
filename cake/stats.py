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
    # Steps in which a stage compiled a new shape (JAX): their seconds are in
    # prompt_s / decode_s, and the rates below leave them out, so that a short
    # run does not report compilation as speed (when every step compiled, the
    # rate is the whole time's).
    prompt_compile_s: float = 0.0
    prompt_compile_tokens: int = 0  # prompt ids those prefill steps fed
    decode_compile_s: float = 0.0
    decode_compile_tokens: int = 0  # tokens those decode steps drew

    @property
    def compile_s(self) -> float:
        return self.prompt_compile_s + self.decode_compile_s

    @property
    def prompt_tokens_per_s(self) -> float:
        """Prompt ids fed per second, outside steps that compiled."""
        fed = self.prompt_tokens - self.cached_tokens
        return _rate(
            fed, self.prompt_s, self.prompt_compile_tokens, self.prompt_compile_s
        )

    @property
    def decode_tokens_per_s(self) -> float:
        """Steady decode: tokens per second outside the steps that compiled."""
        return _rate(
            self.decode_tokens,
            self.decode_s,
            self.decode_compile_tokens,
            self.decode_compile_s,
        )

    def as_dict(self) -> dict:
        d = asdict(self)
        d["prompt_tokens_per_s"] = self.prompt_tokens_per_s
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        d["compile_s"] = self.compile_s
        return d


def _rate(n: int, s: float, compiled_n: int, compiled_s: float) -> float:
    if n > compiled_n and s > compiled_s:
        return (n - compiled_n) / (s - compiled_s)
    return n / s if s > 0 else 0.0
