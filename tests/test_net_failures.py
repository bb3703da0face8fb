"""Failures between real processes: a worker killed mid-generation, a worker that
never comes back, a different model, keys, a full cache, unsafe binds."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import zmq

import cake
from cake.backends.base import Step
from cake.errors import CacheFullError, NetworkError
from cake.net.keys import create_keys, load_public_key
from cake.net.protocol import encode_header, forward_header, payload
from tests.netutil import cake as cake_proc
from tests.netutil import (
    free_port,
    greedy_text,
    start_worker,
    tiny_model,
    write_topology,
)

PROMPT = "w5 w17 w99 w3 w42 w7"
N = 40  # tokens; the slow worker takes DELAY s per token
DELAY = 0.08


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def reference(tiny):
    return greedy_text(tiny, PROMPT, N)


def _run_master(tiny, topo, retry: float):
    return cake_proc(
        "run", "--model", str(tiny), "--topology", str(topo), "--backend", "numpy",
        "--raw", "-t", "0", "-n", str(N), "--retry-timeout", str(retry), PROMPT,
    )  # fmt: skip


def _kill_mid_generation(tiny, tmp_path, retry: float):
    port = free_port()
    worker = start_worker(tiny, "1-2", port, backend="slownumpy", delay=DELAY)
    topo = write_topology(tmp_path / "t.yaml", {"w1": (port, "1-2")})
    master = _run_master(tiny, topo, retry)
    t0 = time.monotonic()
    while len(master.stdout.split()) < 5:  # some tokens are out: mid-generation
        assert time.monotonic() - t0 < 60, master.stderr
        assert master.proc.poll() is None, master.stderr
        time.sleep(0.01)
    worker.kill()  # SIGKILL
    noticed = master.wait_for("lost worker 'w1'", 10)
    assert noticed < 3, master.stderr
    assert "waiting up to" in master.stderr
    return master, port


def test_killed_worker_comes_back_and_output_is_unchanged(tiny, reference, tmp_path):
    master, port = _kill_mid_generation(tiny, tmp_path, retry=30)
    worker = start_worker(tiny, "1-2", port, backend="slownumpy", delay=DELAY)
    try:
        assert master.wait(60) == 0, master.stderr
        assert "is back" in master.stderr
        assert master.stdout.strip() == reference.strip()
    finally:
        master.kill()
        assert worker.terminate() == 0


def test_worker_that_never_comes_back_is_a_clear_error(tiny, tmp_path):
    master, _ = _kill_mid_generation(tiny, tmp_path, retry=2)
    t0 = time.monotonic()
    rc = master.wait(2 + 10)
    assert rc != 0 and time.monotonic() - t0 < 2 + 5
    assert "did not come back within 2 s" in master.stderr
    assert "Traceback" not in master.stderr


@pytest.fixture(scope="module")
def worker12(tiny):
    port = free_port()
    w = start_worker(tiny, "1-2", port, "--max-sequences", "1")
    yield port
    assert w.terminate() == 0


def test_different_model_is_refused_at_connect(tmp_path, worker12):
    other = tiny_model(tmp_path / "qwen", arch="qwen2")
    topo = write_topology(tmp_path / "t.yaml", {"w1": (worker12, "1-2")})
    with pytest.raises(NetworkError, match=r"'w1'.*different model.*model_type"):
        cake.load(other, backend="numpy", topology=topo, retry_timeout=5)


def test_wrong_layers_are_refused_at_connect(tiny, tmp_path, worker12):
    topo = write_topology(tmp_path / "t.yaml", {"w1": (worker12, "1")})
    with pytest.raises(NetworkError, match=r"serves layers 1-2 but the topology"):
        cake.load(tiny, backend="numpy", topology=topo, retry_timeout=5)


def test_full_worker_refuses_a_new_sequence(tiny, tmp_path, worker12):
    topo = write_topology(tmp_path / "t.yaml", {"w1": (worker12, "1-2")})
    a, b, c = (cake.load(tiny, backend="numpy", topology=topo) for _ in range(3))
    try:
        "".join(a.generate(PROMPT, max_tokens=2, temperature=0))
        with pytest.raises(CacheFullError, match=r"'w1'.*full.*--max-sequences"):
            "".join(b.generate(PROMPT, max_tokens=2, temperature=0))
        a.close()  # releases its sequence: now b fits
        assert "".join(b.generate(PROMPT, max_tokens=2, temperature=0))
        # b vanishes without a release: the worker frees its session on disconnect
        for stage in b.pipeline.stages:
            getattr(stage, "close", lambda: None)()
        t0 = time.monotonic()
        while True:
            try:
                assert "".join(c.generate(PROMPT, max_tokens=2, temperature=0))
                break
            except CacheFullError:
                assert time.monotonic() - t0 < 5
                time.sleep(0.05)
    finally:
        for m in (a, b, c):
            m.close()


def test_worker_reads_its_layers_and_address_from_the_topology(tiny, tmp_path):
    port = free_port()
    topo = write_topology(
        tmp_path / "t.yaml", {"w0": (free_port(), "0"), "w1": (port, "1-2")}
    )
    w = start_worker(tiny, None, None, "--name", "w1", "--topology", str(topo))
    try:
        assert f"ready on tcp://127.0.0.1:{port}: layers 1-2" in w.stderr
        one = write_topology(tmp_path / "one.yaml", {"w1": (port, "1-2")})
        m = cake.load(tiny, backend="numpy", topology=one)
        assert "".join(m.generate(PROMPT, max_tokens=3, temperature=0))
        m.close()
    finally:
        assert w.terminate() == 0


def test_unreachable_worker_is_a_clear_error(tiny, tmp_path):
    topo = write_topology(tmp_path / "t.yaml", {"w1": (free_port(), "1-2")})
    t0 = time.monotonic()
    with pytest.raises(NetworkError, match=r"cannot reach worker 'w1'"):
        cake.load(tiny, backend="numpy", topology=topo, retry_timeout=1)
    assert time.monotonic() - t0 < 5


def test_curve_keys(tiny, tmp_path):
    keys = tmp_path / "keys"
    w_pub, w_sec = create_keys("worker", keys)
    m_pub, m_sec = create_keys("master", keys)
    _, s_sec = create_keys("stranger", keys)
    s_pub = keys / "stranger.key"
    allow = tmp_path / "allow"
    allow.mkdir()
    shutil.copy(m_pub, allow)
    port = free_port()
    worker = start_worker(
        tiny, "1-2", port, "--secret-key", str(w_sec), "--allow-keys", str(allow)
    )
    try:

        def topo(key_file):
            key = load_public_key(key_file).decode()
            extra = {"w1": {"public_key": key}}
            return write_topology(tmp_path / "t.yaml", {"w1": (port, "1-2")}, **extra)

        m = cake.load(tiny, backend="numpy", topology=topo(w_pub), client_key=m_sec)
        assert "".join(m.generate(PROMPT, max_tokens=3, temperature=0))
        m.close()
        with pytest.raises(NetworkError, match=r"refused this master's key"):
            cake.load(
                tiny, backend="numpy", topology=topo(w_pub), client_key=s_sec,
                retry_timeout=5,
            )  # fmt: skip
        with pytest.raises(
            NetworkError, match=r"public_key in the topology may be wrong"
        ):
            cake.load(
                tiny, backend="numpy", topology=topo(s_pub), client_key=m_sec,
                retry_timeout=5,
            )  # fmt: skip
        # without any key the worker is out of reach as well
        plain = write_topology(tmp_path / "p.yaml", {"w1": (port, "1-2")})
        with pytest.raises(NetworkError, match=r"requires keys|cannot reach"):
            cake.load(tiny, backend="numpy", topology=plain, retry_timeout=2)
    finally:
        assert worker.terminate() == 0


def test_bind_beyond_loopback_needs_keys_or_insecure(tiny):
    port = free_port()
    p = cake_proc("worker", "--model", str(tiny), "--layers", "1-2",
                  "--bind", f"tcp://0.0.0.0:{port}", "--backend", "numpy")  # fmt: skip
    assert p.wait(60) == 1
    assert "refusing to bind" in p.stderr and "--insecure" in p.stderr
    w = start_worker(tiny, "1-2", port, "--insecure")  # binds 127.0.0.1: no warning
    assert w.terminate() == 0
    p = cake_proc("worker", "--model", str(tiny), "--layers", "1-2", "--insecure",
                  "--bind", f"tcp://0.0.0.0:{port}", "--backend", "numpy")  # fmt: skip
    p.wait_for("ready on", 60)
    assert "WARNING" in p.stderr
    assert p.terminate() == 0


def test_sigterm_finishes_the_request_in_flight(tiny):
    port = free_port()
    w = start_worker(tiny, "1-2", port, backend="slownumpy", delay=1.0)
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger, s.rcvtimeo = 0, 10000
    try:
        s.connect(f"tcp://127.0.0.1:{port}")
        x = np.ones((1, 2, 64), np.float32)
        s.send_multipart(
            [encode_header(forward_header(1, (1, 3), Step((0,), (0,), (2,)), x)),
             payload(x)]
        )  # fmt: skip
        time.sleep(0.3)  # the worker is inside its 1 s forward
        w.proc.send_signal(15)
        head, frame = s.recv_multipart()
        assert json.loads(head)["op"] == "forward" and len(frame) == 2 * 64 * 4
        assert w.wait(10) == 0 and "stopped" in w.stderr
    finally:
        s.close()
        ctx.term()
        w.kill()


def test_keys_command(tmp_path):
    p = cake_proc("keys", "m1", "--dir", str(tmp_path))
    assert p.wait(60) == 0, p.stderr
    pub, sec = tmp_path / "m1.key", tmp_path / "m1.key_secret"
    assert pub.is_file() and sec.is_file() and sec.stat().st_mode & 0o077 == 0
    assert load_public_key(pub).decode() in p.stdout
    again = cake_proc("keys", "m1", "--dir", str(tmp_path))
    assert again.wait(60) == 1 and "already exists" in again.stderr
