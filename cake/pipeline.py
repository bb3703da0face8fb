"""Stage protocol and Pipeline: an ordered list of stages from token ids to logits.

A stage is anything with `shard`, `forward(x, step)` and `release(seq_ids)`: a
backend's StageModel in this process, or a RemoteStage (cake.net) speaking to a
worker. The pipeline does not care which.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol

import numpy as np

from cake.backends.base import Step, get_backend
from cake.config import ModelConfig
from cake.embedding import EmbeddingStage
from cake.errors import CakeError
from cake.sampling import draw_rows
from cake.shard import Shard
from cake.weights.names import layer_shapes, shard_tensor_names
from cake.weights.packed import Stored, stored_tensor
from cake.weights.source import TensorSource

DEFAULT_PREFILL_CHUNK = 512


class StageReset(Exception):
    """A stage lost its KV caches (a worker came back after a failure).

    Not an error for the user: the caller replays each sequence it holds from
    position 0 (a Step at position 0 rewinds every other stage's cache).
    """


class Stage(Protocol):
    shard: Shard

    def forward(self, x: np.ndarray, step: Step) -> np.ndarray: ...

    def release(self, seq_ids: Sequence[int]) -> None: ...


class Pipeline:
    """Stages covering embed, layers [0, n) in order, and head."""

    def __init__(self, stages: Sequence[Stage], max_context: int) -> None:
        if not stages:
            raise CakeError("a pipeline needs at least one stage")
        first, last = stages[0].shard, stages[-1].shard
        if not first.embed or not last.head:
            raise CakeError("the first stage must own the embedding, the last the head")
        expect = 0
        for s in stages:
            if s.shard.start != expect:
                raise CakeError(
                    f"stages do not cover the layers in order: expected a stage "
                    f"starting at layer {expect}, got {s.shard.start}"
                )
            expect = s.shard.end
        if expect != first.n_layers:
            raise CakeError(f"stages end at layer {expect}, not {first.n_layers}")
        self.stages = list(stages)
        self.max_context = max_context
        # prompt ids per forward call: what the slowest-to-chunk stage prefers
        # (a stage may say, e.g. the JAX CPU stage; else 512, which bounds
        # activation memory)
        self.prefill_chunk = min(
            getattr(s, "prefill_chunk", DEFAULT_PREFILL_CHUNK) for s in self.stages
        )

    def forward(self, ids: np.ndarray, step: Step) -> np.ndarray:
        """ids (B, L) int32 -> float32 logits, (B, V) or (B, L, V) if
        step.all_logits; int32 token ids (B,) if step.draw: drawn by the head
        stage where it `draws` (only the ids leave its device), else here from
        its logits, the same draw (cake.sampling.draw_rows)."""
        head = self.stages[-1]
        here = step.draw is not None and not getattr(head, "draws", False)
        inner = replace(step, draw=None) if here else step
        x = ids
        for stage in self.stages:
            x = stage.forward(x, inner)
        return draw_rows(x, step.draw) if here else x

    @property
    def can_dispatch(self) -> bool:
        """Can a Step that draws be dispatched (`dispatch`)? Where one stage
        in this process holds the whole model and dispatches (a JAX stage)."""
        return len(self.stages) == 1 and hasattr(self.stages[0], "dispatch")

    @property
    def asynchronous(self) -> bool:
        """Does a dispatched step run after its call returns (the stage's
        device is not the host's cores: a GPU, a TPU)? Then the engine queues
        step n+1 before it reads step n's tokens (cake.engine)."""
        return self.can_dispatch and getattr(self.stages[0], "asynchronous", False)

    def dispatch(self, ids, step: Step):
        """`forward` of a Step that draws, returning at once a handle whose
        `result()` gives the ids (see JaxLlamaStage.dispatch); `ids` may be
        such a handle of the previous decode step of the same sequences."""
        if not self.can_dispatch:
            raise CakeError("this pipeline's stages cannot dispatch a step")
        return self.stages[0].dispatch(ids, step)

    def release(self, seq_ids: Sequence[int]) -> None:
        for stage in self.stages:
            stage.release(seq_ids)

    @property
    def compile_s(self) -> float:
        """Seconds of the steps in which a local stage compiled a new shape."""
        return sum(getattr(s, "compile_s", 0.0) for s in self.stages)

    @property
    def compiles(self) -> bool:
        """Does a stage compile each new step shape (JAX, here or on a worker)?"""
        return any(getattr(s, "compiles", False) for s in self.stages)


class _CountingSource:
    """A TensorSource that reports each tensor read, for a loading progress bar."""

    def __init__(self, inner: TensorSource, tick: Callable[[str], None]) -> None:
        self._inner, self._tick = inner, tick

    def keys(self) -> list[str]:
        return self._inner.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._inner.shape(name)

    def __contains__(self, name: object) -> bool:
        return name in self._inner

    def get(self, name: str) -> np.ndarray:
        t = self._inner.get(name)
        self._tick(name)
        return t

    def stored(self, name: str) -> Stored:
        t = stored_tensor(self._inner, name)
        self._tick(name)
        return t


def load_local_stage(
    config: ModelConfig,
    shard: Shard,
    tensors: TensorSource,
    backend: str,
    dtype: str,
    *,
    max_context: int,
    max_sequences: int,
    progress: Callable[[int, int], None] | None = None,
):
    """Load `shard` on `backend`; `progress(done, total)` after each tensor read.

    The embedding alone (a master whose first worker holds layer 0) is an
    EmbeddingStage on the host whatever the backend: see cake.embedding.
    """
    names = shard_tensor_names(config, shard)
    missing = [n for n in names if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CakeError(f"the checkpoint lacks the tensor {missing[0]}{more}")
    for n in names:
        _check_shape(config, n, tensors.shape(n))
    if progress is not None:
        done = [0]

        def tick(_name: str) -> None:
            done[0] += 1
            progress(done[0], len(names))

        tensors = _CountingSource(tensors, tick)
    embed_only = shard.embed and not len(shard) and not shard.head
    load = EmbeddingStage if embed_only else get_backend(backend).load
    return load(
        config,
        shard,
        tensors,
        dtype,
        max_context=max_context,
        max_sequences=max_sequences,
    )


def expected_shape(config: ModelConfig, name: str) -> tuple[int, ...] | None:
    c = config
    top = {
        "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
        "lm_head.weight": (c.vocab_size, c.hidden_size),
        "model.norm.weight": (c.hidden_size,),
    }
    parts = name.split(".")
    if name.startswith("model.layers.") and parts[2].isdigit():
        return layer_shapes(c, int(parts[2])).get(name)
    return top.get(name)


def _check_shape(config: ModelConfig, name: str, shape: tuple[int, ...]) -> None:
    want = expected_shape(config, name)
    if want is not None and tuple(shape) != want:
        raise CakeError(
            f"tensor {name} has shape {tuple(shape)} but the config implies {want}"
        )
