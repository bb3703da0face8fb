"""A llama layer in one CPU custom call against one custom call per product.

Loads each checkpoint whole twice in one process on the JAX CPU stage: one
stage traced with CAKE_CPU_LAYER=1 (kernels/cpu/layer.py: a layer is one XLA
custom call), the other with CAKE_CPU_LAYER=0 (each product and the attention
one custom call, the anchor). Both make the same kernel calls on the same
weights; the difference is XLA's dispatch between them. Times decode steps of
1 and of --batch sequences and a prefill chunk of 128 tokens, the two stages
alternating step by step, best of --steps per round, median of --rounds.

    .venv/bin/python benchmarks/bench_layer_call.py FILE.gguf [FILE ...] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

CHUNK = 128


def load(path: str, one_call: bool, seqs: int):
    from cake.backends.jax import llama
    from cake.pipeline import load_local_stage
    from cake.shard import Shard
    from cake.weights.checkpoint import open_checkpoint

    os.environ["CAKE_CPU_LAYER"] = "1" if one_call else "0"
    llama._layer_kernel_available.cache_clear()  # read when a step is traced
    config, tensors = open_checkpoint(path)
    return config, load_local_stage(
        config,
        Shard.whole(config.num_hidden_layers),
        tensors,
        "jax",
        "float32",
        max_context=512,
        max_sequences=seqs,
    )


def bench_file(path: str, batch: int, rounds: int, steps: int) -> dict:
    from cake.backends.base import Step

    seqs = batch + 1
    stages, config = {}, None
    rng = np.random.default_rng(0)
    kinds = {"1": [0], "B": list(range(1, seqs)), "prefill": [0]}
    for one_call in (True, False):
        config, stage = load(path, one_call, seqs)
        stages[one_call] = stage
        x = rng.integers(0, config.vocab_size, (seqs, 64), dtype=np.int32)
        stage.forward(x, Step(tuple(range(seqs)), (0,) * seqs, (64,) * seqs))
        for kind in kinds:  # trace and compile every shape under its setting
            run(stage, config, kind, kinds[kind], rng)
    times = {(o, k): [] for o in stages for k in kinds}
    for _ in range(rounds):
        for kind, group in kinds.items():
            best = {o: float("inf") for o in stages}
            for _ in range(steps):
                for o, stage in stages.items():
                    best[o] = min(best[o], run(stage, config, kind, group, rng))
            for o in stages:
                times[o, kind].append(best[o])
    med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
    row = {"file": Path(path).name, "batch": batch}
    for kind in kinds:
        row[f"{kind}_one_call_ms"] = med[True, kind]
        row[f"{kind}_per_product_ms"] = med[False, kind]
        row[f"{kind}_ratio"] = med[True, kind] / med[False, kind]
    return row


def run(stage, config, kind: str, group: list[int], rng) -> float:
    """One step of `kind` for the sequences `group`; seconds. Decode steps sit
    at position 64, a prefill chunk at 0 (each rewinds its sequences' caches)."""
    from cake.backends.base import Step

    n = CHUNK if kind == "prefill" else 1
    pos = 0 if kind == "prefill" else 64
    x = rng.integers(0, config.vocab_size, (len(group), n), dtype=np.int32)
    st = Step(tuple(group), (pos,) * len(group), (n,) * len(group))
    t = time.perf_counter()
    stage.forward(x, st)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8, help="best of this many per round")
    ap.add_argument("--json-out", type=Path)
    a = ap.parse_args()
    rows = [bench_file(f, a.batch, a.rounds, a.steps) for f in a.files]
    b = a.batch
    print(
        "| file | step | one call per layer (ms) | one per product (ms, anchor) | ratio |"
    )
    print("|---|---|---:|---:|---:|")
    for r in rows:
        for kind, what in (
            ("1", "decode B=1"),
            ("B", f"decode B={b}"),
            ("prefill", f"prefill {CHUNK}"),
        ):
            print(
                f"| {r['file']} | {what} | {r[f'{kind}_one_call_ms']:.2f} "
                f"| {r[f'{kind}_per_product_ms']:.2f} | {r[f'{kind}_ratio']:.3f}x |"
            )
    if a.json_out:
        a.json_out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
