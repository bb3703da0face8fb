"""The cost of the pipeline on loopback: SmolLM2 decode, 2 workers vs one process.

    .venv/bin/python benchmarks/bench_pipeline.py [--backend numpy] [--tokens 48]
        [--rounds 3] [--split 3|2] [--json FILE]

Everything is measured in one run, on one machine, on the same backend:
  * decode tokens/s of the single-process model and of master + 2 workers
    (`--split 3`: the layers in thirds, master/worker/worker; `--split 2`: the
    workers hold every layer), rounds interleaved; target ratio >= 0.95;
  * the cost of one hop per token: each decode request's round trip as the
    master sees it minus the compute time the worker reports (`compute_us`);
  * a bare ZeroMQ DEALER/ROUTER round trip of the same frames (the same header
    and activation sizes) to an echo process, measured between the rounds in
    three ways: back to back; after idling as long as a stage computes (as a
    worker idles between its hops); and answered after as much busy time as a
    worker's compute, which is subtracted (as the master waits for a worker).
    Target: the hop within 2x of it.
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
from procs import ECHO_SERVER, free_port, start

import cake
from cake.api import default_model_path
from cake.backends.base import Step, auto_backend
from cake.kv import DTYPES
from cake.net.protocol import encode_header, forward_header
from cake.net.remote import RemoteStage
from cake.weights.checkpoint import open_checkpoint

PROMPT = [{"role": "user", "content": "Tell me a long story about a cake."}]


def start_worker(model: Path, a: int, b: int, port: int, backend: str):
    cmd = [sys.executable, "-c", "from cake.cli import main; main()", "worker"]
    cmd += ["--model", str(model), "--layers", f"{a}-{b - 1}", "--backend", backend]
    cmd += ["--bind", f"tcp://127.0.0.1:{port}", "--context", "1024"]
    return start(cmd, "ready on")


def decode_round(model, tokens: int) -> tuple[float, list[str]]:
    pieces = list(model.chat(PROMPT, max_tokens=tokens, temperature=0))
    return model.stats.decode_tokens_per_s, pieces


def instrument(model) -> list[tuple[int, float, float]]:
    """Record (stage index, round-trip s, worker compute s) of every single-token
    forward to a worker."""
    samples: list[tuple[int, float, float]] = []
    for i, stage in enumerate(model.pipeline.stages):
        if not isinstance(stage, RemoteStage):
            continue
        client = stage.client
        if getattr(client, "_bench", False):
            continue
        request = client.request

        def timed(header, data=None, _request=request, _i=i, **kw):
            t0 = time.perf_counter()
            reply, frame = _request(header, data, **kw)
            dt = time.perf_counter() - t0
            if header.get("op") == "forward" and header["shape"][1] == 1:
                samples.append((_i, dt, reply.get("compute_us", 0) / 1e6))
            return reply, frame

        client.request, client._bench = timed, True
    return samples


def time_local(model) -> dict[int, list[float]]:
    """Record the seconds of every single-token forward of each in-process stage."""
    samples: dict[int, list[float]] = {}
    for i, stage in enumerate(model.pipeline.stages):
        if isinstance(stage, RemoteStage):
            continue

        def timed(x, step, _forward=stage.forward, _i=i):
            t0 = time.perf_counter()
            out = _forward(x, step)
            if step.max_len == 1:
                samples.setdefault(_i, []).append(time.perf_counter() - t0)
            return out

        stage.forward = timed
    return samples


class BareEcho:
    """A ROUTER echo process and a DEALER: ZeroMQ round trips with nothing else.

    `delay`: the echo holds each message that long, busy, before sending it back
    (a worker's compute); the recorded round trips have it subtracted.
    """

    def __init__(self, header: bytes, nbytes: int, delay: float = 0.0) -> None:
        port = free_port()
        cmd = [sys.executable, "-c", ECHO_SERVER, f"tcp://127.0.0.1:{port}"]
        self.proc = start([*cmd, str(delay)], "ready")
        self.delay = delay
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(f"tcp://127.0.0.1:{port}")
        self.frames = [header, np.zeros(nbytes, np.uint8)]
        self.hot: list[float] = []  # back-to-back round trips
        self.idle: list[float] = []  # each after `gap` s of idling, as in a pipeline
        self.measure(300, 0.0, [])  # warm up

    def measure(self, n: int, gap: float, out: list[float] | None = None) -> None:
        out = (self.idle if gap else self.hot) if out is None else out
        for _ in range(n):
            if gap:
                time.sleep(gap)
            t0 = time.perf_counter()
            self.sock.send_multipart(self.frames, copy=False)
            self.sock.recv_multipart(copy=False)
            out.append((time.perf_counter() - t0 - self.delay) * 1e6)

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()
        self.proc.kill()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--backend", default="auto")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--split", type=int, choices=(2, 3), default=3)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    backend = auto_backend() if a.backend == "auto" else a.backend
    model_path = a.model or default_model_path()
    config, _ = open_checkpoint(model_path)
    n = config.num_hidden_layers
    if a.split == 3:
        cuts = [(n // 3, 2 * n // 3), (2 * n // 3, n)]
    else:
        cuts = [(0, n // 2), (n // 2, n)]
    ports = [free_port(), free_port()]
    workers = [
        start_worker(model_path, x, y, pt, backend)
        for (x, y), pt in zip(cuts, ports, strict=True)
    ]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            topo = Path(tmp) / "topology.yaml"
            topo.write_text(
                "".join(
                    f"w{i}:\n  host: '127.0.0.1:{pt}'\n"
                    f"  layers: ['model.layers.{x}-{y - 1}']\n"
                    for i, ((x, y), pt) in enumerate(zip(cuts, ports, strict=True))
                )
            )
            single = cake.load(model_path, backend=backend, max_context=1024)
            piped = cake.load(
                model_path, backend=backend, topology=topo, max_context=1024
            )
        samples = instrument(piped)
        local = {"single": time_local(single), "pipeline": time_local(piped)}
        for m in (single, piped):
            decode_round(m, 8)  # warm up (compilation, caches)
        compute = statistics.median(c for _, _, c in samples)
        samples.clear()
        for v in local.values():
            v.clear()
        x = np.zeros((1, 1, config.hidden_size), DTYPES[piped.info.dtype])
        header = encode_header(forward_header(1, cuts[0], Step((0,), (100,), (1,)), x))
        bare = BareEcho(header, x.nbytes)  # the same frames as a decode request
        # ... and answered as late as a worker answers, after as much busy time
        late = BareEcho(header, x.nbytes, delay=compute)
        tps: dict[str, list[float]] = {"single": [], "pipeline": []}
        same = True
        for r in range(a.rounds):
            order = [("single", single), ("pipeline", piped)]
            out = {}
            for name, m in order if r % 2 == 0 else order[::-1]:
                t, out[name] = decode_round(m, a.tokens)
                tps[name].append(t)
            same &= out["single"] == out["pipeline"]
            # A hop follows a stage's compute: the echo idles as long in between.
            gap = min(0.05, 1 / tps["single"][-1] / (len(cuts) + 1))
            bare.measure(1000, 0.0)
            bare.measure(100, gap)
            late.measure(int(1 / compute) + 1, 0.0)  # about a second
        bare.close()
        late.close()
        single.close()
        piped.close()
    finally:
        for w in workers:
            w.terminate()
            w.wait(30)
    hop = [(rt - c) * 1e6 for _, rt, c in samples]
    ms = {  # per token, medians of each stage's share
        k: sum(statistics.median(t) * 1e3 for t in v.values()) for k, v in local.items()
    }
    workers_ms = sum(
        statistics.median(c for j, _, c in samples if j == i) * 1e3
        for i in {j for j, _, _ in samples}
    )
    med = {k: statistics.median(v) for k, v in tps.items()}
    hops = len(cuts)
    r = {
        "backend": backend,
        "dtype": piped.info.dtype,
        "workers": [list(c) for c in cuts],
        "tokens": a.tokens,
        "rounds": a.rounds,
        "decode_tok_s": med,
        "ratio": med["pipeline"] / med["single"],
        "same_tokens": same,
        "hops_per_token": hops,
        "extra_us_per_hop": (1 / med["pipeline"] - 1 / med["single"]) * 1e6 / hops,
        "hop_us": {"median": statistics.median(hop), "mean": statistics.fmean(hop)},
        "bare_us": {
            "hot_median": statistics.median(bare.hot),
            "idle_median": statistics.median(bare.idle),
            "idle_gap_ms": round(gap * 1e3, 2),
            "late_median": statistics.median(late.hot),
            "late_after_ms": round(compute * 1e3, 2),
        },
        "per_token_ms": {
            "single_step": ms["single"],
            "master_stages": ms["pipeline"],
            "worker_compute": workers_ms,
        },
        "activation_bytes": int(x.nbytes),
        "header_bytes": len(header),
        "cpus": os.cpu_count(),
    }
    r["hop_vs_bare_hot"] = r["hop_us"]["median"] / r["bare_us"]["hot_median"]
    r["hop_vs_bare_idle"] = r["hop_us"]["median"] / r["bare_us"]["idle_median"]
    r["hop_vs_bare_late"] = r["hop_us"]["median"] / r["bare_us"]["late_median"]
    print(json.dumps(r, indent=1))
    print(
        f"\ndecode {backend}: single {med['single']:.1f} tok/s, 2 workers "
        f"{med['pipeline']:.1f} tok/s ({r['ratio']:.3f}x, target >= 0.95), "
        f"same tokens: {same}\n"
        f"hop (round trip - worker compute): {r['hop_us']['median']:.0f} us; bare "
        f"ZeroMQ round trip {r['bare_us']['hot_median']:.0f} us back-to-back "
        f"({r['hop_vs_bare_hot']:.2f}x), {r['bare_us']['idle_median']:.0f} us after "
        f"idling like a stage ({r['hop_vs_bare_idle']:.2f}x), "
        f"{r['bare_us']['late_median']:.0f} us when answered after "
        f"{r['bare_us']['late_after_ms']:.1f} ms of busy time like a worker "
        f"({r['hop_vs_bare_late']:.2f}x); target <= 2x\n"
        f"per token: single process {ms['single']:.2f} ms; pipeline: master's "
        f"stages {ms['pipeline']:.2f} ms + workers' compute {workers_ms:.2f} ms + "
        f"{hops} hops"
    )
    if a.json:
        a.json.write_text(json.dumps(r, indent=1) + "\n")


if __name__ == "__main__":
    main()
