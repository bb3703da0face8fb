"""JAX backend properties: batched = sequential, split = whole, bfloat16, compiles, caches."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("jax")

from cake.backends import Step  # noqa: E402
from cake.backends.jax import JaxBackend  # noqa: E402
from cake.backends.jax.cache import MIN_CACHE_BUCKET, bucket  # noqa: E402
from cake.backends.jax.linear import cpu_kernel_formats  # noqa: E402
from cake.errors import (  # noqa: E402
    CacheFullError,  # noqa: E402
    CakeError,
    ContextLengthError,
)
from cake.shard import Shard  # noqa: E402
from cake.weights.checkpoint import open_checkpoint  # noqa: E402
from tests.models import make_checkpoint  # noqa: E402

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {
        arch: make_checkpoint(arch, tmp_path_factory.mktemp(arch))
        for arch in ("llama", "mistral", "qwen3", "mixtral", "qwen2_moe")
    }


def load(folder, shard=None, dtype="float32", max_context=64, max_sequences=4):
    config, tensors = open_checkpoint(folder)
    if shard is None:
        shard = Shard.whole(config.num_hidden_layers)
    return JaxBackend().load(
        config,
        shard,
        tensors,
        dtype,
        max_context=max_context,
        max_sequences=max_sequences,
    )


def ids(n: int) -> list[int]:
    return [int(t) for t in RNG.integers(3, 128, n)]


def run(stage, batch: list[tuple[int, int, list[int]]]) -> list[np.ndarray]:
    """One forward of (seq_id, position, new tokens) entries; each one's logits (n, V)."""
    n = max(len(t) for _, _, t in batch)
    x = np.zeros((len(batch), n), np.int32)
    for b, (_, _, toks) in enumerate(batch):
        x[b, : len(toks)] = toks
    step = Step(
        tuple(s for s, _, _ in batch),
        tuple(p for _, p, _ in batch),
        tuple(len(t) for _, _, t in batch),
        all_logits=True,
    )
    out = stage.forward(x, step)
    assert out.shape == (len(batch), n, 128) and out.dtype == np.float32
    return [out[b, : len(t)] for b, (_, _, t) in enumerate(batch)]


def test_devices_and_availability():
    assert JaxBackend.is_available()
    devs = JaxBackend.devices()
    assert devs and devs[0].kind in ("cpu", "gpu", "tpu")


@pytest.mark.parametrize("arch", ["llama", "mistral", "mixtral", "qwen2_moe"])
def test_batched_equals_sequential(folders, arch):
    # three sequences, different prompt lengths; the second step mixes decode,
    # a continued prefill and a new prompt; mistral's window (6) is crossed
    a, b, c = ids(5), ids(9), ids(7)
    steps = [
        [(10, 0, a[:4]), (11, 0, b)],
        [(10, 4, a[4:]), (11, 9, ids(3)), (12, 0, c)],
        [(10, 5, ids(1)), (11, 12, ids(1)), (12, 7, ids(2))],
    ]
    batched = load(folders[arch])
    together = [run(batched, s) for s in steps]
    alone = load(folders[arch])
    for i, s in enumerate(steps):
        for j, entry in enumerate(s):
            (single,) = run(alone, [entry])
            np.testing.assert_allclose(together[i][j], single, atol=2e-5, rtol=1e-5)


def test_split_equals_whole(folders):
    folder = folders["qwen3"]
    whole = load(folder)
    parts = [
        load(folder, Shard(0, 1, 3, embed=True)),
        load(folder, Shard(1, 1, 3)),  # no layers: passes hidden through
        load(folder, Shard(1, 3, 3, head=True)),
    ]
    prompt = np.array([ids(6)], np.int32)
    for pos, x in [(0, prompt), (6, np.array([[7]], np.int32))]:
        step = Step((0,), (pos,), (x.shape[1],), all_logits=True)
        h = x
        for p in parts:
            h = p.forward(h, step)
            # NumPy, owned and writable: no JAX array leaks out of a stage
            assert type(h) is np.ndarray and h.flags.writeable
            if not p.shard.head:
                assert h.dtype == np.float32 and h.shape == (*x.shape, 64)
        np.testing.assert_allclose(h, whole.forward(x, step), atol=2e-5, rtol=1e-5)


