"""Decode step time for a batch of B sequences against a step for one, per file.

Loads each checkpoint whole (embedding, layers, head) on one backend, prefills
B sequences of 16 tokens, then times decode steps of 1 and of B sequences,
interleaved, median of the rounds. The anchor is the step for one sequence in
the same run: the ratio is what batching costs (target, issue 12: B=8 at most
1.5x; a kernel that reads each weight once for all rows gets there).

With `--processes P` each file is measured in P fresh processes, the files
taking turns (A, B, ..., A, B, ...), and a file's figures are the medians of
its processes' (each process's ratio from its own rounds), with their range:
on this shared VM the same step moves by up to 30 % from one process to the
next (SmolLM2 Q4_K_M, 40 rounds each, three processes in a row: 1.36x, 1.44x,
1.45x; another hour 1.80x), more than within one process's rounds.

With `--draw` each step draws its tokens greedily in the stage and returns
their ids, as the engine's decode steps do where no request needs the logits
(cake.backends.base.Draw); without it each returns the logits (B, V), copied
to the host.

With `--synthetic Q4_K_M,Q8_0,... --synthetic-dir DIR` it first writes (once)
a Llama-3.2-1B-shaped GGUF of random valid blocks per type into DIR and
measures those too. SmolLM2's matrices are 576 wide, which no K-quant block
(256) divides except the 1536-wide down projections, so llama.cpp's K-quant
presets of it are legacy blocks; at 2048 / 8192 wide every matrix is a K-quant
one, as in the files users download.

    .venv/bin/python benchmarks/bench_batch.py FILE.gguf [FILE ...] [--backend jax] [--batch 8] [--processes 5] [--draw]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

# Block type per matrix of a synthetic file: (the rest, v and down projections).
# llama.cpp's presets give the v and down projections more bits (in some or all
# layers; the tied embedding, here the head too, takes the "rest" type).
MIXES = {
    "Q2_K": ("Q2_K", "Q3_K"),
    "Q3_K_M": ("Q3_K", "Q4_K"),
    "Q4_K_M": ("Q4_K", "Q6_K"),
    "Q5_K_M": ("Q5_K", "Q6_K"),
    "Q6_K": ("Q6_K", "Q6_K"),
}


def synthetic(fmt: str, folder: Path) -> str:
    """Path of the 1B-shaped random GGUF of preset `fmt`, written if absent."""
    sys.path.insert(0, str(HERE))
    from random_weights import SHAPE_1B, write_random_gguf

    rest, more = MIXES.get(fmt, (fmt, fmt))
    path = folder / f"random-1b.{fmt}.gguf"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)

        def kind(name: str) -> str:
            return (
                more if name.endswith(("v_proj.weight", "down_proj.weight")) else rest
            )

        part = path.with_suffix(".part")
        write_random_gguf(part, SHAPE_1B, kind)
        part.rename(path)  # a run cut short leaves no half-written file behind
    return str(path)


def bench_file(
    path: str, backend: str, batch: int, rounds: int, steps: int, draw: bool = False
) -> dict:
    from cake.backends.base import Draw, Step
    from cake.pipeline import load_local_stage
    from cake.shard import Shard
    from cake.weights.checkpoint import open_checkpoint

    config, tensors = open_checkpoint(path)
    t0 = time.perf_counter()
    stage = load_local_stage(
        config,
        Shard.whole(config.num_hidden_layers),
        tensors,
        backend,
        "float32",
        max_context=256,
        max_sequences=batch + 1,
    )
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    seqs = list(range(batch + 1))
    ids = rng.integers(0, config.vocab_size, (batch + 1, 16), dtype=np.int32)
    stage.forward(ids, Step(tuple(seqs), (0,) * len(seqs), (16,) * len(seqs)))
    pos = {s: 16 for s in seqs}

    def step(group: list[int]) -> float:
        x = rng.integers(0, config.vocab_size, (len(group), 1), dtype=np.int32)
        n = len(group)
        greedy = Draw((0.0,) * n, (0.0,) * n, (0.0,) * n) if draw else None
        st = Step(tuple(group), tuple(pos[s] for s in group), (1,) * n, draw=greedy)
        t = time.perf_counter()
        stage.forward(x, st)
        dt = time.perf_counter() - t
        for s in group:
            pos[s] += 1
        return dt

    one, many = [seqs[0]], seqs[1:]
    for _ in range(3):  # compile both shapes
        step(one), step(many)
    t1, tb = [], []
    for _ in range(rounds):
        t1.append(min(step(one) for _ in range(steps)))
        tb.append(min(step(many) for _ in range(steps)))
        for s in seqs:  # stay inside the context
            pos[s] = 16
    a, b = statistics.median(t1), statistics.median(tb)
    return {
        "file": Path(path).name,
        "backend": backend,
        "batch": batch,
        "draw": draw,
        "load_s": load_s,
        "step_1_ms": a * 1e3,
        f"step_{batch}_ms": b * 1e3,
        "ratio": b / a,
        "tok_s_1": 1 / a,
        f"tok_s_{batch}": batch / b,
    }


def in_processes(files, a) -> list[dict]:
    """Each file in `a.processes` fresh processes, the files taking turns."""
    runs: dict[str, list[dict]] = {f: [] for f in files}
    for _ in range(a.processes):
        for f in files:
            cmd = [sys.executable, __file__, f, "--json-out", "-"]
            cmd += ["--backend", a.backend, "--batch", str(a.batch)]
            cmd += ["--rounds", str(a.rounds), "--steps", str(a.steps)]
            cmd += ["--draw"] if a.draw else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[f].append(json.loads(out.stdout)[0])
    rows = []
    for rs in runs.values():
        row = dict(rs[0])
        for key in ("load_s", "step_1_ms", f"step_{a.batch}_ms", "ratio"):
            row[key] = statistics.median(r[key] for r in rs)
        row["tok_s_1"] = 1e3 / row["step_1_ms"]
        row[f"tok_s_{a.batch}"] = a.batch * 1e3 / row[f"step_{a.batch}_ms"]
        row["processes"] = len(rs)
        row["ratio_range"] = [min(r["ratio"] for r in rs), max(r["ratio"] for r in rs)]
        row["runs"] = rs
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*")
    ap.add_argument("--backend", default="jax")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8, help="best of this many per round")
    ap.add_argument(
        "--processes", type=int, default=1, help="fresh processes per file, in turns"
    )
    ap.add_argument(
        "--draw", action="store_true", help="steps draw greedy ids in the stage"
    )
    ap.add_argument("--json-out", help="FILE, or - for JSON alone on stdout")
    ap.add_argument(
        "--synthetic", default="", help="comma-separated presets, e.g. Q4_K_M,Q8_0"
    )
    ap.add_argument("--synthetic-dir", type=Path, default=Path("/tmp/cake-synthetic"))
    a = ap.parse_args()
    for fmt in filter(None, a.synthetic.split(",")):
        a.files.append(synthetic(fmt, a.synthetic_dir))
    if a.processes > 1:
        rows = in_processes(a.files, a)
    else:
        rows = [
            bench_file(f, a.backend, a.batch, a.rounds, a.steps, a.draw)
            for f in a.files
        ]
    if a.json_out == "-":
        print(json.dumps(rows))
        return
    b = a.batch
    print(
        f"| file | backend | step B=1 (ms) | step B={b} (ms) | B={b} / B=1 "
        f"| tok/s B=1 | tok/s B={b} |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        spread = ""
        if "ratio_range" in r:
            lo, hi = r["ratio_range"]
            spread = f" ({lo:.2f}-{hi:.2f}, {r['processes']} processes)"
        print(
            f"| {r['file']} | {r['backend']} | {r['step_1_ms']:.1f} "
            f"| {r[f'step_{b}_ms']:.1f} | {r['ratio']:.2f}x{spread} | {r['tok_s_1']:.1f} "
            f"| {r[f'tok_s_{b}']:.1f} |"
        )
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
