"""The cost of one master->worker->master hop, without a real model.

    .venv/bin/python benchmarks/bench_hop.py [--hops 2000] [--rounds 3] [--json FILE]

A real `cake worker` process serves one layer of a tiny random checkpoint shaped
like SmolLM2 (hidden 576, 9 heads, 3 KV heads, intermediate 64) on the NumPy
backend. In one run, rounds interleaved, it measures:
  (a) RemoteStage.forward round trips of a (1, 1, 576) float32 decode step;
  (b) the compute time the worker reports for each (`compute_us`);
  (c) a bare pyzmq DEALER/ROUTER round trip of the same frames (the same header
      and activation bytes) to an echo process, back to back;
  (d) `echo` requests through the worker (WorkerClient.request): the protocol's
      cost on both sides without a stage's compute;
  (e) bare round trips after idling as long as the worker computes (what a
      blocked reader's wake-up costs).
and prints the per-hop overhead (a) - (b) against (c); target: within 2x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq
from procs import ECHO_SERVER, free_port, start

from cake.backends.base import Step
from cake.net.protocol import (
    ECHO,
    PROTOCOL_VERSION,
    encode_header,
    forward_header,
    payload,
)
from cake.net.remote import RemoteStage, WorkerClient
from cake.shard import Shard

ROOT = Path(__file__).resolve().parent.parent
HIDDEN = 576
SMOL = dict(
    hidden_size=HIDDEN,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=64,
    num_hidden_layers=2,
)


def cake_hops(stage: RemoteStage, n: int, out: list[tuple[float, float]]) -> None:
    """n decode steps of one sequence: (round trip us, worker compute us) each."""
    x = np.zeros((1, 1, HIDDEN), np.float32)
    client = stage.client
    request = client.request
    last: list[dict] = []

    def timed(header, data=None, **kw):
        reply, frame = request(header, data, **kw)
        last.append(reply)
        return reply, frame

    client.request = timed
    try:
        for pos in range(n):
            t0 = time.perf_counter()
            stage.forward(x, Step((0,), (pos,), (1,)))
            dt = (time.perf_counter() - t0) * 1e6
            out.append((dt, float(last.pop()["compute_us"])))
    finally:
        del client.request
    stage.release([0])


def echo_hops(client: WorkerClient, data: np.ndarray, n: int, out: list) -> None:
    """n `echo` round trips through the worker: the protocol without compute."""
    header = {"op": ECHO, "v": PROTOCOL_VERSION}
    for _ in range(n):
        t0 = time.perf_counter()
        client.request(header, data)
        out.append((time.perf_counter() - t0) * 1e6)


def bare_hops(
    sock: zmq.Socket, frames: list, n: int, out: list[float], gap: float = 0.0
) -> None:
    """n bare round trips, each after `gap` s of idling (as a worker computes)."""
    for _ in range(n):
        if gap:
            time.sleep(gap)
        t0 = time.perf_counter()
        sock.send_multipart(frames, copy=False)
        sock.recv_multipart(copy=False)
        out.append((time.perf_counter() - t0) * 1e6)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hops", type=int, default=2000, help="per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tests.models import make_checkpoint

    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = make_checkpoint("llama", Path(tmp) / "smol", **SMOL)
        wport, eport = free_port(), free_port()
        cmd = [sys.executable, "-c", "from cake.cli import main; main()", "worker"]
        cmd += ["--model", str(model), "--layers", "0-0", "--backend", "numpy"]
        cmd += ["--bind", f"tcp://127.0.0.1:{wport}"]
        cmd += ["--context", str(a.hops + 8)]
        try:
            procs.append(start(cmd, "ready on"))
            procs.append(
                start(
                    [sys.executable, "-c", ECHO_SERVER, f"tcp://127.0.0.1:{eport}"],
                    "ready",
                )
            )
            client = WorkerClient("w0", f"tcp://127.0.0.1:{wport}", None)
            client.connect()
            stage = RemoteStage(client, Shard(0, 1, 2))
            ctx = zmq.Context()
            bare = ctx.socket(zmq.DEALER)
            bare.linger = 0
            bare.connect(f"tcp://127.0.0.1:{eport}")
            x = np.zeros((1, 1, HIDDEN), np.float32)
            head = encode_header(forward_header(1, (0, 1), Step((0,), (100,), (1,)), x))
            frames = [head, np.zeros(x.nbytes, np.uint8)]
            cake_hops(stage, 200, [])  # warm up
            bare_hops(bare, frames, 200, [])
            hops: list[tuple[float, float]] = []
            echo: list[float] = []
            proto: list[float] = []
            idle: list[float] = []
            for _ in range(a.rounds):
                cake_hops(stage, a.hops, hops)
                echo_hops(client, payload(x), a.hops, proto)
                bare_hops(bare, frames, a.hops, echo)
                gap = statistics.median(h[1] for h in hops) / 1e6
                bare_hops(bare, frames, a.hops // 4, idle, gap)
            stage.close()
            bare.close()
            ctx.term()
        finally:
            for q in procs:
                q.kill()
                q.wait(10)
    rt = [h[0] for h in hops]
    comp = [h[1] for h in hops]
    over = [h[0] - h[1] for h in hops]
    r = {
        "round_trip_us": statistics.median(rt),
        "compute_us": statistics.median(comp),
        "overhead_us": statistics.median(over),
        "overhead_p90_us": statistics.quantiles(over, n=10)[-1],
        "cake_echo_us": statistics.median(proto),
        "bare_us": statistics.median(echo),
        "bare_p90_us": statistics.quantiles(echo, n=10)[-1],
        "bare_idle_us": statistics.median(idle),
        "header_bytes": len(head),
        "activation_bytes": int(x.nbytes),
        "hops": len(hops),
        "cpus": os.cpu_count(),
    }
    r["overhead_vs_bare"] = r["overhead_us"] / r["bare_us"]
    print(json.dumps(r, indent=1))
    print(
        f"\nhop: round trip {r['round_trip_us']:.0f} us - worker compute "
        f"{r['compute_us']:.0f} us = overhead {r['overhead_us']:.0f} us; `echo` "
        f"through the worker {r['cake_echo_us']:.0f} us; bare ZeroMQ "
        f"{r['bare_us']:.0f} us back to back ({r['overhead_vs_bare']:.2f}x, target "
        f"<= 2x), {r['bare_idle_us']:.0f} us after idling as long as the compute"
    )
    if a.json:
        a.json.write_text(json.dumps(r, indent=1) + "\n")


if __name__ == "__main__":
    main()