def test_bfloat16_checkpoint_close_to_float32(tmp_path):
    folder = make_checkpoint("llama", tmp_path / "bf16", dtype="bfloat16")
    prompt = np.array([ids(8)], np.int32)
    step = Step((0,), (0,), (8,))
    ref = load(folder, dtype="float32").forward(prompt, step)
    first = load(folder, Shard(0, 2, 3, embed=True), dtype="bfloat16")
    last = load(folder, Shard(2, 3, 3, head=True), dtype="bfloat16")
    h = first.forward(prompt, step)
    assert h.dtype == ml_dtypes.bfloat16  # activations cross as the model dtype
    logits = last.forward(h, step)
    assert logits.dtype == np.float32 and logits.shape == (1, 128)
    # on a GPU the matmuls take bfloat16 inputs too: 2.2 % on an H100 (1e-3 on the CPU)
    assert np.abs(logits - ref).max() < 5e-2 * np.abs(ref).max()


@pytest.mark.parametrize("kernel", [True, False], ids=["attention-kernel", "xla"])
def test_decode_never_waits_for_the_next_cache_bucket(folders, monkeypatch, kernel):
    """The XLA attention reads a static bucket of cache positions: a batch's
    first decode step also compiles decode over the whole cache, and each
    bucket's first use the next bucket in the background, so crossing into it
    waits for nothing. The CPU attention kernel takes each sequence's length
    at run time: decode compiles once, whatever the cache holds."""
    from cake.backends.jax.programs import Shape
    from cake.kernels.cpu import attention

    if kernel and not (cpu_kernel_formats() and attention.available()):
        pytest.skip("no CPU kernels here")
    monkeypatch.setenv("CAKE_CPU_ATTENTION", "1" if kernel else "0")
    first = MIN_CACHE_BUCKET  # the smallest cache bucket
    stage = load(folders["llama"], max_context=2 * first)
    prompt = ids(4)
    lg = stage.forward(np.array([prompt], np.int32), Step((0,), (0,), (4,)))
    tok = int(lg[0].argmax())
    lg = stage.forward(np.array([[tok]], np.int32), Step((0,), (4,), (1,)))
    stage.programs.drain()
    # the prompt's and the decode step; on the XLA path also decode in the
    # next bucket (which here is the whole cache), compiled ahead
    assert (stage.trace_count == 2) if kernel else (stage.trace_count >= 3)
    nxt = Shape(1, 1, 2 * first, False, None, False)
    assert stage.programs.known(nxt) != kernel
    traced, waited = stage.trace_count, stage.compile_s
    for pos in range(5, first + 20):  # through the first bucket into the next
        tok = int(lg[0].argmax())
        lg = stage.forward(np.array([[tok]], np.int32), Step((0,), (pos,), (1,)))
    assert stage.compile_s == waited  # no step waited for a compile
    if kernel:
        assert stage.trace_count == traced


def test_xla_attention_decode_builds_no_library_fusions(folders, monkeypatch):
    """A decode program on XLA's attention (CPU) hands XLA no YNNPACK fusions,
    whose pipelines are built at a program's first run, mid-generation (see
    stage.NO_LIBRARY_FUSIONS); the tokens are checked against NumPy elsewhere.
    An XLA that knows no such option compiles the program as it is."""
    from cake.backends.jax import programs
    from cake.backends.jax.programs import Shape

    monkeypatch.setenv("CAKE_CPU_ATTENTION", "0")
    stage = load(folders["llama"])
    stage.forward(np.array([ids(4)], np.int32), Step((0,), (0,), (4,)))
    stage.forward(np.array([[5]], np.int32), Step((0,), (4,), (1,)))
    stage.programs.drain()
    decodes = [p for s, p in stage.programs._ready.items() if s.width == 1]
    assert decodes and all("__ynn_fusion" not in p.as_text() for p in decodes)

    seen = []
    p = programs.Programs(
        stage._lower, lambda shape: {"xla_cpu_no_such_option_here": True}
    )
    orig = stage._lower

    def lower(shape):
        seen.append(shape)
        return orig(shape)

    p._lower = lower
    shape = Shape(1, 2, stage.max_context, False, None, False)
    assert p.get(shape) is not None and seen == [shape]


@pytest.mark.parametrize("kernel", [True, False], ids=["attention-kernel", "xla"])
def test_each_step_updates_the_cache_in_place(folders, monkeypatch, kernel):
    """The cache is donated to every step: XLA writes the new keys and values
    into it, never into a copy of the whole buffer (a lost donation once cost
    a copy of the cache per token, 100 ms at 4096 positions)."""
    from cake.kernels.cpu import attention

    if kernel and not (cpu_kernel_formats() and attention.available()):
        pytest.skip("no CPU kernels here")
    monkeypatch.setenv("CAKE_CPU_ATTENTION", "1" if kernel else "0")
    stage = load(folders["llama"])
    for step, x in [
        (Step((0,), (0,), (4,)), [ids(4)]),
        (Step((0,), (4,), (1,)), [[5]]),
    ]:
        before = stage._cache
        stage.forward(np.array(x, np.int32), step)
        assert before.is_deleted() and not stage._cache.is_deleted()


