"""Weight streaming: a `cake worker --cache-dir` with no model gets its layers'
weights from the master, as stored, and keeps them (real processes on loopback)."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest

import cake
from cake.backends.base import available_backends
from cake.errors import CakeError
from cake.net import bulk, stream
from cake.net.handshake import Expect
from cake.net.keys import create_keys, load_public_key, load_secret_key
from cake.net.protocol import fingerprint
from cake.net.remote import RemoteStage, WorkerClient
from cake.weights.cache import (
    WRITE_PIECE,
    CachedSource,
    ChecksumError,
    ChunkError,
    Entry,
    Manifest,
    WeightCache,
    checksum,
    chunk_sums,
    entry_digest,
    flat_bytes,
)
from cake.weights.checkpoint import open_checkpoint
from cake.weights.packed import Packed, stored_tensor
from tests.netutil import (
    PYTHON,
    Proc,
    free_port,
    start_worker,
    tiny_model,
    write_topology,
)
from tests.netutil import cake as cake_proc
from tests.smollm import smollm_gguf

PROMPT = "w5 w17 w99 w3 w42 w7 w64 w12"
SMALL_CHUNK = 1 << 16  # several chunks per SmolLM2 matrix


def _stream_worker(cache: Path, port: int, *extra: str, backend: str = "numpy") -> Proc:
    return start_worker(
        None, None, port, "--cache-dir", str(cache), *extra, backend=backend
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny"))


def _greedy(model, n=12, **kw) -> str:
    m = cake.load(model, backend="numpy", retry_timeout=20, **kw)
    try:
        if "topology" in kw:
            assert any(isinstance(s, RemoteStage) for s in m.pipeline.stages)
        return "".join(m.generate(PROMPT, max_tokens=n, temperature=0))
    finally:
        m.close()


def test_worker_without_model_gets_weights_then_streams_nothing(tiny, tmp_path, capfd):
    whole = _greedy(tiny)
    cache, port = tmp_path / "cache", free_port()
    topo = write_topology(tmp_path / "t.yaml", {"w": (port, "1-2")})
    w = _stream_worker(cache, port)
    try:
        assert _greedy(tiny, topology=topo) == whole
        err = capfd.readouterr().err
        assert "streaming" in err and "MB of weights sent" in err
        config, tensors = open_checkpoint(tiny)
        want, _ = stream.build_manifest(config, tensors, [(1, 3)])
        packs = sorted(p.suffix for p in (cache / "packs").iterdir())
        assert packs == [".index", ".pack"]  # one stream, one pack
        held = WeightCache(cache)
        assert all(held.held(e, want.chunk) == e.nbytes for e in want.entries())
        assert "receiving" in w.stderr
    finally:
        assert w.terminate() == 0, w.stderr
    # a new worker process on the same cache: nothing to send
    w = _stream_worker(cache, port)
    try:
        assert _greedy(tiny, topology=topo) == whole
        err = capfd.readouterr().err
        assert "holds the weights already" in err and "streaming" not in err
    finally:
        assert w.terminate() == 0, w.stderr


def _client(model: Path, port: int, ranges) -> WorkerClient:
    config, tensors = open_checkpoint(model)
    e = Expect(fingerprint(config, ranges, tensors), tuple(ranges), "float32",
               config.model_type, config.num_hidden_layers, config.hidden_size,
               fingerprint(config, [], tensors))  # fmt: skip
    c = WorkerClient("w", f"tcp://127.0.0.1:{port}", e, retry_timeout=60)
    c.weights = (config, tensors)
    return c


PATHS = {True: "over a TCP connection", False: "over ZeroMQ"}  # stream_weights(tcp=)


def _hello(c: WorkerClient) -> None:
    """Connect and hello, without the load (the test streams by hand)."""
    c._open()
    c.info = c._hello(1e12)


@pytest.mark.parametrize("tcp", [True, False])
def test_quantized_layers_stay_quantized_and_a_damaged_chunk_is_sent_again(
    tmp_path, capfd, monkeypatch, tcp
):
    monkeypatch.setattr(stream, "CHUNK", SMALL_CHUNK)
    model = smollm_gguf()
    cache, port = tmp_path / "cache", free_port()
    w = _stream_worker(cache, port)
    damaged = []

    def corrupt(k: int, data: bytes) -> bytes:
        if k in (3, 40):  # two chunks arrive with a flipped bit, once each
            damaged.append(k)
            return bytes([data[0] ^ 1]) + data[1:]
        return data

    c = _client(model, port, [(28, 30)])
    try:
        c.connect()  # the worker needs weights: connect streams them (CHUNK)
        c.close()
        config, tensors = open_checkpoint(model)
        for p in (cache / "packs").iterdir():
            p.unlink()
        # again, by hand, with two damaged chunks, into an emptied cache
        c = _client(model, port, [(28, 30)])
        _hello(c)
        sent = stream.stream_weights(
            c, config, tensors, [(28, 30)], corrupt=corrupt, tcp=tcp
        )
        m, _ = stream.build_manifest(config, tensors, [(28, 30)], SMALL_CHUNK)
        assert damaged == [3, 40]  # each sent again, with what was in flight
        window = stream.WINDOW * SMALL_CHUNK
        assert m.nbytes + 2 * SMALL_CHUNK <= sent <= m.nbytes + 2 * window
        err = capfd.readouterr().err
        assert err.count("sending from there again") == 2 and PATHS[tcp] in err
        src = CachedSource(WeightCache(cache), m)
        name = "model.layers.29.mlp.down_proj.weight"
        got, ref = src.stored(name), stored_tensor(tensors, name)
        assert isinstance(got, Packed) and got.format == ref.format == "Q4_1"
        np.testing.assert_array_equal(got.data, ref.data)  # the file's bytes
        assert sum(src.nbytes(t.name) for t in m.tensors) == m.nbytes
    finally:
        c.close()
        assert w.terminate() == 0, w.stderr


def _half_held(cache: Path, m: Manifest) -> bool:
    c = WeightCache(cache)  # as a restarted worker reads it
    try:
        return any(0 < c.held(e, m.chunk) < e.nbytes for e in m.entries())
    finally:
        c.close()


@pytest.mark.parametrize("tcp", [True, False])
def test_a_stream_cut_by_a_worker_restart_resumes(tmp_path, capfd, monkeypatch, tcp):
    monkeypatch.setattr(stream, "CHUNK", SMALL_CHUNK)
    model = smollm_gguf()
    cache, port = tmp_path / "cache", free_port()
    workers = [_stream_worker(cache, port)]
    config, tensors = open_checkpoint(model)
    m, _ = stream.build_manifest(config, tensors, [(29, 30)], SMALL_CHUNK)
    # the first chunk past 20 that is not an entry's first: chunk cut - 1, already
    # sent when chunk cut is made, is in the same entry, so it must be half held
    starts = np.cumsum([0] + [-(-e.nbytes // SMALL_CHUNK) for e in m.entries()])
    firsts = set(starts.tolist())
    cut = next(k for k in range(20, int(starts[-1])) if k not in firsts)

    def restart(k: int, data: bytes) -> bytes:
        if k == cut:  # mid-entry: the new worker finds a part to go on from
            deadline = time.monotonic() + 30
            while not _half_held(cache, m):
                assert time.monotonic() < deadline, "no entry was half written"
                time.sleep(0.01)
            workers[0].kill()
            workers.append(_stream_worker(cache, port))
        return data

    c = _client(model, port, [(29, 30)])
    try:
        _hello(c)
        sent = stream.stream_weights(
            c, config, tensors, [(29, 30)], corrupt=restart, tcp=tcp
        )
        # what the first worker verified is not sent again: at most the chunks
        # that were in flight when it died
        assert m.nbytes <= sent <= m.nbytes + stream.WINDOW * SMALL_CHUNK
        err = capfd.readouterr().err
        assert "reconnecting to resume" in err and PATHS[tcp] in err
        CachedSource(WeightCache(cache), m)  # every entry whole and checked
    finally:
        c.close()
        for w in workers[1:]:
            assert w.terminate() == 0, w.stderr


def test_cache_checks_chunks_and_resumes_parts(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 3 * SMALL_CHUNK - 5, np.uint8)
    sums = chunk_sums(data, SMALL_CHUNK)
    from cake.weights.cache import Entry

    e = Entry("data", "uint8", (data.size,), data.size,
              entry_digest(data.size, SMALL_CHUNK, sums))  # fmt: skip
    c = WeightCache(tmp_path)
    piece = flat_bytes(data)[:SMALL_CHUNK].tobytes()
    with pytest.raises(ChecksumError):
        c.write(e, SMALL_CHUNK, 0, bytes([piece[0] ^ 4]) + piece[1:], sums[0])
    assert c.held(e, SMALL_CHUNK) == 0
    assert c.write(e, SMALL_CHUNK, 0, piece, sums[0]) == SMALL_CHUNK
    with pytest.raises(ChunkError):  # not where the held bytes end
        c.write(e, SMALL_CHUNK, 2 * SMALL_CHUNK, piece, sums[0])
    c = WeightCache(tmp_path)  # a restarted worker: the part is still there
    assert c.held(e, SMALL_CHUNK) == SMALL_CHUNK
    for k in (1, 2):
        part = data[k * SMALL_CHUNK : (k + 1) * SMALL_CHUNK].tobytes()
        c.write(e, SMALL_CHUNK, k * SMALL_CHUNK, part, checksum(part))
    assert c.held(e, SMALL_CHUNK) == data.size
    np.testing.assert_array_equal(c.array(e), data)
    # an entry whose chunks pass but whose digest does not is refused
    bad = Entry("data", "uint8", (10,), 10, "0" * 64)
    with pytest.raises(ChecksumError, match="digest"):
        c.write(bad, SMALL_CHUNK, 0, b"x" * 10, checksum(b"x" * 10))
    assert c.held(bad, SMALL_CHUNK) == 0


def test_cache_keeps_a_stream_in_one_pack_and_reads_its_index_back(tmp_path):
    from cake.weights.cache import Entry

    rng = np.random.default_rng(1)

    def entry(n: int) -> tuple[Entry, np.ndarray, list[int]]:
        data = rng.integers(0, 256, n, np.uint8)
        sums = chunk_sums(data, SMALL_CHUNK)
        return (
            Entry("data", "uint8", (n,), n, entry_digest(n, SMALL_CHUNK, sums)),
            data,
            sums,
        )

    (a, da, sa), (b, db, sb), (old, dold, _) = (
        entry(3 * SMALL_CHUNK - 5),
        entry(100),
        entry(77),
    )
    c = WeightCache(tmp_path)
    c.write(a, SMALL_CHUNK, 0, da[:SMALL_CHUNK].tobytes(), sa[0])
    assert c.write(b, SMALL_CHUNK, 0, db.tobytes(), sb[0]) == 100
    (pack,) = (tmp_path / "packs").glob("*.pack")
    (index,) = (tmp_path / "packs").glob("*.index")
    assert pack.stat().st_size == 3 * SMALL_CHUNK + 100  # b after a's whole room
    with open(index, "a") as f:
        f.write(f"e {'0' * 64} 0 -5 0\n")  # damaged: skipped, not a crash
        f.write(f"c {a.digest} 0123")  # a torn last line: a crash mid-append
    # the layout before packs: a complete entry in blobs/ is still held
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / old.digest).write_bytes(dold.tobytes())
    r = WeightCache(tmp_path)  # a restarted worker
    assert [r.held(e, SMALL_CHUNK) for e in (a, b, old)] == [SMALL_CHUNK, 100, 77]
    np.testing.assert_array_equal(r.array(b), db)
    np.testing.assert_array_equal(r.array(old), dold)
    with pytest.raises(CakeError, match="does not hold"):
        r.array(a)
    for k in (1, 2):  # a goes on in place, in the first pack
        piece = da[k * SMALL_CHUNK : (k + 1) * SMALL_CHUNK].tobytes()
        r.write(a, SMALL_CHUNK, k * SMALL_CHUNK, piece, sa[k])
    np.testing.assert_array_equal(r.array(a), da)
    assert len(list((tmp_path / "packs").iterdir())) == 2
    # the index claims bytes the pack lacks (the pack lost its tail): not held
    os.truncate(pack, 2 * SMALL_CHUNK)
    r = WeightCache(tmp_path)
    assert [r.held(e, SMALL_CHUNK) for e in (a, b)] == [2 * SMALL_CHUNK, 0]
    for f in (tmp_path / "packs").iterdir():  # removing the files empties it
        f.unlink()
    assert r.held(a, SMALL_CHUNK) == 0
    r.write(b, SMALL_CHUNK, 0, db.tobytes(), sb[0])  # into a new pack
    np.testing.assert_array_equal(WeightCache(tmp_path).array(b), db)


def test_a_failed_cache_write_is_raised_and_not_claimed(tmp_path, monkeypatch):
    import errno

    import cake.weights.cache as cache_mod
    from cake.weights.cache import Entry

    data = np.random.default_rng(3).integers(0, 256, 3 * SMALL_CHUNK, np.uint8)
    sums = chunk_sums(data, SMALL_CHUNK)
    e = Entry("data", "uint8", data.shape, data.nbytes,
              entry_digest(data.nbytes, SMALL_CHUNK, sums))  # fmt: skip
    pwrite, calls = os.pwrite, []

    def full(fd, buf, at):  # the disk fills up at the second chunk
        calls.append(at)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return pwrite(fd, buf, at)

    monkeypatch.setattr(cache_mod.os, "pwrite", full)
    c = WeightCache(tmp_path)
    piece = [data[k * SMALL_CHUNK : (k + 1) * SMALL_CHUNK].tobytes() for k in range(3)]
    assert c.write(e, SMALL_CHUNK, 0, piece[0], sums[0]) == SMALL_CHUNK
    with pytest.raises(OSError, match="No space"):
        c.write(e, SMALL_CHUNK, SMALL_CHUNK, piece[1], sums[1])
    assert c.held(e, SMALL_CHUNK) == SMALL_CHUNK  # the failed chunk is not claimed
    assert WeightCache(tmp_path).held(e, SMALL_CHUNK) == SMALL_CHUNK  # nor logged
    for k in (1, 2):  # the master sends from there again: in place
        c.write(e, SMALL_CHUNK, k * SMALL_CHUNK, piece[k], sums[k])
    np.testing.assert_array_equal(c.array(e), data)


def test_bad_manifest_and_flags_fail_in_one_line(tmp_path):
    with pytest.raises(CakeError, match="bad weights manifest"):
        Manifest.from_bytes(b'{"config": {}, "tensors": [{"name": 1}]}')
    p = cake_proc("worker", "--cache-dir", str(tmp_path), "--layers", "0-1")
    assert p.wait(60) != 0
    assert "--cache-dir is for a worker without a model" in p.stderr
    assert "Traceback" not in p.stderr


def test_auto_topology_probes_and_fills_a_worker_without_model(tiny, tmp_path):
    whole = _greedy(tiny)
    port = free_port()
    w = _stream_worker(tmp_path / "cache", port)
    try:
        # a slow master (20 ms per forward): the plan gives the worker layers
        r = Proc([PYTHON, "-m", "tests.netutil", "run", "--model", str(tiny),
                  "--backend", "slownumpy", "--topology", "auto", "--workers",
                  f"127.0.0.1:{port}", "--raw", "-t", "0", "-n", "12", PROMPT],
                 env={"CAKE_TEST_DELAY": "0.02"})  # fmt: skip
        assert r.wait(240) == 0, r.stderr
        assert r.stdout.strip() == whole.strip()
        assert "random float weights" in w.stderr  # it probed the master's shape
        assert f"127.0.0.1:{port}: layers" in r.stderr, r.stderr
        assert "streaming" in r.stderr and "receiving" in w.stderr
    finally:
        assert w.terminate() == 0, w.stderr


@pytest.mark.parametrize(
    "backend", [b for b in ("jax", "mlx") if b in available_backends()]
)
def test_streamed_worker_on_another_backend(tiny, tmp_path, backend):
    whole = _greedy(tiny)
    port = free_port()
    topo = write_topology(tmp_path / "t.yaml", {"w": (port, "0-1")})
    w = _stream_worker(tmp_path / "cache", port, backend=backend)
    try:
        assert _greedy(tiny, topology=topo) == whole
        assert f"on {backend}" in w.stderr
    finally:
        assert w.terminate() == 0, w.stderr


def test_a_chunk_longer_than_a_write_lands_whole(tmp_path):
    """Chunks go to the pack in WRITE_PIECE writes (2 MiB ones cost 10x
    here): every piece lands, the last one short, and reads back as sent."""
    piece = WRITE_PIECE
    chunk = 2 * piece + piece // 2 + 3  # two whole writes and a short one
    data = np.random.default_rng(0).integers(0, 256, 2 * chunk - 7, np.uint8)
    sums = chunk_sums(data, chunk)
    e = Entry("data", "uint8", data.shape, data.nbytes,
              entry_digest(data.nbytes, chunk, sums))  # fmt: skip
    c = WeightCache(tmp_path)
    assert c.write(e, chunk, 0, data[:chunk], sums[0]) == chunk
    assert c.write(e, chunk, chunk, data[chunk:], sums[1]) == data.nbytes
    c.close()
    np.testing.assert_array_equal(WeightCache(tmp_path).array(e), data)


def test_a_broken_weight_connection_resumes_and_an_unreachable_port_uses_zeromq(
    tmp_path, capfd, monkeypatch
):
    """The TCP side channel (cake/net/bulk.py) breaks after 20 chunks, the
    worker alive: the next pass goes on from what it holds. Then a port the
    master cannot reach: the chunks go over ZeroMQ."""
    monkeypatch.setattr(stream, "CHUNK", SMALL_CHUNK)
    model = smollm_gguf()
    cache, port = tmp_path / "cache", free_port()
    w = _stream_worker(cache, port)
    config, tensors = open_checkpoint(model)
    m, _ = stream.build_manifest(config, tensors, [(29, 30)], SMALL_CHUNK)
    send, cut = bulk.send, []

    def cut_send(conn, token, chunks, *rest):
        def chunks_then_cut():
            for k, item in enumerate(chunks):
                if k == 20 and not cut:
                    cut.append(k)
                    conn.shutdown(socket.SHUT_RDWR)  # the next send fails
                yield item

        return send(conn, token, chunks_then_cut(), *rest)

    monkeypatch.setattr(stream.bulk, "send", cut_send)
    c = _client(model, port, [(29, 30)])
    try:
        _hello(c)
        sent = stream.stream_weights(c, config, tensors, [(29, 30)])
        assert cut == [20]
        assert m.nbytes <= sent <= m.nbytes + stream.WINDOW * SMALL_CHUNK
        err = capfd.readouterr().err
        assert "the weight connection broke" in err and "resuming the weights" in err
        assert "over a TCP connection" in err
        CachedSource(WeightCache(cache), m)  # every entry whole and checked
        for p in (cache / "packs").iterdir():
            p.unlink()
        connect = bulk.connect

        def unreachable(address, offer):  # the worker's port behind a firewall
            return connect(address, {**offer, "port": free_port()})

        monkeypatch.setattr(stream.bulk, "connect", unreachable)
        assert stream.stream_weights(c, config, tensors, [(29, 30)]) == m.nbytes
        assert "over ZeroMQ" in capfd.readouterr().err
        CachedSource(WeightCache(cache), m)
    finally:
        c.close()
        assert w.terminate() == 0, w.stderr


def test_the_weight_port_takes_only_its_token():
    listener = bulk.Listener("tcp://127.0.0.1:0")
    try:
        with socket.create_connection(("127.0.0.1", listener.port)) as s:
            s.sendall(bytes(bulk.TOKEN_BYTES))  # not the token offered
            with pytest.raises(bulk.Broken, match="wrong token"):
                listener.accept()
        conn, token = bulk.connect("tcp://127.0.0.1:1", listener.offer())
        with conn:
            assert token == listener.token
            conn.sendall(token)
            listener.accept().close()
    finally:
        listener.close()
    assert bulk.connect("tcp://127.0.0.1:1", {"port": "x"}) is None


def test_a_worker_with_keys_takes_its_weights_over_curve(tiny, tmp_path, capfd):
    """No bare side channel beside Curve: the worker offers no TCP port."""
    keys = tmp_path / "keys"
    create_keys("w", keys)
    create_keys("m", keys)
    (keys / "allow").mkdir()
    shutil.copy(keys / "m.key", keys / "allow" / "m.key")
    cache, port = tmp_path / "cache", free_port()
    w = _stream_worker(cache, port, "--secret-key", str(keys / "w.key_secret"),
                       "--allow-keys", str(keys / "allow"))  # fmt: skip
    c = _client(tiny, port, [(0, 2)])
    c.server_key = load_public_key(keys / "w.key")
    c.client_keys = load_secret_key(keys / "m.key_secret")
    try:
        c.connect()  # streams the weights, then loads the layers
        err = capfd.readouterr().err
        assert "over ZeroMQ" in err and "over a TCP" not in err
        assert c.info["layers"]
    finally:
        c.close()
        assert w.terminate() == 0, w.stderr


@pytest.mark.parametrize("tcp", [True, False])
def test_a_master_without_digests_sends_the_manifest_in_parts(
    tmp_path, capfd, monkeypatch, tcp
):
    """No digests of the file yet: the master checksums each part of the
    manifest as the last part's chunks go; a damaged chunk of a later part is
    sent again, and the worker ends with every entry of the whole manifest."""
    monkeypatch.setattr(stream, "CHUNK", SMALL_CHUNK)
    monkeypatch.setattr(stream, "PART_BYTES", 4 * SMALL_CHUNK)  # many parts
    monkeypatch.setenv("CAKE_CACHE_DIR", str(tmp_path / "master"))  # no digests
    model = smollm_gguf()
    cache, port = tmp_path / "cache", free_port()
    w = _stream_worker(cache, port)
    config, tensors = open_checkpoint(model)
    parts = []
    grow = stream._Tensors.grow

    def counted(self, nbytes):
        new = grow(self, nbytes)
        parts.append(len(new))
        return new

    monkeypatch.setattr(stream._Tensors, "grow", counted)
    damaged = []

    def corrupt(k: int, data: bytes) -> bytes:
        if k == 30 and not damaged:
            damaged.append(k)
            return bytes([data[0] ^ 1]) + data[1:]
        return data

    c = _client(model, port, [(29, 30)])
    try:
        _hello(c)
        sent = stream.stream_weights(
            c, config, tensors, [(29, 30)], corrupt=corrupt, tcp=tcp
        )
        assert damaged == [30] and sum(1 for n in parts if n) > 3
        err = capfd.readouterr().err
        assert "checksummed as they go" in err and PATHS[tcp] in err
        assert "sending from there again" in err
        monkeypatch.setattr(stream._Tensors, "grow", grow)
        m, _ = stream.build_manifest(config, tensors, [(29, 30)], SMALL_CHUNK)
        assert (
            m.nbytes + SMALL_CHUNK <= sent <= m.nbytes + 2 * stream.WINDOW * SMALL_CHUNK
        )
        CachedSource(WeightCache(cache), m)  # every entry whole and checked
        # the digests are kept now: the next stream sends the whole manifest
        assert stream.stream_weights(c, config, tensors, [(29, 30)], tcp=tcp) == 0
        assert "holds the weights already" in capfd.readouterr().err
    finally:
        c.close()
        assert w.terminate() == 0, w.stderr
