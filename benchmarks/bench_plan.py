"""Does the plan's prediction hold? SmolLM2 on loopback: a master and 2 workers.

    .venv/bin/python benchmarks/bench_plan.py [--backend jax] [--context 1024]
        [--tokens 48] [--rounds 3] [--json FILE]

1. Two workers start without layers (`cake worker --model M`, same backend).
2. `cake.load(M, topology="auto", workers=[...])`: the master probes itself and
   both workers, plans (cake.plan.plan), prints the plan on stderr, and the
   planned workers load their layers.
3. The decode tokens/s of that plan is measured (greedy, `--tokens` per round,
   median over rounds) and set against the plan's prediction at the positions
   the rounds decoded at (the plan itself is made for `--context` positions).
4. The same for the even split over the three devices, the same profiles and
   cost model, run as its own topology: a pipeline that uses both workers,
   whatever the planner chose.

Target: predicted within 25 % of measured. The probes run one device at a time;
on a machine with fewer cores than processes, three JAX processes contend for
the CPU while the pipeline runs, which the probes do not see. Two effects the
cost model leaves out pull in opposite directions: the master's embedding,
final norm, head and sampling (slower than predicted), and the fixed cost of a
stage call, which the probe shares among 2 layers and a 30-layer stage among 30
(faster than predicted). See docs/bench.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from procs import free_port

import cake
from cake.api import default_model_path
from cake.backends.base import auto_backend
from cake.net.autoplan import AutoPlan
from cake.net.bench import worker_specs
from cake.plan import even_split
from cake.topology import Topology

PROMPT = [{"role": "user", "content": "Tell me a long story about a cake."}]


def start_worker(model: Path, port: int, backend: str, context: int):
    cmd = [sys.executable, "-m", "cake", "worker", "--model", str(model)]
    cmd += ["--backend", backend, "--bind", f"tcp://127.0.0.1:{port}"]
    cmd += ["--context", str(context)]
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 600:
        line = p.stdout.readline()
        if not line and p.poll() is not None:
            break
        lines.append(line)
        if "ready on" in line:
            # keep reading, so the worker never blocks on a full pipe
            threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True).start()
            return p, lines
    p.kill()
    raise SystemExit(f"worker did not start:\n{''.join(lines[-20:])}")


def measure(model: cake.Model, tokens: int, rounds: int) -> dict:
    # warm up: as long as a round, so every shape a round meets is compiled
    list(model.chat(PROMPT, max_tokens=tokens, temperature=0))
    tps, text = [], ""
    for _ in range(rounds):
        text = "".join(model.chat(PROMPT, max_tokens=tokens, temperature=0))
        tps.append(model.stats.decode_tokens_per_s)
    st = model.stats
    return {
        "decode_tok_s": statistics.median(tps),
        "rounds_tok_s": tps,
        "prompt_tokens": st.prompt_tokens,
        "decode_tokens": st.decode_tokens,
        "text": text,
    }


def report(name: str, ap: AutoPlan, m: dict) -> dict:
    pos = m["prompt_tokens"] + m["decode_tokens"] / 2  # mean position decoded at
    at_run = 1 / ap.predict_seconds(round(pos))
    measured = m["decode_tok_s"]
    r = {
        "plan": name,
        "method": ap.plan.method,
        "assignments": [
            [a.name, a.start, a.end, round(a.layer_seconds * 1e3, 3)]
            for a in ap.plan.assignments
        ],
        "dropped": [d[0] for d in ap.plan.dropped],
        "predicted_tok_s_at_context": ap.tokens_per_second,
        "head_ms": ap.head_seconds * 1e3,
        "planning_context": ap.plan.context,
        "mean_decode_position": pos,
        "predicted_tok_s": at_run,
        "measured_tok_s": measured,
        "error": at_run / measured - 1,
        **{k: m[k] for k in ("rounds_tok_s", "prompt_tokens", "decode_tokens")},
    }
    print(
        f"{name}: {' + '.join(f'{a[0]} {a[1]}-{a[2] - 1}' for a in r['assignments'])}"
        f"; predicted {at_run:.2f} tok/s at position {pos:.0f} "
        f"({ap.tokens_per_second:.2f} at {ap.plan.context}), measured "
        f"{measured:.2f}: {r['error']:+.0%} (target within 25 %)"
    )
    return r


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--backend", default="jax")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    backend = auto_backend() if a.backend == "auto" else a.backend
    model = a.model or default_model_path()
    ports = [free_port(), free_port()]
    t0 = time.monotonic()
    workers = [start_worker(model, pt, backend, a.context) for pt in ports]
    addresses = [f"127.0.0.1:{pt}" for pt in ports]
    results, texts = [], []
    try:
        m = cake.load(
            model, backend=backend, topology="auto", workers=addresses,
            max_context=a.context,
        )  # fmt: skip
        auto = m.plan
        texts.append(measure(m, a.tokens, a.rounds))
        results.append(report("auto plan", auto, texts[-1]))
        m.close()
        del m
        sizes = auto.sizes
        even = even_split(
            auto.profiles, sizes.n_layers, sizes.layer_bytes,
            sizes.kv_bytes_per_token, auto.plan.context, "master",
            activation_bytes=sizes.activation_bytes, master_bytes=sizes.master_bytes,
        )  # fmt: skip
        specs = {w.name: w for w in worker_specs(addresses)}
        topo = Topology(
            tuple(
                dataclasses.replace(specs[x.name], ranges=((x.start, x.end),))
                for x in even.assignments
                if x.name != "master"
            )
        )
        ap = dataclasses.replace(auto, plan=even, topology=topo)
        m = cake.load(model, backend=backend, topology=topo, max_context=a.context)
        texts.append(measure(m, a.tokens, a.rounds))
        results.append(report("even split", ap, texts[-1]))
        m.close()
    finally:
        for w, _ in workers:
            w.terminate()
            w.wait(30)
    out = {
        "backend": backend,
        "model": model.name,
        "context": a.context,
        "tokens": a.tokens,
        "rounds": a.rounds,
        "cpus": os.cpu_count(),
        "processes": 3,
        "profiles": [pr.to_dict() for pr in auto.profiles],
        "results": results,
        "same_text": len({t["text"] for t in texts}) == 1,
        "seconds": time.monotonic() - t0,
    }
    if (os.cpu_count() or 1) < 3:
        print(
            f"note: {os.cpu_count()} cores for 3 {backend} processes: they contend "
            "for the CPU while the pipeline runs, which the one-at-a-time probes "
            "do not see"
        )
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
