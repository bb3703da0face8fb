"""Thousands of malformed messages to a real worker: each gets an error reply, the
worker keeps serving the right numbers, and its memory stays bounded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zmq

from cake.net.protocol import PROTOCOL_VERSION
from tests.netutil import free_port, start_worker, tiny_model

D = 64  # the tiny model's hidden size
CONTEXT = 256


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    model = tiny_model(tmp_path_factory.mktemp("tiny"))
    port = free_port()
    w = start_worker(model, "1-2", port)
    yield w, f"tcp://127.0.0.1:{port}"
    assert w.terminate() == 0, w.stderr


def _dealer(ctx: zmq.Context, address: str) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.rcvtimeo = 10000
    s.connect(address)
    return s


def _h(**kw) -> bytes:
    return json.dumps({"v": PROTOCOL_VERSION, "id": 1, **kw}).encode()


def _forward(seq=(0,), pos=(0,), lengths=(4,), shape=None, dtype="float32", **kw):
    b, n = len(seq), max(lengths)
    h = dict(op="forward", layers=[1, 3], seq_ids=list(seq), positions=list(pos),
             lengths=list(lengths), dtype=dtype, shape=shape or [b, n, D])  # fmt: skip
    h.update(kw)
    return _h(**h)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def malformed(rng: np.random.Generator, n: int):
    """n malformed requests (lists of frames), cycling through kinds of mistakes."""
    x = np.zeros((1, 4, D), np.float32).tobytes()
    fixed = [
        [b""],
        [b"[]"],
        [b"null"],
        [b'"forward"'],
        [b"{}"],
        [_h(op="forward", v=PROTOCOL_VERSION + 1)],
        [json.dumps({"op": "ping", "v": 1}).encode()],  # no id
        [_h(op="ping", id="1")],
        [_h(op="ping"), b"extra"],
        [_h(op="hello"), x],
        [_h(op="release", seq_ids="0")],
        [_h(op="release", seq_ids=[])],
        [_h(op=None)],
        [b"[" * 30000 + b"]" * 30000],  # deep nesting, under the header cap
        [b" " * (64 * 1024 + 1)],  # over the header cap
        [_forward()],  # no activation frame
        [_forward(), x, x],
        [_forward(), x, x, x, x],
        [_forward(), x[:-1]],  # truncated
        [_forward(), x + b"\0" * 4],
        [_forward(), b""],
        [_forward(dtype="float64"), x],
        [_forward(dtype="bfloat16"), x[: len(x) // 2]],  # the worker runs float32
        [_forward(dtype="int8"), x],
        [_forward(dtype=7), x],
        [_forward(dtype=None), x],
        [_forward(shape=[1, 4, D + 1]), x],
        [_forward(shape=[2, 4, D]), x],
        [_forward(shape=[1, 2**20, D]), x],  # huge declared sizes
        [_forward(shape=[2**31, 2**31, 2**31]), x],
        [_forward(shape=[-1, -4, D]), x],
        [_forward(shape=[4, D]), x],
        [_forward(shape="1,4,64"), x],
        [_forward(shape=[1.0, 4, D]), x],
        [_forward(seq=(0, 0), pos=(0, 0), lengths=(4, 4), shape=[2, 4, D]), x * 2],
        [_forward(pos=(-1,)), x],
        [_forward(lengths=(0,)), x],
        [_forward(seq=(True,)), x],
        [_forward(seq=("a",)), x],
        [_forward(pos=(CONTEXT - 2,)), x],  # past the context (and the cache)
        [_forward(pos=(9,)), x],  # the cache does not hold 9 tokens
        [_forward(layers=[0, 1]), x],
        [_forward(layers=[1, 2]), x],
        [_forward(layers="1-2"), x],
        [_forward(layers=None), x],
        [_forward(seq_ids=list(range(5000))), x],
    ]
    for i in range(n):
        kind = i % (len(fixed) + 3)
        if kind < len(fixed):
            yield fixed[kind]
        elif kind == len(fixed):  # garbage bytes
            yield [rng.bytes(int(rng.integers(1, 4000)))]
        elif kind == len(fixed) + 1:  # garbage after a valid header
            yield [_forward(), rng.bytes(int(rng.integers(1, 4000)))]
        else:  # an unknown op
            yield [_h(op=rng.bytes(8).hex())]


def test_fuzz_worker_keeps_serving_with_bounded_memory(worker):
    proc, address = worker
    ctx = zmq.Context()
    s = _dealer(ctx, address)
    try:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((1, 4, D)).astype(np.float32)

        def good() -> np.ndarray:
            s.send_multipart([_forward(id=123), x], copy=False)
            h, f = s.recv_multipart(copy=False)
            assert json.loads(h.bytes)["op"] == "forward"
            return np.frombuffer(f, np.float32).reshape(1, 4, D).copy()

        want = good()
        for _ in range(200):  # warm up the allocator before measuring
            s.send_multipart([_forward(shape=[1, 4, D + 1]), x])
            s.recv_multipart()
        rss0 = _rss_kib(proc.proc.pid)

        errors = 0
        for frames in malformed(rng, 3000):
            s.send_multipart(frames)
            reply = json.loads(s.recv_multipart()[0])
            assert reply["op"] == "error" and reply["code"], (frames[0][:200], reply)
            errors += 1
        assert errors == 3000
        # a burst nobody reads in time, then a frame over MAXMSGSIZE (disconnects)
        for frames in malformed(rng, 500):
            s.send_multipart(frames)
        big = _dealer(ctx, address)
        big.send_multipart([_forward(), b"\0" * (4 << 20)])
        big.close()
        s.close()

        s = _dealer(ctx, address)
        got = good()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        grown = _rss_kib(proc.proc.pid) - rss0
        assert grown < 32 * 1024, f"worker RSS grew by {grown} KiB"
        assert proc.proc.poll() is None
    finally:
        s.close()
        ctx.term()
