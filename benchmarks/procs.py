"""Child processes for the network benchmarks: free ports, waiting for readiness,
and a bare ZeroMQ echo server to compare cake's hops with."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A bare ROUTER that sends every message back: `python -c ECHO_SERVER tcp://... [S]`.
# With S, it first keeps a core busy for S seconds, as a worker computing does
# (a busy loop, not a sleep: exact, and the core stays awake as in a compute).
ECHO_SERVER = """
import sys, time, zmq
delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
s = zmq.Context().socket(zmq.ROUTER)
s.bind(sys.argv[1])
print("ready", flush=True)
while True:
    f = s.recv_multipart(copy=False)
    t = time.perf_counter()
    while time.perf_counter() - t < delay:
        pass
    s.send_multipart(f, copy=False)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], ready: str, timeout: float = 600) -> subprocess.Popen:
    """A child process, returned once `ready` shows up on its stdout/stderr."""
    p = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
    )
    t0, lines = time.monotonic(), []
    while time.monotonic() - t0 < timeout:
        line = p.stdout.readline()
        if not line and p.poll() is not None:
            break
        lines.append(line)
        if ready in line:  # keep draining so the child never blocks on a full pipe
            threading.Thread(target=p.stdout.read, daemon=True).start()
            return p
    p.kill()
    raise SystemExit(f"{args[:4]} did not start:\n{''.join(lines[-20:])}")


def source_state() -> dict:
    """The commit measured and the tracked files that differ from it: in a shared
    working tree, others' uncommitted edits are measured too."""

    def git(*args: str) -> str:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip()

    changed = git("status", "--porcelain", "--untracked-files=no").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD"), "modified": changed}