def test_programs_compile_ahead_once_and_hand_over():
    """A queued shape is compiled once: by the thread, or by the step that needs
    it before the thread got to it; a failed compile raises in the step that
    needs it; drain() returns once every queued shape is settled."""
    import threading
    import time

    from cake.backends.jax.programs import Programs, Shape

    lowered, gate = [], threading.Event()

    class Lowered:
        def __init__(self, shape):
            self.shape = shape

        def compile(self):
            if self.shape.batch == 1:
                gate.wait(10)  # holds the thread on the first shape
            if self.shape.batch == 0:
                raise ValueError("no such shape")
            return ("program", self.shape)

    def lower(shape):
        lowered.append(shape)
        return Lowered(shape)

    progs = Programs(lower)
    a, b, bad = (Shape(n, 1, 256, False, None, False) for n in (1, 2, 0))
    for s in (a, a, b, bad):
        progs.ahead(s)
    deadline = time.monotonic() + 10
    while lowered[:1] != [a] and time.monotonic() < deadline:
        time.sleep(0.01)  # the thread is at a; b and bad wait in the queue
    assert progs.get(b) == ("program", b)  # compiled here, not waited for
    with pytest.raises(ValueError, match="no such shape"):
        progs.get(bad)
    gate.set()
    progs.drain()
    assert progs.get(a) == ("program", a) and progs.compiled_ahead == 1
    assert lowered == [a, b, bad]  # each once
    progs.close()
    progs.ahead(Shape(3, 1, 256, False, None, False))  # closed: ignored
    assert lowered == [a, b, bad]
    assert not progs.known(Shape(3, 1, 256, False, None, False))


def test_a_background_lowering_runs_with_a_short_switch_interval():
    """While the compile thread lowers a step (Python, holding the GIL), the
    interpreter's switch interval is programs.LOWERING_SWITCH_S, so that a
    step on the main thread gets the GIL back quickly; before and after, and
    for a lowering in the foreground, it is what it was."""
    import sys
    import time

    from cake.backends.jax import programs

    seen = {}

    class Lowered:
        def compile(self):
            return "program"

    def lower(shape):
        seen[shape.batch] = sys.getswitchinterval()
        return Lowered()

    deadline = time.monotonic() + 60
    while programs._lowerings and time.monotonic() < deadline:
        time.sleep(0.01)  # another test's stage lowering ahead in the background
    before = sys.getswitchinterval()
    assert before > programs.LOWERING_SWITCH_S
    progs = programs.Programs(lower)
    fg, bg = (programs.Shape(n, 1, 256, False, None, False) for n in (1, 2))
    progs.get(fg)
    progs.ahead(bg)
    progs.drain()
    progs.close()
    assert seen[1] == before
    assert seen[2] == pytest.approx(programs.LOWERING_SWITCH_S)  # microseconds inside
    assert sys.getswitchinterval() == before


def test_buckets():
    assert [bucket(n) for n in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 128]
    assert bucket(3, floor=64) == 64 and bucket(300, cap=256) == 256


def test_release_frees_a_slot_and_full_cache_raises(folders):
    stage = load(folders["mistral"], max_sequences=2)
    fresh = load(folders["mistral"], max_sequences=2)
    one = np.array([ids(5)], np.int32)
    for sid in (1, 2):
        stage.forward(one, Step((sid,), (0,), (5,)))
    other = np.array([ids(7)], np.int32)
    with pytest.raises(CacheFullError):
        stage.forward(other, Step((3,), (0,), (7,)))
    stage.release([1])
    with pytest.raises(CakeError):  # released: its cache is gone
        stage.forward(np.array([[5]], np.int32), Step((1,), (5,), (1,)))
    # the reused slot holds seq 1's stale keys: they must not leak into seq 3
    got = stage.forward(other, Step((3,), (0,), (7,), all_logits=True))
    want = fresh.forward(other, Step((3,), (0,), (7,), all_logits=True))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_context_limits(folders):
    stage = load(folders["llama"], max_context=16)
    with pytest.raises(ContextLengthError):
        stage.forward(np.array([ids(17)], np.int32), Step((0,), (0,), (17,)))
    stage.forward(np.array([ids(16)], np.int32), Step((0,), (0,), (16,)))
    with pytest.raises(ContextLengthError):
        stage.forward(np.array([[5]], np.int32), Step((0,), (16,), (1,)))


