"""A decode step's draw: in the head stage, or on the host from its logits.

Loads one checkpoint whole on the JAX backend, prefills B sequences, then
times decode steps of B sequences per sampling setting (greedy; temperature
with min-p; top-p; top-k; both), three ways, interleaved, each round's best
of `--steps`, the median of the rounds:

- stage: the step draws its tokens (cake.backends.base.Draw) and only the ids
  leave it, as the engine's steps do;
- host kernel: the step returns the logits (B, V), copied out, and the host
  draws from them with the CPU kernels' sampler (cake.sampling.draw_rows), as
  a pipeline whose head is a remote worker does;
- host numpy: the same with NumPy's form of the draw (the kernels switched
  off), which is what the engine did for top-k and top-p before the stage
  drew them (2026-12-04).

The anchor is the greedy step drawn in the stage, in the same run. With
`--xla-draw` the stage draws through XLA (a sort of each row for top-k and
top-p) instead of the CPU kernels' sampler, as on a GPU or a CPU without
the kernels.

    .venv/bin/python benchmarks/bench_sampling.py [FILE.gguf] [--batch 8]
        [--rounds 5] [--steps 6] [--xla-draw] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

SETTINGS = {  # name: (temperature, min_p, top_k, top_p)
    "greedy": (0.0, 0.0, 0, 1.0),
    "temperature 0.8, min-p 0.05": (0.8, 0.05, 0, 1.0),
    "top-p 0.9": (0.8, 0.0, 0, 0.9),
    "top-k 40": (0.8, 0.0, 40, 1.0),
    "top-k 40, top-p 0.95": (0.8, 0.05, 40, 0.95),
}
WAYS = ("stage", "host kernel", "host numpy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--xla-draw", action="store_true")
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args()

    from cake import sampling
    from cake.api import default_model_path
    from cake.backends.base import Draw, Step
    from cake.kernels import cpu
    from cake.pipeline import load_local_stage
    from cake.shard import Shard
    from cake.weights.checkpoint import open_checkpoint

    path = a.model or str(default_model_path())
    config, tensors = open_checkpoint(path)
    b = a.batch
    stage = load_local_stage(
        config,
        Shard.whole(config.num_hidden_layers),
        tensors,
        "jax",
        "float32",
        max_context=256,
        max_sequences=b,
    )
    if a.xla_draw:
        stage._draw_kernel = False  # read when the steps are traced, below
    rng = np.random.default_rng(0)
    seqs = tuple(range(b))
    prompt = rng.integers(0, config.vocab_size, (b, 16), dtype=np.int32)
    stage.forward(prompt, Step(seqs, (0,) * b, (16,) * b))
    pos = [16]
    kernel_np = cpu.sample_np

    def step(setting: str, way: str) -> float:
        t, mp, k, p = SETTINGS[setting]
        d = Draw((t,) * b, (mp,) * b, tuple(rng.random(b)), (k,) * b, (p,) * b)
        x = rng.integers(0, config.vocab_size, (b, 1), dtype=np.int32)
        st = Step(seqs, (pos[0],) * b, (1,) * b, draw=d if way == "stage" else None)
        if way == "host numpy":
            cpu.sample_np = lambda *a, **k: None
        t0 = time.perf_counter()
        try:
            out = stage.forward(x, st)
            ids = out if way == "stage" else sampling.draw_rows(out, d)
        finally:
            cpu.sample_np = kernel_np
        dt = time.perf_counter() - t0
        assert ids.shape == (b,) and (ids >= 0).all()
        pos[0] += 1
        return dt

    for s in SETTINGS:  # compile, warm
        for w in WAYS:
            step(s, w)
    times: dict[tuple[str, str], list[float]] = {
        (s, w): [] for s in SETTINGS for w in WAYS
    }
    for _ in range(a.rounds):
        for s in SETTINGS:
            for w in WAYS:
                times[s, w].append(min(step(s, w) for _ in range(a.steps)))
        pos[0] = 16  # stay inside the context
    stage.close()
    anchor = statistics.median(times["greedy", "stage"])
    rows = []
    for s in SETTINGS:
        row = {"setting": s}
        for w in WAYS:
            med = statistics.median(times[s, w])
            row[w] = {"ms": med * 1e3, "ratio": med / anchor}
        rows.append(row)
    out = {
        "file": path,
        "batch": b,
        "draw": "xla" if a.xla_draw else "kernel",
        "anchor_ms": anchor * 1e3,
        "rows": rows,
    }
    print(
        f"{b} sequences a step; anchor: a greedy step drawn in the stage, "
        f"{anchor * 1e3:.2f} ms"
    )
    print("| setting | " + " | ".join(WAYS) + " |")
    print("|---|" + "---:|" * len(WAYS))
    for row in rows:
        cells = [f"{row[w]['ms']:.2f} ms ({row[w]['ratio']:.2f}x)" for w in WAYS]
        print(f"| {row['setting']} | " + " | ".join(cells) + " |")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
