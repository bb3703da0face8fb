"""Probing workers and `--topology auto`, with real worker processes on loopback.

Workers run the NumPy backend, or two test variants: "slownumpy" (tests/netutil:
sleeps per forward, so a probe outlasts the heartbeat timeout) and "smallnumpy"
(here: reports a small accelerator memory, so that a plan must spread layers).
Run as `python -m tests.test_net_bench ARGS`, this file is `cake ARGS` with both.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pytest
import zmq

import cake
from cake.errors import NetworkError, TopologyError
from cake.net.bench import probe_workers, worker_specs
from cake.net.keys import create_keys, load_public_key
from cake.net.protocol import PROTOCOL_VERSION
from tests.netutil import (
    PYTHON,
    Proc,
    free_port,
    greedy_text,
    start_worker,
    tiny_model,
    write_topology,
)
from tests.netutil import cake as cake_proc

PROMPT = "w5 w17 w99 w3 w42 w7"
N = 8
SMALL = dict(context=256, short=16, chunk=64, batch=2, repeats=2)
# the tiny model in float32 at 256 positions: 123,392 bytes of weights and
# 65,536 of KV cache per layer; 90 % of this holds one layer, not two
ONE_LAYER = 250_000
ONE_LAYER_WEIGHTS = 123_392


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def reference(tiny):
    return greedy_text(tiny, PROMPT, N)


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for p in started:
        assert p.terminate() == 0, p.stderr


def _small_worker(model, port: int, memory: int = ONE_LAYER) -> Proc:
    """A worker waiting for layers, on "smallnumpy" with `memory` bytes."""
    args = [PYTHON, "-m", "tests.test_net_bench", "worker", "--model", str(model)]
    args += ["--bind", f"tcp://127.0.0.1:{port}", "--backend", "smallnumpy"]
    w = Proc(args, env={"CAKE_TEST_MEMORY": str(memory)})
    try:
        w.wait_for("ready on", 120)
    except AssertionError:
        w.kill()
        raise
    return w


def _dealer(ctx: zmq.Context, port: int) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.linger, s.rcvtimeo = 0, 60000
    s.connect(f"tcp://127.0.0.1:{port}")
    return s


def _ask(s: zmq.Socket, frames: list) -> tuple[list[dict], list]:
    """Send a request; (interim progress replies, the final reply's frames)."""
    s.send_multipart(frames)
    interim = []
    while True:
        reply = s.recv_multipart()
        h = json.loads(reply[0])
        if "progress" not in h:
            return interim, [h, *reply[1:]]
        interim.append(h["progress"])


def _h(op: str, **kw) -> bytes:
    return json.dumps({"op": op, "v": PROTOCOL_VERSION, "id": 5, **kw}).encode()


def test_bench_echo_and_load_ops(tiny, procs):
    fixed, free = free_port(), free_port()
    procs.append(start_worker(tiny, "1-2", fixed))
    procs.append(start_worker(tiny, None, free))
    ctx = zmq.Context()
    a, b = _dealer(ctx, fixed), _dealer(ctx, free)
    try:
        # bench: progress replies, then a sane profile of the worker's device
        bench = dict(synthetic="tiny", dtype="float32", layers=1, **SMALL)
        interim, (h,) = _ask(a, [_h("bench", **bench)])
        p = h["profile"]
        assert h["op"] == "bench" and h["id"] == 5
        assert interim[0]["phase"] == "load"
        assert interim[-1]["done"] == interim[-1]["total"] > 10
        assert (p["backend"], p["dtype"], p["layers_probed"]) == ("numpy", "float32", 1)
        assert p["model"] == "synthetic tiny" and p["long_context"] == 256
        assert all(0 < t < 1 for t in p["decode_s"] + p["prefill_s"])
        assert p["memory_bytes"] > 10**8 and p["layer_bytes"] == 4 * 30848
        assert p["held_layer_bytes"] == p["layer_bytes"]  # NumPy holds float32
        assert p["loaded_bytes"] == 2 * ONE_LAYER_WEIGHTS  # its own layers 1-2
        _, (h,) = _ask(a, [_h("bench", synthetic=None, **SMALL)])
        assert h["profile"]["model"] == tiny.name and h["profile"]["dtype"] == "float32"
        for bad in (dict(synthetic="gpt5"), dict(context=50), dict(layers=9)):
            _, (h,) = _ask(a, [_h("bench", **{**bench, **bad})])
            assert h["op"] == "error" and h["code"] == "bad_request", h
        # echo: the payload comes back as it went
        data = np.arange(64 * 512, dtype=np.float32).tobytes()
        _, (h, back) = _ask(a, [_h("echo"), data])
        assert h["op"] == "echo" and back == data
        # load: a fixed worker refuses other layers; a waiting one takes them
        load = dict(layers=[[0, 2]], dtype="float32", context=128, max_sequences=1)
        _, (h,) = _ask(a, [_h("load", **load)])
        assert h["code"] == "assign" and "started with layers 1-2" in h["message"]
        _, (h,) = _ask(a, [_h("load", **{**load, "layers": [[1, 3]]})])
        assert h["op"] == "load" and h["layers"] == [[1, 3]]  # its own: accepted
        _, (h,) = _ask(b, [_h("hello")])
        assert (h["assigned"], h["fixed"], h["layers"]) == (False, False, [])
        _, (h,) = _ask(b, [_h("bench", **bench)])
        assert h["profile"]["loaded_bytes"] == 0  # waits for layers: holds none
        x = np.zeros((1, 1, 64), np.float32)
        fwd = dict(layers=[0, 2], seq_ids=[0], positions=[0], lengths=[1],
                   dtype="float32", shape=[1, 1, 64])  # fmt: skip
        _, (h,) = _ask(b, [_h("forward", **fwd), x.tobytes()])
        assert h["op"] == "error" and "holds no layers yet" in h["message"]
        _, (h,) = _ask(b, [_h("load", **load)])
        assert h["op"] == "load" and h["assigned"] and h["context"] == 128
        _, (h, out) = _ask(b, [_h("forward", **fwd), x.tobytes()])
        assert h["op"] == "forward" and len(out) == x.nbytes
        _, (h,) = _ask(b, [_h("load", **{**load, "context": 10**6})])
        assert h["code"] == "assign" and "--context" in h["message"]
        _, (h,) = _ask(b, [_h("ping")])  # still serving
        assert h["op"] == "ping"
    finally:
        a.close()
        b.close()
        ctx.term()


def test_probe_workers_fills_link_figures(tiny, procs):
    slow, free = free_port(), free_port()
    # 0.1 s per forward: the probe outlasts the 2 s heartbeat timeout
    procs.append(start_worker(tiny, None, slow, backend="slownumpy", delay=0.1))
    procs.append(start_worker(tiny, "0", free))
    seen = []
    t0 = time.monotonic()
    profiles = probe_workers(
        worker_specs(f"127.0.0.1:{slow},127.0.0.1:{free}"),
        synthetic=None, layers=2, dtype="auto",
        progress=lambda *a: seen.append(a), **SMALL,
    )  # fmt: skip
    assert time.monotonic() - t0 > 2.5
    assert [p.name for p in profiles] == [f"127.0.0.1:{slow}", f"127.0.0.1:{free}"]
    for p in profiles:
        assert p.address == p.name and p.model == tiny.name
        assert 0 < p.rtt_s < 0.05 and p.bandwidth_bytes_s > 1e6
    assert profiles[0].backend == "slownumpy" and profiles[0].decode_s[0] > 0.04
    phases = {s[1] for s in seen if s[0] == profiles[0].name}
    assert {"network", "load", "decode short"} <= phases


def test_probe_with_curve_keys(tiny, tmp_path, procs):
    keys = tmp_path / "keys"
    _, w_sec = create_keys("worker", keys)
    m_pub, m_sec = create_keys("master", keys)
    allow = tmp_path / "allow"
    allow.mkdir()
    (allow / "master.key").write_bytes(m_pub.read_bytes())
    port = free_port()
    procs.append(
        start_worker(
            tiny, None, port, "--secret-key", str(w_sec), "--allow-keys", str(allow)
        )  # fmt: skip
    )
    key = load_public_key(keys / "worker.key").decode()
    topo = tmp_path / "t.yaml"
    topo.write_text(f"w1:\n  host: '127.0.0.1:{port}'\n  layers: ['model.layers.0']\n"
                    f"  public_key: '{key}'\n")  # fmt: skip
    (p,) = probe_workers(worker_specs(str(topo)), synthetic="tiny", client_key=m_sec,
                         layers=1, dtype="auto", **SMALL)  # fmt: skip
    assert p.name == "w1" and p.rtt_s > 0 and p.model == "synthetic tiny"
    with pytest.raises(NetworkError, match="no public_key"):
        probe_workers(worker_specs(f"127.0.0.1:{port}"), synthetic="tiny",
                      client_key=m_sec, layers=1, dtype="auto", **SMALL)  # fmt: skip


def test_cli_bench_with_workers(tiny, tmp_path, procs):
    ports = [free_port(), free_port()]
    procs.extend(start_worker(tiny, None, p) for p in ports)
    out = tmp_path / "bench.json"
    workers = ",".join(f"127.0.0.1:{p}" for p in ports)
    args = ["--synthetic", "tiny", "--context", "700", "--layers", "1"]
    args += ["--backend", "numpy", "--workers", workers, "--json", str(out)]
    r = cake_proc("bench", *args)
    assert r.wait(240) == 0, r.stderr
    assert "decode x8" in r.stdout and r.stdout.count("round trip") == 2
    for p in ports:
        assert f"127.0.0.1:{p}" in r.stdout
    data = json.loads(out.read_text())["devices"]
    assert [d["name"] for d in data] == ["master"] + [f"127.0.0.1:{p}" for p in ports]
    assert data[0]["rtt_s"] is None and data[0]["loaded_bytes"] is None
    assert all(d["rtt_s"] > 0 and d["bandwidth_bytes_s"] > 0 for d in data[1:])
    assert all(d["loaded_bytes"] == 0 for d in data[1:])
    assert r.stdout.count("holds 0.00 GB of weights now") == 2
    assert all(d["model"] == "synthetic tiny" for d in data)


def test_run_topology_auto_spreads_layers(tiny, reference, procs):
    ports = [free_port(), free_port()]
    procs.extend(_small_worker(tiny, p) for p in ports)
    workers = ",".join(f"127.0.0.1:{p}" for p in ports)
    # a slow master (20 ms per forward): the plan gives each worker the one layer
    # its memory holds and keeps one on the master
    r = Proc([PYTHON, "-m", "tests.test_net_bench", "run", "--model", str(tiny),
              "--backend", "slownumpy", "--topology", "auto", "--workers", workers,
              "--raw", "-t", "0", "-n", str(N), PROMPT],
             env={"CAKE_TEST_DELAY": "0.02"})  # fmt: skip
    assert r.wait(240) == 0, r.stderr
    assert r.stdout.strip() == reference.strip()
    assert "predicted" in r.stderr and "tokens/s" in r.stderr
    assert "master: layers 0 (1)" in r.stderr, r.stderr
    for p, w in zip(ports, procs, strict=True):
        assert f"127.0.0.1:{p}: layers" in r.stderr
        assert "serving layers" in w.stderr


def test_api_auto_leaves_unhelpful_workers_untouched(tiny, reference, procs):
    ports = [free_port(), free_port()]
    # workers slower than the master by 50 ms per forward, whatever the load on
    # this machine: they cannot help, so the plan must leave them untouched
    procs.extend(
        start_worker(tiny, None, p, backend="slownumpy", delay=0.05) for p in ports
    )
    m = cake.load(tiny, backend="numpy", topology="auto",
                  workers=[f"127.0.0.1:{p}" for p in ports])  # fmt: skip
    try:
        assert m.plan is not None and m.plan.topology is None
        assert [a.name for a in m.plan.plan.assignments] == ["master"]
        assert len(m.plan.plan.dropped) == 2 and m.plan.predict_seconds(64) > 0
        assert "".join(m.generate(PROMPT, max_tokens=N, temperature=0)) == reference
    finally:
        m.close()
    time.sleep(0.3)
    assert not any("loading layers" in w.stderr for w in procs)


def test_restarted_waiting_worker_gets_its_layers_again(tiny, tmp_path):
    long = "".join(
        cake.load(tiny, backend="numpy").generate(PROMPT, max_tokens=30, temperature=0)
    )
    port = free_port()
    w = start_worker(tiny, None, port, backend="slownumpy", delay=0.08)
    topo = write_topology(tmp_path / "t.yaml", {"w1": (port, "1-2")})
    args = ["--model", str(tiny), "--topology", str(topo), "--backend", "numpy"]
    master = cake_proc("run", *args, "--raw", "-t", "0", "-n", "30", PROMPT)
    try:
        t0 = time.monotonic()
        while len(master.stdout.split()) < 5:  # mid-generation
            assert time.monotonic() - t0 < 60 and master.proc.poll() is None
            time.sleep(0.01)
        w.kill()
        master.wait_for("lost worker 'w1'", 10)
        w = start_worker(tiny, None, port, backend="slownumpy", delay=0.08)
        assert master.wait(60) == 0, master.stderr
        assert master.stdout.strip() == long.strip()
        assert master.stderr.count("loading layers 1-2") == 2
    finally:
        master.kill()
        assert w.terminate() == 0


def test_auto_errors_are_clear(tiny, procs):
    port = free_port()
    r = cake_proc("run", "--model", str(tiny), "--backend", "numpy", "--topology",
                  "auto", "--workers", f"127.0.0.1:{port}", "--retry-timeout", "1",
                  "--raw", "hi")  # fmt: skip
    assert r.wait(60) == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("cake: error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"cannot reach worker '127.0.0.1:{port}'" in lines[0]
    r = cake_proc("run", "--model", str(tiny), "--topology", "auto", "hi")
    assert r.wait(60) == 1 and "needs --workers" in r.stderr.splitlines()[-1]
    procs.append(start_worker(tiny, "1-2", port))
    with pytest.raises(TopologyError, match=r"started with fixed layers \(1-2\)"):
        cake.load(tiny, backend="numpy", topology="auto", workers=f"127.0.0.1:{port}")


def _register_small_backend() -> None:
    from cake.backends.base import DeviceInfo, register_backend
    from cake.backends.numpy import NumpyBackend

    class SmallNumpyBackend(NumpyBackend):
        name = "smallnumpy"

        @classmethod
        def devices(cls) -> list[DeviceInfo]:
            return [DeviceInfo("gpu", "small", int(os.environ["CAKE_TEST_MEMORY"]))]

    register_backend(SmallNumpyBackend)


if __name__ == "__main__":
    from tests.netutil import _register_slow_backend

    _register_slow_backend()
    _register_small_backend()
    from cake.cli import main

    sys.argv[0] = "cake"
    main()