@pytest.mark.parametrize("arch", ["mistral", "mixtral"])
def test_long_prefill_matches_numpy(folders, arch):
    # 300 tokens from position 0: attention runs in causal query chunks; the
    # sliding window (6) masks inside every chunk; Mixtral's 600 routed rows
    # run in tiles of 150 (past the CPU kernels' rows: widened products)
    from cake.backends.numpy import NumpyBackend

    config, tensors = open_checkpoint(folders[arch])
    ref = NumpyBackend().load(
        config,
        Shard.whole(3),
        tensors,
        "float32",
        max_context=320,
        max_sequences=1,
    )
    stage = load(folders[arch], max_context=320, max_sequences=2)
    prompt = np.array([ids(300)], np.int32)
    step = Step((0,), (0,), (300,), all_logits=True)
    want = ref.forward(prompt, step)
    np.testing.assert_allclose(stage.forward(prompt, step), want, atol=1e-4, rtol=1e-4)
    # the same prompt in two pieces: no chunking, the cache carries the rest
    (a,) = run(stage, [(1, 0, prompt[0, :170].tolist())])
    (b,) = run(stage, [(1, 170, prompt[0, 170:].tolist())])
    np.testing.assert_allclose(np.concatenate([a, b]), want[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_16_bit_model_keeps_a_16_bit_cache_on_the_cpu(folders, dtype):
    """With the attention kernel the CPU cache is in the model's dtype (half
    the bytes of float32); a prefill past the kernel's rows (XLA's attention
    writes the cache) and decode steps (the kernel reads it) stay close to the
    float32 run."""
    if not cpu_kernel_formats():
        pytest.skip("no CPU kernels here: the cache stays float32")
    folder = folders["mistral"]
    ref = load(folder, max_context=320, max_sequences=1)
    stage = load(folder, dtype=dtype, max_context=320, max_sequences=1)
    assert np.dtype(stage._cache.dtype) == np.dtype(dtype)
    assert stage._cache.nbytes * 2 == ref._cache.nbytes
    prompt = ids(200)
    got = run(stage, [(0, 0, prompt)])[0]
    want = run(ref, [(0, 0, prompt)])[0]
    spread = np.abs(want).max()
    # 16-bit rounding of the cache (and of the hidden states leaving the stage)
    tol = 5e-2 if dtype == "bfloat16" else 4e-3  # as the bfloat16 test above
    assert np.abs(got - want).max() < tol * spread
    last = want
    for i in range(4):
        tok = int(last[-1].argmax())
        (g,) = run(stage, [(0, 200 + i, [tok])])
        (last,) = run(ref, [(0, 200 + i, [tok])])
        assert np.abs(g - last).max() < tol * spread


CACHE_WRITES = r"""
import json, os, sys, time
import jax, jax.numpy as jnp
from cake.backends.jax.backend import enable_compilation_cache
from cake.backends.jax import cache_writes, programs
enable_compilation_cache()
d = jax.config.jax_compilation_cache_dir
def files():
    return sum(len(f) for _, _, f in os.walk(d))
def lower(shape):
    return jax.jit(lambda x: jnp.tanh(x @ x.T) * shape.batch).lower(
        jnp.ones((shape.width, 8), jnp.float32))
progs = programs.Programs(lower)
a, b = (programs.Shape(1, w, 256, False, None, False) for w in (16, 24))
progs.get(a)  # in the foreground: written at once
out = {"after_foreground": files()}
progs.ahead(b)
t = time.monotonic()
while progs.ready(b) is None or time.monotonic() - t < 1.0:  # steps run
    progs.get(a)
    time.sleep(0.005)
out["kept_while_stepping"] = cache_writes.kept()
out["while_stepping"] = files()
time.sleep(1.0)  # the steps pause
out["after_pause"] = files()
out["kept_after_pause"] = cache_writes.kept()
print(json.dumps(out))
"""


def test_a_background_compile_writes_its_cache_entry_once_the_steps_pause(tmp_path):
    """Writing a program to JAX's persistent cache holds the GIL for tens of
    ms; from the background compile thread it waits until no step has run for
    cache_writes.IDLE_S, then lands on disk as JAX would have written it."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "CAKE_CACHE_DIR": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    r = subprocess.run(
        [sys.executable, "-c", CACHE_WRITES], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["after_foreground"] >= 1
    assert got["kept_while_stepping"] >= 1  # the step, and its input's jnp.ones
    assert got["while_stepping"] == got["after_foreground"]
    assert got["kept_after_pause"] == 0
    assert got["after_pause"] > got["while_stepping"]
