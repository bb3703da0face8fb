"""`cake serve` under load: aggregate decode speed of 8 streams against one, and
the time to first token of a short request while a long prompt is prefilled.

    .venv/bin/python benchmarks/bench_serve.py [--model FILE.gguf] [--streams 8]
        [--tokens 128] [--long 2000] [--json-out FILE]

Starts `cake serve` (jax backend, --parallel = streams) on loopback and talks
to it with the real `openai` client. Anchors, in the same run: the single
stream's tokens/s (target: 8 streams >= 4x it, issue 8) and the short
request's idle time to first token (target: under the long prefill <= 2x it).
Each request is a raw completion of --tokens tokens with EOS ignored by the
count: the rate is completion tokens / wall seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str | None, streams: int, port: int) -> subprocess.Popen:
    args = [str(ROOT / ".venv/bin/cake"), "serve", "--backend", "jax"]
    args += ["--port", str(port), "--parallel", str(streams), "--context", "4096"]
    if model:
        args += ["--model", model]
    p = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 300:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return p
        except OSError:
            if p.poll() is not None:
                err = p.stderr.read()[-2000:]
                raise SystemExit(f"cake serve exited: {err}") from None
            time.sleep(0.2)
    p.kill()
    raise SystemExit("cake serve did not answer within 300 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--long", type=int, default=2000, help="tokens of the long prompt")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json-out", type=Path)
    a = ap.parse_args()
    import openai

    port = free_port()
    server = start(a.model, a.streams, port)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-")
        name = c.models.list().data[0].id

        def complete(prompt: str, n: int) -> int:
            r = c.completions.create(
                model=name, prompt=prompt, max_tokens=n, temperature=0.8, seed=1
            )
            return r.usage.completion_tokens

        def ttft(prompt: str) -> float:
            t = time.perf_counter()
            s = c.completions.create(
                model=name, prompt=prompt, max_tokens=4, stream=True, temperature=0
            )
            for ch in s:
                if ch.choices and ch.choices[0].text:
                    dt = time.perf_counter() - t
                    s.close()
                    return dt
            return time.perf_counter() - t

        # warm up every batch size and chunk width once (compiles, issue 11)
        for b in range(1, a.streams + 1):
            threads = [
                threading.Thread(target=complete, args=(PROMPTS[i], 4))
                for i in range(b)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        ttft("Hi"), complete("word " * a.long, 1)

        one, many, idle, busy = [], [], [], []
        for _ in range(a.rounds):
            t = time.perf_counter()
            n = complete(PROMPTS[0], a.tokens)
            one.append(n / (time.perf_counter() - t))
            got = [0] * a.streams

            def stream(i: int, got: list[int] = got) -> None:
                got[i] = complete(PROMPTS[i % len(PROMPTS)], a.tokens)

            threads = [
                threading.Thread(target=stream, args=(i,)) for i in range(a.streams)
            ]
            t = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            many.append(sum(got) / (time.perf_counter() - t))
            idle.append(ttft("The capital of France is"))
            long = threading.Thread(target=complete, args=("word " * a.long, 1))
            long.start()
            time.sleep(0.05)  # the long prompt is being prefilled
            busy.append(ttft("The capital of France is"))
            long.join()
        row = {
            "model": name,
            "streams": a.streams,
            "tokens": a.tokens,
            "one_stream_tok_s": statistics.median(one),
            "aggregate_tok_s": statistics.median(many),
            "ttft_idle_s": statistics.median(idle),
            "ttft_under_prefill_s": statistics.median(busy),
            "long_prompt_tokens": a.long,
            "threads": os.cpu_count(),
        }
        row["aggregate_vs_one"] = row["aggregate_tok_s"] / row["one_stream_tok_s"]
        row["ttft_ratio"] = row["ttft_under_prefill_s"] / row["ttft_idle_s"]
        print(
            f"| model | one stream tok/s | {a.streams} streams tok/s | ratio | "
            "TTFT idle s | TTFT under a long prefill s | ratio |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        print(
            f"| {name} | {row['one_stream_tok_s']:.1f} | {row['aggregate_tok_s']:.1f} "
            f"| {row['aggregate_vs_one']:.2f}x | {row['ttft_idle_s']:.3f} "
            f"| {row['ttft_under_prefill_s']:.3f} | {row['ttft_ratio']:.2f}x |"
        )
        if a.json_out:
            a.json_out.write_text(json.dumps(row, indent=1) + "\n")
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
