"""`cake serve` under load: aggregate decode speed of 8 streams against one, and
the time to first token of a short request while a long prompt is prefilled,
in one process and through 2 workers.

    .venv/bin/python benchmarks/bench_serve.py [--model FILE.gguf] [--streams 8]
        [--tokens 128] [--long 2000] [--rounds 3] [--setups one,two]
        [--json-out FILE]

Starts, on loopback, `cake serve` alone (jax backend, --parallel = streams)
and `cake serve --topology` over 2 `cake worker` processes holding every layer
(jax, half the layers each; the master keeps the embedding, the head and
sampling), and talks to both with the real `openai` client, their rounds
interleaved. Anchors, in the same run and the same setup: the single stream's
tokens/s (target: 8 streams >= 4x it, issue 8) and the short request's idle
time to first token (target: under the long prefill <= 2x it). Each request is
a raw completion of --tokens tokens with EOS ignored by the count: the rate is
completion tokens / wall seconds. Each sample waits (--wait-quiet-s, bounded)
for a quiet CPU and records the cores other processes used meanwhile; a ratio
is the median of each round's ratio over the rounds in which both of its
samples were quiet (all rounds if none was), and its figures the medians over
the same rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from harness import LoadMeter, wait_quiet
from procs import free_port, source_state, start

from cake.api import default_model_path
from cake.weights.checkpoint import open_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CONTEXT = 4096
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
SETUPS = {"one": "one process", "two": "2 workers"}


def serve(model: Path, streams: int, *extra: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    args = [str(ROOT / ".venv/bin/cake"), "serve", "--backend", "jax"]
    args += ["--port", str(port), "--parallel", str(streams)]
    args += ["--context", str(CONTEXT), "--model", str(model), *extra]
    p = start(args, "cake: serving")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return p, port
        except OSError:
            time.sleep(0.2)
    p.kill()
    raise SystemExit("cake serve did not answer /health within 60 s")


def workers(model: Path, streams: int, tmp: Path) -> tuple[list, Path]:
    """2 `cake worker` processes holding half the layers each, and their topology."""
    n = open_checkpoint(model)[0].num_hidden_layers
    procs, lines = [], []
    for i, (a, b) in enumerate([(0, n // 2), (n // 2, n)]):
        port = free_port()
        cmd = [str(ROOT / ".venv/bin/cake"), "worker", "--model", str(model)]
        cmd += ["--layers", f"{a}-{b - 1}", "--backend", "jax", "--context"]
        cmd += [str(CONTEXT), "--max-sequences", str(streams)]
        procs.append(start([*cmd, "--bind", f"tcp://127.0.0.1:{port}"], "ready on"))
        lines.append(f"w{i}:\n  host: '127.0.0.1:{port}'\n")
        lines.append(f"  layers: ['model.layers.{a}-{b - 1}']\n")
    topo = tmp / "topology.yaml"
    topo.write_text("".join(lines))
    return procs, topo


class Client:
    """One server, spoken to by the openai client: the measurements of a round."""

    def __init__(self, port: int, a: argparse.Namespace) -> None:
        import openai

        self.a = a
        self.c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-")
        self.name = self.c.models.list().data[0].id

    def complete(self, prompt: str, n: int) -> int:
        r = self.c.completions.create(
            model=self.name, prompt=prompt, max_tokens=n, temperature=0.8, seed=1
        )
        return r.usage.completion_tokens

    def ttft(self, prompt: str) -> float:
        t = time.perf_counter()
        s = self.c.completions.create(
            model=self.name, prompt=prompt, max_tokens=4, stream=True, temperature=0
        )
        for ch in s:
            if ch.choices and ch.choices[0].text:
                dt = time.perf_counter() - t
                s.close()
                return dt
        return time.perf_counter() - t

    def together(self, b: int, n: int) -> list[int]:
        """b requests at once, n tokens each; their completion tokens."""
        got = [0] * b

        def one(i: int) -> None:
            got[i] = self.complete(PROMPTS[i % len(PROMPTS)], n)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return got

    def warm_up(self) -> None:
        """Every batch size and chunk width once (compiles, issue 11)."""
        for b in range(1, self.a.streams + 1):
            self.together(b, 4)
        self.ttft("Hi"), self.ttft("The capital of France is")
        self.complete("word " * self.a.long, 1)

    def round(self, ours: list[int], quiet: tuple[float, float]) -> dict:
        """The four figures, and the cores other processes used while each ran."""
        a, got = self.a, {}

        def sample(key: str, fn) -> None:
            wait_quiet(*quiet)
            meter = LoadMeter(ours)
            got[key] = fn()
            got[key + "_other_cores"] = meter.stop()

        def one() -> float:
            t = time.perf_counter()
            n = self.complete(PROMPTS[0], a.tokens)
            return n / (time.perf_counter() - t)

        def many() -> float:
            t = time.perf_counter()
            n = sum(self.together(a.streams, a.tokens))
            return n / (time.perf_counter() - t)

        def busy() -> float:
            long = threading.Thread(target=self.complete, args=("word " * a.long, 1))
            long.start()
            time.sleep(0.05)  # the long prompt is being prefilled
            dt = self.ttft("The capital of France is")
            long.join()
            return dt

        sample("one", one)
        sample("many", many)
        sample("idle", lambda: self.ttft("The capital of France is"))
        sample("busy", busy)
        return got


def row(setup: str, name: str, a: argparse.Namespace, rounds: list[dict]) -> dict:
    def pair(x: str, y: str) -> tuple[float, float, float, int]:
        """Medians of x, y and y / x over the rounds where both samples were quiet
        (all rounds if none was), and how many rounds that was."""
        quiet = [
            r for r in rounds
            if max(r[x + "_other_cores"], r[y + "_other_cores"]) <= a.quiet_cores
        ]  # fmt: skip
        use = quiet or rounds
        med = statistics.median
        return (
            med(r[x] for r in use),
            med(r[y] for r in use),
            med(r[y] / r[x] for r in use),
            len(quiet),
        )

    one, many, speedup, quiet_decode = pair("one", "many")
    idle, busy, slowdown, quiet_ttft = pair("idle", "busy")
    return {
        "setup": SETUPS[setup],
        "model": name,
        "streams": a.streams,
        "tokens": a.tokens,
        "one_stream_tok_s": one,
        "aggregate_tok_s": many,
        "ttft_idle_s": idle,
        "ttft_under_prefill_s": busy,
        "long_prompt_tokens": a.long,
        "threads": os.cpu_count(),
        "aggregate_vs_one": speedup,  # the median of each round's ratio
        "ttft_ratio": slowdown,
        "quiet_rounds": {"decode": quiet_decode, "ttft": quiet_ttft},
        "rounds": rounds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--long", type=int, default=2000, help="tokens of the long prompt")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--setups", default="one,two", help="one: one process; two: 2 workers"
    )
    ap.add_argument(
        "--quiet-cores", type=float, default=0.25,
        help="a sample is noisy when other processes used more cores than this",
    )  # fmt: skip
    ap.add_argument("--wait-quiet-s", type=float, default=10.0)
    ap.add_argument("--json-out", type=Path)
    a = ap.parse_args()
    model = a.model or default_model_path()
    setups = a.setups.split(",")
    source = source_state()  # what the servers and workers load
    procs: list[subprocess.Popen] = []
    clients: dict[str, Client] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for s in setups:
                extra: tuple[str, ...] = ()
                if s == "two":
                    ws, topo = workers(model, a.streams, Path(tmp))
                    procs += ws
                    extra = ("--topology", str(topo))
                server, port = serve(model, a.streams, *extra)
                procs.append(server)
                clients[s] = Client(port, a)
            for c in clients.values():
                c.warm_up()
            ours = [os.getpid()] + [p.pid for p in procs]
            quiet = (a.wait_quiet_s, a.quiet_cores)
            samples: dict[str, list[dict]] = {s: [] for s in setups}
            for i in range(a.rounds):  # interleaved, the order turned each round
                for s in setups if i % 2 == 0 else setups[::-1]:
                    samples[s].append(clients[s].round(ours, quiet))
        rows = [row(s, clients[s].name, a, samples[s]) for s in setups]
        for r in rows:
            r["source"] = source
    finally:
        for p in procs[::-1]:
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    print(
        f"| setup | model | one stream tok/s | {a.streams} streams tok/s | ratio | "
        "TTFT idle s | TTFT under a long prefill s | ratio |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['setup']} | {r['model']} | {r['one_stream_tok_s']:.1f} "
            f"| {r['aggregate_tok_s']:.1f} | {r['aggregate_vs_one']:.2f}x "
            f"| {r['ttft_idle_s']:.3f} | {r['ttft_under_prefill_s']:.3f} "
            f"| {r['ttft_ratio']:.2f}x |"
        )
    for r in rows:
        q = r["quiet_rounds"]
        print(
            f"{r['setup']}: rounds quiet for both samples (other processes under "
            f"{a.quiet_cores} cores): decode {q['decode']}, TTFT {q['ttft']} of "
            f"{a.rounds} (medians over those, else over all)"
        )
    if a.json_out:
        a.json_out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
