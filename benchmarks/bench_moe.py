"""A mixture of experts reads the experts its tokens pick, not all of them.

Three random models of one shape (hidden 512, 8 layers, 8 heads, vocabulary
1024), written as GGUFs in one format: a Mixtral with 8 experts of width 1024,
2 per token; the dense model a token of it reads (MLP width 2 x 1024, the
anchor for one sequence); and the dense model holding every expert (width 8 x
1024, the anchor for a batch, whose tokens pick most experts). Decode steps of
1 and 8 sequences on one backend, the models' rounds interleaved, medians.

    .venv/bin/python benchmarks/bench_moe.py [--format Q8_0] [--rounds 5] [--json-out F]

What to expect where the experts are run as they are picked (backends/jax/moe.py):
one sequence about as fast as the active dense model (plus the routing's
fixed cost per layer), 8 sequences no slower than the dense model holding all
experts. A backend that ran every expert would decode one sequence at the
speed of the all-experts model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPE = dict(
    vocab_size=1024,
    hidden_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
)
MODELS = {
    "moe: 8 experts of 1024, 2 per token": (
        "mixtral",
        dict(intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2),
    ),
    "dense, what a token reads (2048)": ("llama", dict(intermediate_size=2048)),
    "dense, every expert (8192)": ("llama", dict(intermediate_size=8192)),
}


def make(folder: Path, arch: str, kw: dict, fmt: str) -> Path:
    from tests.gguf_models import write_gguf
    from tests.models import make_checkpoint

    hf = make_checkpoint(arch, folder / "hf", **SHAPE, **kw, sliding_window=None)
    return write_gguf(hf, folder / f"model-{fmt}.gguf", fmt, fan_in_scale=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--format", default="Q8_0")
    ap.add_argument("--backend", default="jax")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json-out", type=Path)
    a = ap.parse_args()

    from cake.backends.base import Step
    from cake.pipeline import load_local_stage
    from cake.shard import Shard
    from cake.weights.checkpoint import open_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="cake-moe-"))
    stages, pos = {}, {}
    for i, (name, (arch, kw)) in enumerate(MODELS.items()):
        path = make(tmp / str(i), arch, kw, a.format)
        config, tensors = open_checkpoint(path)
        stage = load_local_stage(
            config, Shard.whole(config.num_hidden_layers), tensors, a.backend,
            "float32", max_context=1024, max_sequences=9,
        )  # fmt: skip
        x = np.arange(9 * 16, dtype=np.int32).reshape(9, 16) % 1000
        stage.forward(x, Step(tuple(range(9)), (0,) * 9, (16,) * 9))
        stages[name], pos[name] = stage, [16] * 9

    rng = np.random.default_rng(0)

    def step(name: str, group: list[int]) -> float:
        x = rng.integers(0, 1000, (len(group), 1), dtype=np.int32)
        st = Step(tuple(group), tuple(pos[name][s] for s in group), (1,) * len(group))
        t = time.perf_counter()
        stages[name].forward(x, st)
        dt = time.perf_counter() - t
        for s in group:
            pos[name][s] += 1
        return dt

    one, many = [0], list(range(1, 9))
    for name in stages:  # compile both shapes
        for _ in range(3):
            step(name, one), step(name, many)
    times = {name: {"1": [], "8": []} for name in stages}
    for _ in range(a.rounds):
        for name in stages:
            times[name]["1"].append(
                statistics.median(step(name, one) for _ in range(a.steps))
            )
            times[name]["8"].append(
                statistics.median(step(name, many) for _ in range(a.steps))
            )
    med = {
        n: {b: statistics.median(v) * 1e3 for b, v in t.items()}
        for n, t in times.items()
    }
    moe, active, every = list(med)
    print(f"| model ({a.format}, {a.backend}) | step B=1 (ms) | step B=8 (ms) |")
    print("|---|---:|---:|")
    for name, m in med.items():
        print(f"| {name} | {m['1']:.2f} | {m['8']:.2f} |")
    print(
        f"B=1: MoE / what a token reads {med[moe]['1'] / med[active]['1']:.2f}x, "
        f"/ every expert {med[moe]['1'] / med[every]['1']:.2f}x; "
        f"B=8: MoE / every expert {med[moe]['8'] / med[every]['8']:.2f}x"
    )
    if a.json_out:
        a.json_out.write_text(json.dumps({"format": a.format, "backend": a.backend,
                                          "median_ms": med, "rounds_s": times}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
