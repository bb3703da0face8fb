"""Weight streaming on loopback against copying the same bytes with bare ZeroMQ.

The bench writes a GGUF of random Q4_0 blocks (1B-shaped layers, --layers of
them), starts a real `cake worker --cache-dir` (no model) and streams it those
layers through `cake.net.stream.stream_weights`, as `cake run` does for such a
worker; then copies the same number of bytes, in chunks of the same size, to a
bare ZeroMQ ROUTER in another process, two ways: pipelined (the DEALER sends
every chunk, the receiver answers once at the end: the ceiling) and one reply
per chunk with as many in flight as cake's stream (its request pattern, with
no checksums, files or manifest), and the same plus writing each chunk to a
file in the workers' folder (what storing them costs on this disk). Without
--curve also over a bare TCP socket: cake's own path then (a worker without
keys takes its chunks over a TCP connection, cake/net/bulk.py), shown beside
the anchor, not as it. The systems alternate, round by round; each figure is
the median of --rounds.

cake's figure is measured twice per round: "cold", the master has never
read the file (it computes the chunks' XXH3 checksums as it sends) and
the worker's cache is empty; "warm digests", the master kept its digests from
an earlier run (what a second worker of the same model costs). Also printed:
the worker's resident memory after the stream (bounded by a window of chunks,
not the layers), and the bytes sent by a second run on the same cache (0).

Each system is measured from each state of --pages (see FRESH_S: in this VM
new page cache costs more when its pages were free for seconds). With
--curve every socket, cake's and the bare copies', uses CurveZMQ (the
worker with --secret-key and --allow-keys: cake's chunks go over ZeroMQ);
without it none does, as a worker without keys on loopback.

    .venv/bin/python benchmarks/bench_stream.py [--layers 8] [--rounds 3]
        [--pages asis,fresh] [--curve] [--worker-dir DIR] [--json-out F]

Target (issue 10): cake >= 0.8x bare ZeroMQ.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from procs import free_port  # noqa: E402

# `python -c BARE tcp://... DIR`: receive TOTAL bytes of chunks (the first
# message says "MODE TOTAL PIECE"); MODE "ack": reply to each chunk, "once":
# reply after the last one, "write": as "ack", each chunk first written to a
# file in DIR in writes of PIECE bytes (the storing a worker's cache does, as
# it does it, cake.weights.cache.WRITE_PIECE, with nothing else).
BARE = """
import os, sys, zmq
s = zmq.Context().socket(zmq.ROUTER)
s.maxmsgsize = -1
if len(sys.argv) > 3:  # CurveZMQ, as a worker with --secret-key
    s.curve_publickey, s.curve_secretkey = sys.argv[3].encode(), sys.argv[4].encode()
    s.curve_server = True
s.bind(sys.argv[1])
print("ready", flush=True)
while True:
    mode, total, got, out = None, None, 0, None
    while True:
        f = s.recv_multipart(copy=False)
        if total is None:
            mode, total, piece = f[1].bytes.decode().split()
            total, piece = int(total), int(piece)
            if mode == "write":
                out = open(os.path.join(sys.argv[2], "bare.bin"), "wb")
            s.send_multipart([f[0], b"go"])
            continue
        if out is not None:
            data = f[1].buffer
            for o in range(0, len(data), piece):
                os.pwrite(out.fileno(), data[o : o + piece], got + o)
        got += len(f[1])
        if mode != "once" or got >= total:
            s.send_multipart([f[0], b"ok"])
        if got >= total:
            break
    if out is not None:
        out.close()
        os.unlink(out.name)
"""


# `python -c BARE_TCP PORT`: a plain TCP receiver, the ceiling of cake's path
# without Curve keys (cake/net/bulk.py): per connection an 8-byte total, then
# that many bytes read into one reused chunk-sized buffer, then "ok".
BARE_TCP = """
import socket, sys
ls = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)
buf = memoryview(bytearray(int(sys.argv[2])))
while True:
    c, _ = ls.accept()
    head = c.recv(8, socket.MSG_WAITALL)
    total, got = int.from_bytes(head, "little"), 0
    while got < total:
        got += c.recv_into(buf[: min(len(buf), total - got)])
    c.sendall(b"ok")
    c.close()
