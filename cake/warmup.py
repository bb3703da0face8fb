"""The step shapes a run sends, and running them once, ahead, on a stage.

A JAX stage compiles each new step shape (0.1-0.3 s each for SmolLM2 on 2
cores, from the persistent compilation cache or not). A master's engine runs
every shape it will send before its first request (Engine.warm_up); `cake
worker --warm-up` runs them on the worker's own stages as soon as it holds
layers, so that a cluster is ready before a master's first request and each
worker's persistent cache holds what later runs need.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable

import numpy as np

from cake.backends.base import Step
from cake.kv import dtype_of


def prefill_widths(prefill_chunk: int, context: int | None = None) -> list[int]:
    """The widths a prompt's chunks are padded to: powers of two from 2 up to
    prefill_chunk (which the last may be), below `context` when given (a
    chunk at position 0 must leave room for one more token)."""
    cap = prefill_chunk if context is None else min(prefill_chunk, context - 1)
    widths = [2] if cap >= 2 else []
    while widths and widths[-1] < cap:
        nxt = min(2 * widths[-1], prefill_chunk)
        if nxt > cap:
            break
        widths.append(nxt)
    return widths


def step_shapes(batches: Iterable[int], widths: Iterable[int]) -> list[tuple[int, int]]:
    """(sequences, ids per sequence): a decode step of each batch size, then a
    prefill chunk of one sequence of each width."""
    return [(b, 1) for b in batches] + [(1, w) for w in widths]


def warm_stage(stage, shapes: Iterable[tuple[int, int]], hidden_size: int) -> None:
    """Run `stage` once on each shape (zeros at position 0, sequences 0..b-1,
    released after: the stage must hold none of them)."""
    dt = dtype_of(stage.dtype)
    for b, width in shapes:
        seqs = tuple(range(b))
        if stage.shard.embed:
            x = np.zeros((b, width), np.int32)
        else:
            x = np.zeros((b, width, hidden_size), dt)
        stage.forward(x, Step(seqs, (0,) * b, (width,) * b))
        stage.release(seqs)


def freeze_heap() -> None:
    """Put every object alive now beyond Python's cyclic collector, for a
    process that keeps its model until it exits (`cake run`, `cake serve`).

    A full collection walks every tracked object, ~1.3 M once JAX and a model
    are loaded: 44-145 ms each here, set off by the objects a background
    lowering makes (cake.backends.jax.programs), and the thread that runs one
    holds the GIL throughout, so the decode step in flight waits: the worst
    rounds of a generation on XLA's attention were such collections (2
    cores, 2026-12-06). Frozen, what is left to walk is what came after:
    9-33 ms. Frozen objects in reference cycles are never freed: a process
    that drops a model calls gc.unfreeze() first (a worker given other
    layers, cake.net.worker_ops); tests, which load many, never freeze."""
    gc.collect()
    gc.freeze()
