"""Micro-batches in flight through 2 workers: does keeping both busy pay here?

    .venv/bin/python benchmarks/bench_microbatch.py [--model FILE.gguf]
        [--batch 8] [--steps 64] [--rounds 5] [--configs shared,pinned]
        [--json-out FILE]

SmolLM2 on loopback: 2 `cake worker` processes (jax) hold half the layers each,
this process is the master (embedding on the host, head on jax, greedy argmax
on the host), as `cake serve --topology` runs it. The same decode of --batch
sequences (--steps greedy tokens each, from the same cache positions) runs
three ways, rounds interleaved:

  one-step   one Step of all sequences per stage, as the engine sends it today
             (Pipeline.forward: each worker idles while the other computes);
  split      2 Steps of half the sequences, one after the other (the cost of
             splitting alone, nothing in flight);
  in-flight  2 micro-batches of half each, pipelined: a micro-batch goes on to
             the next stage as soon as its reply comes, and its next token
             enters worker 0 while worker 1 still runs the other half, so both
             workers compute at once.

Two sets of workers, in the same run: "shared", as `cake worker` starts (each
process's kernels use every core: 2 threads), and "pinned", each worker on a
core of its own with one thread (`taskset`, CAKE_NUM_THREADS=1), as 2 devices
would be, where in-flight has the most to gain.

Pipeline.forward waits for each stage's reply before it sends anything else
(WorkerClient.request drops replies to other ids), so in-flight drives the
workers' DEALER sockets directly with the protocol's forward messages. Every
way must give the same tokens. The anchor is one-step, in the same run. Each
sample waits (--wait-quiet-s, bounded) for a quiet CPU and records the cores
other processes used meanwhile; a figure is the median over the quiet samples,
a ratio the median of each round's ratio over the rounds in which both of its
samples were quiet (all, if none was).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq
from harness import LoadMeter, wait_quiet
from procs import free_port, source_state, start

import cake
from cake.api import default_model_path
from cake.backends.base import Step
from cake.embedding import EmbeddingStage
from cake.net.protocol import (
    array_from_frame,
    decode_header,
    encode_header,
    forward_header,
    payload,
)
from cake.net.remote import RemoteStage
from cake.weights.checkpoint import open_checkpoint

CONTEXT = 1024
PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "The history of the bicycle begins",
    "Here is a recipe for a simple bread:",
    "The three laws of motion are",
    "In the year 2050, cities will",
    "A short guide to growing tomatoes:",
    "The best way to learn a language is",
    "Dear diary, today I",
]


def start_workers(model: Path, batch: int, tmp: Path, pinned: bool) -> tuple:
    n = open_checkpoint(model)[0].num_hidden_layers
    procs, lines = [], []
    for i, (a, b) in enumerate([(0, n // 2), (n // 2, n)]):
        port = free_port()
        cmd = ["env", "CAKE_NUM_THREADS=1", "taskset", "-c", str(i)] if pinned else []
        cmd += [sys.executable, "-c", "from cake.cli import main; main()", "worker"]
        cmd += ["--model", str(model), "--layers", f"{a}-{b - 1}", "--backend", "jax"]
        cmd += ["--context", str(CONTEXT), "--max-sequences", str(batch)]
        procs.append(start([*cmd, "--bind", f"tcp://127.0.0.1:{port}"], "ready on"))
        lines.append(f"w{i}:\n  host: '127.0.0.1:{port}'\n")
        lines.append(f"  layers: ['model.layers.{a}-{b - 1}']\n")
    topo = tmp / f"topology-{'pinned' if pinned else 'shared'}.yaml"
    topo.write_text("".join(lines))
    return procs, topo


class Decode:
    """The master's stages and the state every run starts from: each sequence's
    first drawn token and its cache position after the prompt."""

    def __init__(self, model, batch: int) -> None:
        stages = model.pipeline.stages
        assert len(stages) == 4 and isinstance(stages[0], EmbeddingStage), stages
        assert all(isinstance(s, RemoteStage) for s in stages[1:3]), stages
        self.pipeline = model.pipeline
        self.embed, self.remotes, self.head = stages[0], stages[1:3], stages[3]
        self.batch = batch
        self.first, self.start = [], []
        for i in range(batch):
            ids = model.tokenizer.encode(PROMPTS[i % len(PROMPTS)])
            step = Step((i,), (0,), (len(ids),))
            logits = self.pipeline.forward(np.array([ids], np.int32), step)
            self.first.append(int(np.argmax(logits[0])))
            self.start.append(len(ids))
        self.compute: dict[str, list[tuple[int, float]]] = {}  # way -> (B, s)

    def _note(self, way: str, reply: dict, b: int) -> None:
        self.compute.setdefault(way, []).append((b, reply.get("compute_us", 0) / 1e6))

    def _timed_remotes(self, way: str) -> None:
        for r in self.remotes:
            client = r.client
            inner = getattr(client, "_inner_request", client.request)
            client._inner_request = inner

            def request(header, data=None, _inner=inner, **kw):
                reply, frame = _inner(header, data, **kw)
                if header.get("op") == "forward":
                    self._note(way, reply, len(header["seq_ids"]))
                return reply, frame

            client.request = request

    def steps(self, way: str, n: int) -> list[list[int]]:
        """n greedy tokens of every sequence, by `way` (one-step or split)."""
        self._timed_remotes(way)
        groups = [list(range(self.batch))]
        if way == "split":
            h = self.batch // 2
            groups = [groups[0][:h], groups[0][h:]]
        tok, pos = list(self.first), list(self.start)
        out = [[] for _ in range(self.batch)]
        for _ in range(n):
            for g in groups:
                ids = np.array([[tok[i]] for i in g], np.int32)
                step = Step(tuple(g), tuple(pos[i] for i in g), (1,) * len(g))
                logits = self.pipeline.forward(ids, step)
                for j, i in enumerate(g):
                    tok[i] = int(np.argmax(logits[j]))
                    out[i].append(tok[i])
                    pos[i] += 1
        return out

    def in_flight(self, n: int, parts: int = 2) -> list[list[int]]:
        """n greedy tokens of every sequence, `parts` micro-batches in flight."""
        h = self.batch // parts
        groups = [list(range(k * h, (k + 1) * h)) for k in range(parts)]
        tok, pos = list(self.first), list(self.start)
        out = [[] for _ in range(self.batch)]
        socks = [r.client._sock for r in self.remotes]
        poller = zmq.Poller()
        for s in socks:
            poller.register(s, zmq.POLLIN)
        pending: dict[tuple[int, int], tuple[int, Step, np.ndarray]] = {}
        done = [0] * parts

        def step_of(g: int) -> Step:
            gi = groups[g]
            return Step(tuple(gi), tuple(pos[i] for i in gi), (1,) * len(gi))

        def send(stage: int, g: int, step: Step, x: np.ndarray) -> None:
            r = self.remotes[stage]
            x = x.astype(r._dt, copy=False)
            rid = r.client._new_id()
            header = encode_header(forward_header(rid, r._layers, step, x))
            socks[stage].send_multipart([header, payload(x)], copy=False)
            pending[stage, rid] = (g, step, x)  # x stays alive until it is sent

        def enter(g: int) -> None:
            step = step_of(g)
            ids = np.array([[tok[i]] for i in groups[g]], np.int32)
            send(0, g, step, self.embed.forward(ids, step))

        for g in range(parts):
            enter(g)
        while pending:
            for sock, _ in poller.poll(30_000):
                stage = socks.index(sock)
                frames = sock.recv_multipart(copy=False)
                reply = decode_header(frames[0])
                g, step, _x = pending.pop((stage, reply["id"]))
                assert reply["op"] == "forward", reply
                self._note("in-flight", reply, step.batch)
                want = (step.batch, 1, self.embed.config.hidden_size)
                y = array_from_frame(frames[1], reply["dtype"], reply["shape"], want)
                if stage == 0:
                    send(1, g, step, y)
                    continue
                logits = self.head.forward(y, step)
                for j, i in enumerate(groups[g]):
                    tok[i] = int(np.argmax(logits[j]))
                    out[i].append(tok[i])
                    pos[i] += 1
                done[g] += 1
                if done[g] < n:
                    enter(g)
        return out


def ratio(
    tok_s: dict[str, list[float]],
    other: dict[str, list[float]],
    x: str,
    y: str,
    quiet: float,
) -> float:
    """The median of y / x over the rounds in which both samples were quiet (all
    rounds if none was): the two ran seconds apart in each round."""
    pairs = list(zip(tok_s[x], tok_s[y], other[x], other[y], strict=True))
    calm = [(a, b) for a, b, oa, ob in pairs if max(oa, ob) <= quiet]
    return statistics.median(b / a for a, b in calm or [p[:2] for p in pairs])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--configs", default="shared,pinned")
    ap.add_argument(
        "--quiet-cores", type=float, default=0.25,
        help="a sample is noisy when other processes used more cores than this",
    )  # fmt: skip
    ap.add_argument("--wait-quiet-s", type=float, default=10.0)
    ap.add_argument("--json-out", type=Path)
    a = ap.parse_args()
    path = a.model or default_model_path()
    ways = ["one-step", "split", "in-flight"]
    configs = a.configs.split(",")
    source = source_state()  # what the workers and this process load
    runs = [(c, w) for c in configs for w in ways]
    procs, models, decode = [], [], {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for c in configs:
                ws, topo = start_workers(path, a.batch, Path(tmp), c == "pinned")
                procs += ws
                models.append(
                    cake.load(
                        path,
                        backend="jax",
                        topology=topo,
                        max_context=CONTEXT,
                        max_sequences=a.batch,
                    )  # fmt: skip
                )
                decode[c] = Decode(models[-1], a.batch)

        def run(c: str, way: str, n: int) -> list[list[int]]:
            d = decode[c]
            return d.in_flight(n) if way == "in-flight" else d.steps(way, n)

        for c, way in runs:  # warm up: batch a.batch and a.batch // 2 compile
            run(c, way, 4)
        for d in decode.values():
            d.compute.clear()
        ours = [os.getpid()] + [p.pid for p in procs]
        tok_s: dict[str, list[float]] = {f"{c} {w}": [] for c, w in runs}
        other: dict[str, list[float]] = {k: [] for k in tok_s}
        tokens: dict[str, list[list[int]]] = {}
        # (quiet, [(batch, worker compute s)]) of each sample
        sample_calls: dict[str, list[tuple[bool, list]]] = {k: [] for k in tok_s}
        for r in range(a.rounds):  # interleaved, the order turned each round
            k = r % len(runs)
            for c, way in runs[k:] + runs[:k]:
                wait_quiet(a.wait_quiet_s, a.quiet_cores)
                calls = decode[c].compute.setdefault(way, [])
                seen = len(calls)
                meter, t = LoadMeter(ours), time.perf_counter()
                tokens[f"{c} {way}"] = run(c, way, a.steps)
                dt = time.perf_counter() - t
                tok_s[f"{c} {way}"].append(a.batch * a.steps / dt)
                other[f"{c} {way}"].append(meter.stop())
                quiet = other[f"{c} {way}"][-1] <= a.quiet_cores
                sample_calls[f"{c} {way}"].append((quiet, calls[seen:]))
    finally:
        for m in models:
            m.close()
        for p in procs:
            p.terminate()
            p.wait(30)
    first = next(iter(tokens.values()))
    same = all(t == first for t in tokens.values())
    med = {  # over the quiet samples (all if none was)
        k: statistics.median(
            [x for x, o in zip(v, other[k], strict=True) if o <= a.quiet_cores] or v
        )
        for k, v in tok_s.items()
    }
    compute_ms = {}  # median worker compute per call, over the quiet samples
    for k, v in sample_calls.items():
        calls = [x for q, c in v if q for x in c] or [x for _, c in v for x in c]
        compute_ms[k] = {
            str(b): statistics.median(s for bb, s in calls if bb == b) * 1e3
            for b in sorted({bb for bb, _ in calls})
        }
    anchor = f"{configs[0]} one-step"

    def vs(x: str, y: str) -> float:
        return ratio(tok_s, other, x, y, a.quiet_cores)

    row = {
        "model": path.name,
        "batch": a.batch,
        "steps": a.steps,
        "rounds": a.rounds,
        "anchor": anchor,
        "tok_s": med,
        "tok_s_rounds": tok_s,
        "other_cores_rounds": other,
        "noisy_samples": sum(x > a.quiet_cores for v in other.values() for x in v),
        "vs_anchor": {k: vs(anchor, k) for k in tok_s},
        "vs_one_step": {f"{c} {w}": vs(f"{c} one-step", f"{c} {w}") for c, w in runs},
        "same_tokens": same,
        "worker_compute_ms_by_batch": compute_ms,
        "cpus": os.cpu_count(),
        "source": source,
    }
    print(
        f"| workers | way | aggregate tok/s | vs {anchor} | vs the same workers' "
        "one-step | worker compute ms per call |"
    )
    print("|---|---|---:|---:|---:|---|")
    for c, w in runs:
        k = f"{c} {w}"
        calls = ", ".join(f"B={b}: {ms:.2f}" for b, ms in compute_ms[k].items())
        print(
            f"| {c} | {w} | {med[k]:.1f} | {row['vs_anchor'][k]:.2f}x "
            f"| {row['vs_one_step'][k]:.2f}x | {calls} |"
        )
    print(f"same tokens every way: {same}; noisy samples: {row['noisy_samples']}")
    if a.json_out:
        a.json_out.write_text(json.dumps(row, indent=1) + "\n")
    if not same:
        sys.exit("the ways gave different tokens")


if __name__ == "__main__":
    main()