"""


def bare_tcp(chunks: list[memoryview], pages: str = "") -> float:
    """Seconds to copy `chunks` over a plain TCP socket to a fresh receiver."""
    import socket

    port = free_port()
    size = max(len(c) for c in chunks)
    p = start([sys.executable, "-c", BARE_TCP, str(port), str(size)], "ready")
    try:
        s = socket.create_connection(("127.0.0.1", port))
        total = sum(len(c) for c in chunks)
        settle(pages)
        t = time.perf_counter()
        s.sendall(total.to_bytes(8, "little"))
        for c in chunks:
            s.sendall(c)
        assert s.recv(2, socket.MSG_WAITALL) == b"ok"
        dt = time.perf_counter() - t
        s.close()
        return dt
    finally:
        p.kill()
        p.wait()


def rss_of(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def start(args: list[str], ready: str, env: dict | None = None) -> subprocess.Popen:
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         env={**os.environ, **(env or {})}, text=True)  # fmt: skip
    t0 = time.monotonic()
    for line in p.stdout:
        if ready in line:
            return p
        if time.monotonic() - t0 > 300:
            break
    p.kill()
    raise RuntimeError(f"{args[:4]} did not start")


# Fresh memory costs more than reused memory in this VM: its balloon has free
# page reporting (virtio feature bit 5), so pages free for ~2 s go back to the
# host and the next touch of each faults there. Writing 520 MB to a new file
# (4 MiB pwrites, ext4, one process): 3.3-5.5 GB/s right after deleting an as
# large one, 0.13-1.2 GB/s after 2-4 s of sleep; touching and freeing memory
# first did not make it fast reliably (0.13-3.8 GB/s: other CPUs' free lists,
# other tenants). A stream writes its whole size into new page cache, so a
# system measured right after another one deleted its files ("asis", the
# bench's order: the bare copies follow cake's deletions) gets cheaper pages
# than one measured after a worker's start-up. "fresh": FRESH_S of sleep
# before each system's clock starts, so that every one pays the host's faults.
FRESH_S = 4.0  # > the 2 s reporting delay, with the reporting work done


def settle(pages: str) -> None:
    """Bring this VM's free memory to the `pages` state (see FRESH_S)."""
    if pages == "fresh":
        time.sleep(FRESH_S)


def bare(
    chunks: list[memoryview], mode: str, folder: Path, window: int,
    pages: str = "", curve: bool = False,
) -> float:  # fmt: skip
    """Seconds to copy `chunks` to a fresh bare ROUTER process (replies per
    chunk: `window` chunks in flight, as cake's stream); curve: CurveZMQ, as
    cake's worker with keys."""
    import zmq

    from cake.weights.cache import WRITE_PIECE

    port = free_port()
    keys = [] if not curve else [k.decode() for k in zmq.curve_keypair()]
    p = start([sys.executable, "-c", BARE, f"tcp://127.0.0.1:{port}", str(folder),
               *keys], "ready")  # fmt: skip
    try:
        s = zmq.Context.instance().socket(zmq.DEALER)
        if curve:
            s.curve_publickey, s.curve_secretkey = zmq.curve_keypair()
            s.curve_serverkey = keys[0].encode()
        s.connect(f"tcp://127.0.0.1:{port}")
        total = sum(len(c) for c in chunks)
        s.send_multipart([f"{mode} {total} {WRITE_PIECE}".encode()])
        s.recv()
        settle(pages)
        t = time.perf_counter()
        waiting = 0
        for c in chunks:
            s.send(c, copy=False)
            waiting += 1
            if mode != "once" and waiting == window:
                s.recv()
                waiting -= 1
        for _ in range(waiting if mode != "once" else 1):
            s.recv()
        dt = time.perf_counter() - t
        s.close(0)
        return dt
    finally:
        p.kill()
        p.wait()


