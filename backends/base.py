"""The backend interface every tensor backend implements, the registry, and auto choice.

A backend turns (config, shard, tensors) into a StageModel: something that runs
layers [start, end) for a batch of sequences and keeps their KV caches. All
arrays crossing this boundary are NumPy; a backend's own array type never leaks.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

import numpy as np

from cake.errors import BackendError

if TYPE_CHECKING:
    from cake.config import ModelConfig
    from cake.shard import Shard
    from cake.weights import TensorSource


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cpu", "gpu", "tpu", "metal"
    name: str
    memory_bytes: int | None = None


@dataclass(frozen=True)
class Draw:
    """A token for each sequence of a step, drawn by the head stage itself: it
    returns int32 ids (B,) instead of logits, so that only the ids leave its
    device (-1 for a row where none can be drawn: logits with a NaN, or none
    finite). Per row, the host sampler's draw (cake.sampling) without
    penalties: temperature (0: greedy), min_p (0: off), r, the uniform number
    in [0, 1) the draw spends (from the sequence's own seeded generator, so
    that the same seed gives the same tokens; a multiple of 2^-53, as numpy's
    random() gives, which the JAX stage carries exactly and refuses
    otherwise), top_k (0: off) and top_p (1.0: off); the last two may be left
    out (every row off)."""

    temperature: tuple[float, ...]
    min_p: tuple[float, ...]
    r: tuple[float, ...]
    top_k: tuple[int, ...] = ()
    top_p: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for f in ("temperature", "min_p", "r", "top_k", "top_p"):  # hashable
            object.__setattr__(self, f, tuple(getattr(self, f)))
        n = len(self.r)
        if not self.top_k:
            object.__setattr__(self, "top_k", (0,) * n)
        if not self.top_p:
            object.__setattr__(self, "top_p", (1.0,) * n)
        if not all(
            len(getattr(self, f)) == n
            for f in ("temperature", "min_p", "top_k", "top_p")
        ):
            raise ValueError(
                "Draw needs a temperature, min_p, r, top_k and top_p per sequence"
            )


@dataclass(frozen=True)
class Step:
    """One forward call over a batch of B sequences, each at its own position.

    Sequence i brings `lengths[i]` new tokens that start at position
    `positions[i]`; the input is padded to the longest, L = max(lengths).
    Its cache must already hold exactly `positions[i]` tokens (a smaller
    position rewinds the cache; prefill is a call at position 0).
    """

    seq_ids: tuple[int, ...]
    positions: tuple[int, ...]
    lengths: tuple[int, ...]
    all_logits: bool = False  # head stage: logits for every new token, not the last
    draw: Draw | None = None  # head stage: token ids, not logits (see Draw)

    def __post_init__(self) -> None:
        n = len(self.seq_ids)
        if not (n == len(self.positions) == len(self.lengths)) or n == 0:
            raise ValueError("Step needs one position and one length per sequence")
        if len(set(self.seq_ids)) != n:
            raise ValueError("Step has a sequence twice")
        if min(self.lengths) < 1 or min(self.positions) < 0:
            raise ValueError("Step lengths must be >= 1 and positions >= 0")
        if self.draw is not None and (self.all_logits or len(self.draw.r) != n):
            raise ValueError("a Step's draw needs one row per sequence, no all_logits")

    @property
    def batch(self) -> int:
        return len(self.seq_ids)

    @property
    def max_len(self) -> int:
        return max(self.lengths)


@runtime_checkable
class StageModel(Protocol):
    """Layers [shard.start, shard.end) loaded on one backend, with per-sequence caches.

    forward(x, step):
      x: (B, L) int32 token ids if shard.embed, else (B, L, D) hidden in the model dtype.
      returns (B, L, D) hidden in the model dtype if not shard.head; else float32
      logits, (B, L, V) if step.all_logits else (B, V) for each last new token;
      int32 token ids (B,) if step.draw, for a stage whose `draws` is True (the
      Pipeline draws from the logits of any other).
    """

    shard: Shard
    dtype: str
    device: DeviceInfo

    def forward(self, x: np.ndarray, step: Step) -> np.ndarray: ...

    def release(self, seq_ids: Sequence[int]) -> None: ...


class Backend(Protocol):
    name: ClassVar[str]

    @classmethod
    def is_available(cls) -> bool: ...

    @classmethod
    def devices(cls) -> list[DeviceInfo]: ...

    def load(
        self,
        config: ModelConfig,
        shard: Shard,
        tensors: TensorSource,
        dtype: str,
        *,
        max_context: int,
        max_sequences: int,
    ) -> StageModel: ...


_REGISTRY: dict[str, type] = {}
_ENTRY_POINTS_LOADED = False


def register_backend(cls: type, name: str | None = None) -> type:
    """Register a backend class under `name` (default: `cls.name`).

    Usable as a decorator. Later registrations of a name replace earlier ones.
    """
    _REGISTRY[name or cls.name] = cls
    return cls


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in importlib.metadata.entry_points(group="cake.backends"):
        if ep.name in _REGISTRY:
            continue
        try:
            _REGISTRY[ep.name] = ep.load()
        except ImportError:
            # An optional backend whose package is missing is simply unavailable.
            continue
        except Exception as e:  # a broken plugin must not break the others
            print(
                f"cake: backend plugin {ep.name!r} failed to load: {e}", file=sys.stderr
            )


def available_backends() -> dict[str, type]:
    """Registered backends whose packages are installed and usable here."""
    _load_entry_points()
    return {n: c for n, c in _REGISTRY.items() if _safe_available(c)}


def _safe_available(cls: type) -> bool:
    try:
        return bool(cls.is_available())
    except Exception:
        return False


def get_backend(name: str) -> Backend:
    """An instance of the backend called `name`; "auto" picks one (see `auto_backend`)."""
    if name == "auto":
        name = auto_backend()
        print(f"cake: backend auto -> {name}", file=sys.stderr)
    _load_entry_points()
    cls = _REGISTRY.get(name)
    if cls is None:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise BackendError(f"unknown backend {name!r} (registered: {known})")
    if not _safe_available(cls):
        raise BackendError(f"backend {name!r} is not available on this machine")
    return cls()


def auto_backend() -> str:
    """MLX on Apple silicon with Metal; JAX on a GPU/TPU; else JAX on the CPU; else NumPy.

    MLX is never chosen on Linux: its CPU build's bundled BLAS is slow.
    """
    avail = available_backends()
    if "mlx" in avail and sys.platform == "darwin" and platform.machine() == "arm64":
        if any(d.kind == "metal" for d in avail["mlx"].devices()):
            return "mlx"
    if "jax" in avail:
        return "jax"
    if "numpy" in avail:
        return "numpy"
    raise BackendError("no backend is available: install jax, mlx or numpy")
