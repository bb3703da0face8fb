"""Split equals whole across processes: real workers on loopback, every backend."""

from __future__ import annotations

import numpy as np
import pytest

import cake
from cake.backends.base import Step, available_backends
from cake.net.remote import RemoteStage
from cake.pipeline import Pipeline, load_local_stage
from cake.shard import Shard
from cake.weights.checkpoint import open_checkpoint
from tests.netutil import free_port, start_worker, tiny_model, write_topology

PROMPT = "w5 w17 w99 w3 w42 w7 w64 w12"
IDS = [5, 17, 99, 3, 42, 7, 64, 12]
OTHERS = [b for b in ("jax", "mlx") if b in available_backends()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def whole(tiny):
    m = cake.load(tiny, backend="numpy")
    text = "".join(m.generate(PROMPT, max_tokens=12, temperature=0))
    logits = m.pipeline.forward(np.array([IDS], np.int32), _step())
    m.close()
    return text, logits


def _step() -> Step:
    return Step((0,), (0,), (len(IDS),), all_logits=True)


@pytest.fixture(scope="module")
def started():
    procs = []
    yield procs
    for p in procs:
        assert p.terminate() == 0, p.stderr  # SIGTERM: a clean exit


def _worker(started, model, layers, backend="numpy"):
    port = free_port()
    started.append(start_worker(model, layers, port, backend=backend))
    return port


def _check(model, topo, whole, tmp_path):
    text, logits = whole
    m = cake.load(model, backend="numpy", topology=topo, retry_timeout=10)
    try:
        assert any(isinstance(s, RemoteStage) for s in m.pipeline.stages)
        got = m.pipeline.forward(np.array([IDS], np.int32), _step())
        np.testing.assert_allclose(got, logits, atol=1e-4, rtol=1e-4)
        assert "".join(m.generate(PROMPT, max_tokens=12, temperature=0)) == text
    finally:
        m.close()


def test_two_numpy_workers_hold_every_layer(tiny, whole, started, tmp_path):
    p1, p2 = _worker(started, tiny, "0-1"), _worker(started, tiny, "2")
    topo = write_topology(tmp_path / "t.yaml", {"a": (p1, "0-1"), "b": (p2, "2")})
    _check(tiny, topo, whole, tmp_path)


@pytest.fixture(scope="module")
def other_workers(tiny, started):
    # one worker per non-NumPy backend: the first on layer 1, the second on layer 2
    return {
        b: (_worker(started, tiny, str(i + 1), b), str(i + 1))
        for i, b in enumerate(OTHERS)
    }


@pytest.mark.parametrize("backend", OTHERS)
def test_numpy_master_with_worker_on(backend, tiny, whole, other_workers, tmp_path):
    port, layers = other_workers[backend]
    topo = write_topology(tmp_path / "t.yaml", {backend: (port, layers)})
    _check(tiny, topo, whole, tmp_path)


@pytest.mark.skipif(len(OTHERS) < 2, reason="needs two non-NumPy backends")
def test_mixed_backends_two_workers(tiny, whole, other_workers, tmp_path):
    topo = write_topology(tmp_path / "t.yaml", dict(other_workers))
    _check(tiny, topo, whole, tmp_path)


def test_bfloat16_travels_as_two_bytes(tmp_path, started):
    model = tiny_model(tmp_path / "bf16", dtype="bfloat16")
    port = _worker(started, model, "1-2")
    topo = write_topology(tmp_path / "t.yaml", {"w": (port, "1-2")})
    m = cake.load(model, backend="numpy", topology=topo)
    try:
        remote = m.pipeline.stages[1]
        assert isinstance(remote, RemoteStage) and remote.dtype == "bfloat16"
        sizes = []
        request = remote.client.request

        def spy(header, data=None, **kw):
            reply, frame = request(header, data, **kw)
            if data is not None:
                sizes.append((data.nbytes, len(frame.buffer), header["shape"]))
            return reply, frame

        remote.client.request = spy
        got = m.pipeline.forward(np.array([IDS], np.int32), _step())
        ((sent, received, shape),) = sizes
        assert shape == [1, len(IDS), 64] and sent == received == len(IDS) * 64 * 2
        # the same pipeline in one process: identical numbers
        config, tensors = open_checkpoint(model)
        local = [
            load_local_stage(
                config, s, tensors, "numpy", "bfloat16", max_context=64, max_sequences=1
            )
            for s in (
                Shard(0, 1, 3, embed=True),
                Shard(1, 3, 3),
                Shard(3, 3, 3, head=True),
            )
        ]
        want = Pipeline(local, 64).forward(np.array([IDS], np.int32), _step())
        np.testing.assert_allclose(got, want, atol=1e-2, rtol=1e-2)
    finally:
        m.close()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_a_mixture_of_experts_across_two_workers(arch, started, tmp_path):
    """Each MoE family split over two worker processes (a non-NumPy backend
    where there is one, holding only its layers' experts): the single-process
    numbers and greedy text."""
    model = tiny_model(tmp_path / arch, arch)
    m = cake.load(model, backend="numpy")
    want = (
        "".join(m.generate(PROMPT, max_tokens=12, temperature=0)),
        m.pipeline.forward(np.array([IDS], np.int32), _step()),
    )
    m.close()
    first = OTHERS[0] if OTHERS else "numpy"
    p1 = _worker(started, model, "0-1", first)
    p2 = _worker(started, model, "2")
    topo = write_topology(tmp_path / "t.yaml", {"a": (p1, "0-1"), "b": (p2, "2")})
    _check(model, topo, want, tmp_path)


@pytest.mark.skipif("jax" not in OTHERS, reason="jax is not installed")
def test_a_warmed_up_worker_compiles_nothing_for_the_master(
    tiny, whole, started, tmp_path
):
    """`cake worker --warm-up` runs every step shape before it says it is ready:
    a master's run then waits on no compilation there (its replies say so);
    a worker without it compiles on the master's first steps, and the master's
    statistics count that as compile time."""
    warm, cold = free_port(), free_port()
    started.append(start_worker(tiny, "1-2", warm, "--warm-up", backend="jax"))
    assert "warmed up" in started[-1].stderr, started[-1].stderr
    started.append(start_worker(tiny, "1-2", cold, backend="jax"))
    assert "warmed up" not in started[-1].stderr
    text, _ = whole
    for port, compiles in ((warm, False), (cold, True)):
        topo = write_topology(tmp_path / f"t{port}.yaml", {"w": (port, "1-2")})
        m = cake.load(tiny, backend="numpy", topology=topo, retry_timeout=10)
        try:
            remote = [s for s in m.pipeline.stages if isinstance(s, RemoteStage)]
            assert "".join(m.generate(PROMPT, max_tokens=12, temperature=0)) == text
            assert (remote[0].compile_s > 0) == compiles, remote[0].compile_s
            assert m.pipeline.compile_s == remote[0].compile_s  # the run's stats
        finally:
            m.close()


@pytest.mark.skipif("jax" not in OTHERS, reason="jax is not installed")
def test_an_assigned_worker_warms_up_as_it_loads(tiny, whole, started, tmp_path):
    """A worker a master assigns its layers to (no --layers) runs the warm-up
    when it loads them, before it answers the load."""
    port = free_port()
    w = start_worker(tiny, None, port, "--warm-up", backend="jax")
    started.append(w)
    assert "warmed up" not in w.stderr  # no layers yet
    topo = write_topology(tmp_path / "t.yaml", {"w": (port, "1-2")})
    m = cake.load(tiny, backend="numpy", topology=topo, retry_timeout=10)
    try:
        w.wait_for("warmed up", 10)  # printed before its reply to the load
        assert "".join(m.generate(PROMPT, max_tokens=12, temperature=0)) == whole[0]
        assert m.pipeline.compile_s == 0
    finally:
        m.close()
