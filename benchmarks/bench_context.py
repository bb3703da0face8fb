"""Decode step time against the context's length: cake and llama.cpp on one GGUF.

    .venv/bin/python benchmarks/bench_context.py FILE.gguf [--positions 16,512,1024,2048,4000]
        [--lcpp-python PYTHON] [--rounds 3] [--steps 24] [--batch 1] [--json-out FILE]

A decode step at position P reads every layer's weights and the P cached
keys and values of each sequence; past a few thousand positions the cache is
a large part of what a step reads (SmolLM2-135M: 23 KB a position in float16
against ~100 MB of 4-bit weights). Each system runs in its own process and
fills its cache once to the largest position (random token ids, prefill in
chunks), then, from the largest position down, times `--steps` greedy
single-token steps at P, P + 1, ... (each round goes back to P). Figures: the
median step over the rounds (each round's best-of is not used: a long cache
is read from memory every step), in ms, next to

- llama.cpp on the same file in the same run (llama-cpp-python, 2 threads,
  float16 cache, n_batch 512), where `--lcpp-python` names a Python with
  `llama_cpp` installed (the anchor-bench README builds one), B = 1 only;
- the bound: (the file's tensor bytes + the cache bytes read at P) / the
  two-thread read bandwidth measured in the same run (NumPy float32 sum
  over 1 GiB, best of 5).

cake's cache is float16 for a quantized file and float32 for an F32 one
(cake.backends.jax); llama.cpp's float16. With `--batch B` cake steps B
sequences at once, each at P (llama.cpp is not run then).
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
CHUNK = 512
INNER = 3  # rounds of steps within one process


def time_steps(step, positions: list[int], steps: int, rounds: int) -> dict:
    """{P: median over rounds of the median of step(P), step(P + 1), ...}, the
    largest P first (each round goes back to P)."""
    out = {}
    for p in sorted(positions, reverse=True):
        meds = [
            statistics.median(step(p + i) for i in range(steps)) for _ in range(rounds)
        ]
        out[p] = statistics.median(meds)
    return out


def worker_cake(
    path: str, positions: list[int], steps: int, rounds: int, batch: int
) -> dict:
    from cake.backends.base import Draw, Step
    from cake.pipeline import load_local_stage
    from cake.shard import Shard
    from cake.weights.checkpoint import open_checkpoint

    config, tensors = open_checkpoint(path)
    top = max(positions)
    stage = load_local_stage(
        config,
        Shard.whole(config.num_hidden_layers),
        tensors,
        "jax",
        "float32",
        max_context=top + steps + 1,
        max_sequences=batch,
    )
    rng = np.random.default_rng(0)
    seqs = tuple(range(batch))
    for s in seqs:
        for at in range(0, top, CHUNK):
            n = min(CHUNK, top - at)
            ids = rng.integers(0, config.vocab_size, (1, n), dtype=np.int32)
            stage.forward(ids, Step((s,), (at,), (n,)))
    greedy = Draw((0.0,) * batch, (0.0,) * batch, (0.0,) * batch)

    def step(p: int) -> float:
        x = rng.integers(0, config.vocab_size, (batch, 1), dtype=np.int32)
        t = time.perf_counter()
        stage.forward(x, Step(seqs, (p,) * batch, (1,) * batch, draw=greedy))
        return time.perf_counter() - t

    step(top), step(top + 1)  # compiled, warm
    return time_steps(step, positions, steps, rounds)


def worker_lcpp(path: str, positions: list[int], steps: int, rounds: int) -> dict:
    import llama_cpp

    top = max(positions)
    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=top + steps + 16,
        n_threads=2,
        n_threads_batch=2,
        n_batch=CHUNK,
        n_ubatch=CHUNK,
        verbose=False,
    )
    rng = np.random.default_rng(0)
    vocab = llm.n_vocab()
    llm.eval(rng.integers(0, vocab, top).tolist())

    def step(p: int) -> float:
        llm.n_tokens = p  # eval() drops the cache past n_tokens first
        t = time.perf_counter()
        llm.eval([int(rng.integers(0, vocab))])
        return time.perf_counter() - t

    return time_steps(step, positions, steps, rounds)


def read_bandwidth() -> float:
    sys.path.insert(0, str(HERE))
    from bench_kernels import read_bandwidth as rb

    return rb(2)[1]


def bytes_per_step(path: str, p: int, batch: int) -> tuple[int, int]:
    """(tensor bytes of the file, cache bytes a step at position p reads)."""
    from gguf import GGUFReader

    from cake.weights.checkpoint import open_checkpoint

    r = GGUFReader(path)
    weights = sum(int(t.n_bytes) for t in r.tensors)
    config, _ = open_checkpoint(path)
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    f32 = all(t.tensor_type.name == "F32" for t in r.tensors if len(t.shape) == 2)
    return weights, kv * (p + 1) * (4 if f32 else 2) * batch


def run_worker(python: str, kind: str, a) -> dict:
    cmd = [python, __file__, a.file, "--worker", kind]
    cmd += ["--positions", a.positions, "--steps", str(a.steps)]
    cmd += ["--batch", str(a.batch)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["failed"])[-1]
        raise SystemExit(f"bench_context: the {kind} worker failed: {tail}")
    return {int(k): v for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--positions", default="16,512,1024,2048,4000")
    ap.add_argument("--lcpp-python", help="a Python with llama_cpp: llama.cpp rows")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per system")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json-out")
    ap.add_argument("--worker", choices=["cake", "lcpp"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    positions = [int(p) for p in a.positions.split(",")]
    if a.worker == "cake":
        print(json.dumps(worker_cake(a.file, positions, a.steps, INNER, a.batch)))
        return
    if a.worker == "lcpp":
        print(json.dumps(worker_lcpp(a.file, positions, a.steps, INNER)))
        return
    if not Path(a.file).is_file():
        raise SystemExit(f"bench_context: no such file: {a.file}")
    systems = {"cake": sys.executable}
    if a.lcpp_python and a.batch == 1:
        systems["llama.cpp"] = a.lcpp_python
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    bws = []
    for _ in range(a.rounds):  # the systems take turns, one process each a round
        for name, py in systems.items():
            runs[name].append(run_worker(py, "cake" if name == "cake" else "lcpp", a))
        bws.append(read_bandwidth())
    bw = statistics.median(bws) * 1e9
    rows = []
    for p in positions:
        w, kv = bytes_per_step(a.file, p, a.batch)
        row = {
            "position": p,
            "weights_bytes": w,
            "cache_bytes": kv,
            "bound_ms": (w + kv) / bw * 1e3,
        }
        for name in systems:
            row[f"{name}_ms"] = statistics.median(r[p] for r in runs[name]) * 1e3
        rows.append(row)
    print(
        f"{Path(a.file).name}, B={a.batch}, read bandwidth {bw / 1e9:.1f} GB/s (2 threads), "
        f"{a.rounds} rounds"
    )
    head = "| position | cache MB | bound ms | cake ms | cake % of bound |"
    head += " llama.cpp ms | cake / llama.cpp speed |" if "llama.cpp" in systems else ""
    print(head)
    print("|" + "---:|" * (head.count("|") - 1))
    for r in rows:
        line = (
            f"| {r['position']} | {r['cache_bytes'] / 1e6:.1f} | {r['bound_ms']:.2f} | "
        )
        line += f"{r['cake_ms']:.2f} | {100 * r['bound_ms'] / r['cake_ms']:.0f} % |"
        if "llama.cpp" in systems:
            line += (
                f" {r['llama.cpp_ms']:.2f} | {r['llama.cpp_ms'] / r['cake_ms']:.2f}x |"
            )
        print(line)
    if a.json_out:
        Path(a.json_out).write_text(
            json.dumps(
                {
                    "file": a.file,
                    "batch": a.batch,
                    "bandwidth": bw,
                    "rows": rows,
                    "runs": runs,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
