"""The wire format in one process: header codec, activation frames, fingerprints,
and the worker's request handler on a tiny model (no sockets)."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from cake.backends.base import Step
from cake.generate import Generator
from cake.net.protocol import (
    MAX_HEADER,
    PROTOCOL_VERSION,
    ProtocolError,
    array_from_frame,
    decode_header,
    encode_header,
    fingerprint,
    forward_header,
    payload,
    step_from_header,
)
from cake.net.worker import load_worker
from cake.pipeline import Pipeline, load_local_stage
from cake.sampling import SamplingParams
from cake.shard import Shard
from cake.tokenizer import load_tokenizer
from cake.weights.checkpoint import open_checkpoint
from tests.netutil import ForgetfulStage, tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny"))


def test_header_round_trip_and_checks():
    h = {"op": "ping", "v": PROTOCOL_VERSION, "id": 7}
    assert decode_header(encode_header(h)) == h
    bad = [
        b"",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"op": "ping", "v": 1}',  # no id
        b'{"op": 3, "v": 1, "id": 1}',
        b'{"op": "ping", "v": 1, "id": true}',
        b"[" * 20000 + b"]" * 20000,  # deep nesting
        b" " * (MAX_HEADER + 1),
    ]
    for frame in bad:
        with pytest.raises(ProtocolError):
            decode_header(frame)
    with pytest.raises(ProtocolError, match="version") as e:
        decode_header(json.dumps({"op": "ping", "v": 99, "id": 1}).encode())
    assert e.value.code == "version"


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_activation_frame_is_raw_bytes_without_copy(dtype):
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4).astype(dtype)
    p = payload(x)
    assert p.dtype == np.uint8 and p.nbytes == x.size * np.dtype(dtype).itemsize
    assert np.shares_memory(p, x)  # a view: nothing copied before ZeroMQ
    buf = bytearray(p.tobytes())
    y = array_from_frame(buf, np.dtype(dtype).name, [2, 3, 4])
    assert y.dtype == x.dtype and np.array_equal(y.view(np.uint8), x.view(np.uint8))
    assert np.shares_memory(y, np.frombuffer(buf, np.uint8))


def test_activation_frame_checks():
    buf = bytes(2 * 3 * 4 * 4)
    array_from_frame(buf, "float32", [2, 3, 4], want=(2, 3, 4))
    for dtype, shape, want in [
        ("float64", [2, 3, 4], None),
        ("object", [2, 3, 4], None),
        (None, [2, 3, 4], None),
        ("float32", [2, 3, 5], None),  # size mismatch
        ("float32", [2**30, 2**30, 64], None),  # huge declared size
        ("float32", [-2, -3, 4], None),
        ("float32", "2,3,4", None),
        ("float32", [2, 3, 4.0], None),
        ("float32", [2, 3, 4], (2, 3, 5)),
        ("float32", [1] * 9, None),
    ]:
        with pytest.raises(ProtocolError):
            array_from_frame(buf, dtype, shape, want)


def test_step_from_header():
    step = Step((3, 4), (0, 5), (7, 1))
    h = forward_header(1, (0, 2), step, np.zeros((2, 7, 8), np.float32))
    assert step_from_header(h) == step
    for key, value in [
        ("seq_ids", [1, 1]),
        ("seq_ids", []),
        ("seq_ids", [True, 2]),
        ("positions", [0, -1]),
        ("lengths", [0, 1]),
        ("lengths", [1]),
        ("positions", "0"),
        ("seq_ids", list(range(5000))),
    ]:
        with pytest.raises(ProtocolError):
            step_from_header({**h, key: value})


def test_fingerprint_depends_on_model_and_layers(tiny, tmp_path):
    config, tensors = open_checkpoint(tiny)
    a = fingerprint(config, [(1, 3)], tensors)
    assert a == fingerprint(config, [(1, 3)], tensors)
    assert a != fingerprint(config, [(1, 2)], tensors)
    other = tiny_model(tmp_path / "q", arch="qwen2")
    c2, t2 = open_checkpoint(other)
    assert a != fingerprint(c2, [(1, 3)], t2)


def test_handler_answers_every_op_and_errors(tiny):
    server = load_worker(tiny, [(1, 3)], backend="numpy", max_sequences=1)
    hello = decode_header(server.handle(b"a", [encode_header(_h("hello"))])[0])
    assert hello["layers"] == [[1, 3]] and hello["dtype"] == "float32"
    assert (
        decode_header(server.handle(b"a", [encode_header(_h("ping"))])[0])["op"]
        == "ping"
    )
    x = np.ones((1, 2, 64), np.float32)
    step = Step((0,), (0,), (2,))
    req = forward_header(5, (1, 3), step, x)
    h, frame = server.handle(b"a", [encode_header(req), payload(x).tobytes()])
    h = decode_header(h)
    assert h["op"] == "forward" and h["shape"] == [1, 2, 64] and h["id"] == 5
    # another session is refused while the only slot is taken, then served
    err = decode_header(
        server.handle(b"b", [encode_header(req), payload(x).tobytes()])[0]
    )
    assert err["op"] == "error" and err["code"] == "cache_full"
    server.handle(b"a", [encode_header({**_h("release"), "seq_ids": [0]})])
    ok = decode_header(
        server.handle(b"b", [encode_header(req), payload(x).tobytes()])[0]
    )
    assert ok["op"] == "forward"
    # a position the cache does not hold
    late = forward_header(6, (1, 3), Step((0,), (9,), (2,)), x)
    err = decode_header(
        server.handle(b"b", [encode_header(late), payload(x).tobytes()])[0]
    )
    assert err["code"] == "position"
    unknown = decode_header(server.handle(b"b", [encode_header(_h("dance"))])[0])
    assert unknown["code"] == "bad_request" and "dance" in unknown["message"]


def _h(op: str) -> dict:
    return {"op": op, "v": PROTOCOL_VERSION, "id": 1}


def test_generator_replays_after_a_stage_reset(tiny):
    """A stage that loses its caches mid-generation (a restarted worker) raises
    StageReset; the Generator replays from position 0 and the output is unchanged."""
    config, tensors = open_checkpoint(tiny)

    def stage(shard):
        return load_local_stage(
            config, shard, tensors, "numpy", "float32", max_context=64, max_sequences=1
        )

    def run(fail_at):
        shards = (Shard(0, 1, 3, embed=True), Shard(1, 3, 3), Shard(3, 3, 3, head=True))
        stages = [stage(s) for s in shards]
        stages[1] = ForgetfulStage(stages[1], fail_at)
        gen = Generator(Pipeline(stages, 64), load_tokenizer(tiny))
        ids = [5, 17, 99, 3, 42]
        return "".join(gen.generate(ids, SamplingParams(temperature=0.0), 16))

    assert run(set()) == run({1, 6, 7, 12})  # during prefill, decode, and a replay
