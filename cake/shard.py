"""Shard: the contiguous, half-open range of layers one stage runs."""

from __future__ import annotations

from dataclasses import dataclass

from cake.errors import CakeError


@dataclass(frozen=True)
class Shard:
    """Layers `[start, end)` of a model with `n_layers` layers.

    `embed`: the stage takes token ids (B, L) and owns the embedding.
    `head`: the stage owns the final norm and the LM head and returns logits.
    """

    start: int
    end: int
    n_layers: int
    embed: bool = False
    head: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end <= self.n_layers:
            raise CakeError(
                f"layer range [{self.start}, {self.end}) is not within "
                f"the model's {self.n_layers} layers"
            )

    @classmethod
    def whole(cls, n_layers: int) -> Shard:
        return cls(0, n_layers, n_layers, embed=True, head=True)

    @property
    def layers(self) -> range:
        return range(self.start, self.end)

    def __len__(self) -> int:
        return self.end - self.start


def parse_layer_range(text: str, n_layers: int) -> tuple[int, int]:
    """Parse a user's inclusive "A-B" (or "A") into half-open (A, B+1)."""
    text = text.strip()
    if text.startswith("model.layers."):
        text = text[len("model.layers.") :]
    try:
        if "-" in text:
            a, b = (int(p) for p in text.split("-", 1))
        else:
            a = b = int(text)
    except ValueError:
        raise CakeError(f"bad layer range {text!r}: expected A-B, e.g. 0-13") from None
    if a > b:
        raise CakeError(f"bad layer range {text!r}: start after end")
    if b >= n_layers:
        raise CakeError(
            f"layer range {text!r} is out of range: the model has "
            f"{n_layers} layers (0-{n_layers - 1})"
        )
    return a, b + 1