def cake_stream(
    model: Path, ranges, cache: Path, window: int = 16, pages: str = "",
    curve: Path | None = None,
) -> tuple[float, int, int, int]:  # fmt: skip
    """(seconds, bytes sent, worker RSS after, bytes a second stream sends) for
    a worker on an empty `cache`; curve: a folder with keys (CurveZMQ)."""
    from cake.net import keys as curve_keys
    from cake.net import stream
    from cake.net.handshake import Expect
    from cake.net.protocol import fingerprint
    from cake.net.remote import WorkerClient
    from cake.weights.checkpoint import open_checkpoint

    port = free_port()
    secure = [] if curve is None else [
        "--secret-key", str(curve / "w.key_secret"), "--allow-keys", str(curve / "allow")]  # fmt: skip
    w = start([sys.executable, "-m", "cake", "worker", "--cache-dir", str(cache),
               "--bind", f"tcp://127.0.0.1:{port}", "--backend", "numpy", *secure],
              "ready on", env={"CAKE_NUM_THREADS": "1"})  # fmt: skip
    try:
        config, tensors = open_checkpoint(model)
        e = Expect(fingerprint(config, ranges, tensors), tuple(ranges), "float32",
                   config.model_type, config.num_hidden_layers, config.hidden_size)  # fmt: skip
        kw = {}
        if curve is not None:
            kw = dict(server_key=curve_keys.load_public_key(curve / "w.key"),
                      client_keys=curve_keys.load_secret_key(curve / "m.key_secret"))  # fmt: skip
        c = WorkerClient("w", f"tcp://127.0.0.1:{port}", e, retry_timeout=60, **kw)
        c._open()
        c.info = c._hello(time.monotonic() + 60)
        settle(pages)
        t = time.perf_counter()
        sent = stream.stream_weights(c, config, tensors, ranges, window=window)
        dt = time.perf_counter() - t
        rss = rss_of(w.pid)
        again = stream.stream_weights(c, config, tensors, ranges)
        c.close()
        return dt, sent, rss, again
    finally:
        w.kill()
        w.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--window", type=int, default=16, help="chunks in flight")
    ap.add_argument("--worker-dir", type=Path, help="where the workers' caches go "
                    "(default: a temporary folder; /dev/shm: memory, no disk)")  # fmt: skip
    ap.add_argument("--pages", default="asis,fresh", help="the memory states each "
                    "system is measured from (asis, fresh: see FRESH_S)")  # fmt: skip
    ap.add_argument("--curve", action="store_true", help="CurveZMQ on every "
                    "socket, cake's and the bare copies' (default: neither encrypts, "
                    "as a worker without keys on loopback)")  # fmt: skip
    a = ap.parse_args()
    from random_weights import SHAPE_1B, write_random_gguf

    from cake.net.keys import create_keys
    from cake.shard import Shard
    from cake.weights.cache import CHUNK, flat_bytes, raw_entries
    from cake.weights.checkpoint import open_checkpoint
    from cake.weights.names import shard_tensor_names
    from cake.weights.packed import stored_tensor

    tmp = Path(tempfile.mkdtemp(prefix="cake-bench-stream-"))
    os.environ["CAKE_CACHE_DIR"] = str(tmp / "master-cache")  # the master's digests
    states = a.pages.split(",")
    keys = None
    if a.curve:
        keys = tmp / "keys"
        create_keys("w", keys)
        create_keys("m", keys)
        (keys / "allow").mkdir()
        shutil.copy(keys / "m.key", keys / "allow" / "m.key")
    try:
        model = write_random_gguf(tmp / "m.gguf", SHAPE_1B, lambda _n: "Q4_0")
        ranges = [(0, a.layers)]

        def file_chunks() -> list[memoryview]:
            """The layers' bytes in CHUNK pieces, from a new mapping of the file
            (its pages are faulted in while they are sent, as cake's are)."""
            config, tensors = open_checkpoint(model)
            n_layers = config.num_hidden_layers
            out = []
            for n in shard_tensor_names(config, Shard(0, a.layers, n_layers)):
                for _, arr in raw_entries(stored_tensor(tensors, n)):
                    mv = memoryview(flat_bytes(arr))
                    out += [mv[o : o + CHUNK] for o in range(0, len(mv), CHUNK)]
            return out

        chunks = file_chunks()
        total = sum(len(c) for c in chunks)
        kinds = ("bare_once", "bare_ack", "bare_write", "bare_tcp", "cold", "warm")
        res = {f"{k}/{p}": [] for p in states for k in kinds}
        rss, again = [], []
        for r in range(a.rounds):
            for pages in states:
                shutil.rmtree(tmp / "master-cache", ignore_errors=True)  # cold digests
                for kind in ("cold", "warm"):
                    cache = (a.worker_dir or tmp) / f"cake-bench-worker-{r}-{kind}"
                    dt, sent, rs, ag = cake_stream(model, ranges, cache, a.window,
                                                   pages, keys)  # fmt: skip
                    assert sent == total, (sent, total)
                    res[f"{kind}/{pages}"].append(total / dt)
                    rss.append(rs)
                    again.append(ag)
                    shutil.rmtree(cache)
                for mode in ("once", "ack", "write"):
                    folder = a.worker_dir or tmp
                    dt = bare(file_chunks(), mode, folder, a.window, pages, a.curve)
                    res[f"bare_{mode}/{pages}"].append(total / dt)
                if not a.curve:  # cake's path without keys (cake/net/bulk.py)
                    dt = bare_tcp(file_chunks(), pages)
                    res[f"bare_tcp/{pages}"].append(total / dt)
        med = {k: statistics.median(v) for k, v in res.items() if v}
        print(f"{a.layers} layers of a 1B-shaped Q4_0 GGUF: {total / 1e6:.1f} MB in "
              f"{len(chunks)} chunks of {CHUNK >> 20} MiB; median of {a.rounds} rounds; "
              f"{'CurveZMQ' if a.curve else 'no encryption'} on every socket")  # fmt: skip
        print("| system | " + " | ".join(f"pages {p} (MB/s) | vs anchor" for p in states)
              + " |")  # fmt: skip
        print("|---|" + "---:|---:|" * len(states))
        for k, label in (("bare_once", "bare ZeroMQ, pipelined (anchor)"),
                         ("bare_ack", "bare ZeroMQ, a reply per chunk (same window)"),
                         ("bare_write", "bare ZeroMQ + write to a file, same folder"),
                         ("bare_tcp", "bare TCP socket, pipelined (cake's path without keys)"),
                         ("cold", "cake stream, cold (no digests: checksummed as it goes)"),
                         ("warm", "cake stream, digests kept")):  # fmt: skip
            if not res[f"{k}/{states[0]}"]:
                continue  # bare TCP with --curve: cake's chunks go over ZeroMQ
            cells = []
            for p in states:
                v, anchor = med[f"{k}/{p}"], med[f"bare_once/{p}"]
                cells.append(f"{v / 1e6:.0f} | {v / anchor:.2f}x")
            print(f"| {label} | " + " | ".join(cells) + " |")
        print(f"worker RSS after the stream: {max(rss) / 1e6:.0f} MB (layers "
              f"{total / 1e6:.0f} MB); a second run sent {max(again)} bytes")  # fmt: skip
        if a.json_out:
            a.json_out.write_text(json.dumps({"bytes": total, "chunks": len(chunks),
                "samples": res, "median": med, "worker_rss": rss, "curve": a.curve,
                "second_run_bytes": again, "layers": a.layers}, indent=1))  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
