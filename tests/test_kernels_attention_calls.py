"""The fused attention kernel gives each token the same bits whatever call it
comes in: a prompt fed in any chunks (a reused prefix, a busy server's chunks,
decode steps), and calls back to back while the pool's threads write the cache.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from cake.kernels import cpu
from cake.kernels.cpu import attention as att
from tests.attention_ref import GQA, Case, attention_ref, check, kwargs, make_inputs


@pytest.fixture(scope="module")
def lib(lib):
    assert att.available(), "the CPU kernels were built without attention.cc"
    return lib


@pytest.mark.parametrize("march", ["native", "x86-64-v3", "x86-64"])
@pytest.mark.parametrize("split", [(37,), (20, 17), (36, 1), (1,) * 37, (16, 5, 16)])
def test_a_prompt_gives_the_same_bits_in_any_chunks(lib, portable_libs, march, split):
    """Each token's output does not depend on the chunk it came in: a reused
    prefix, a busy server's chunks and a decode step give the bits of one call."""
    raw = lib.raw if march == "native" else portable_libs[march].raw
    c = Case("chunks", *GQA, slots=(0,), positions=(3,), lengths=(37,), L=37, T=64)
    qkv, cos, sin, cache, *ints = make_inputs(c)
    whole = att._call(raw, qkv, cos, sin, cache.copy(), *ints, **kwargs(c))
    got, at, cache2 = [], 0, cache.copy()
    for n in split:
        part = [a[:, at : at + n] for a in (qkv, cos, sin)]
        pos = np.asarray([3 + at], np.int32)
        length = np.asarray([n], np.int32)
        got.append(att._call(raw, *part, cache2, ints[0], pos, length, **kwargs(c)))
        at += n
    np.testing.assert_array_equal(np.concatenate(got, axis=1), whole)


@pytest.mark.parametrize("kv", ["float32", "float16"])
@pytest.mark.parametrize(
    "split", [(600,), (300, 300), (253, 3, 344), (256, 256, 88), (599, 1)]
)
def test_a_long_prompt_gives_the_same_bits_in_any_chunks(lib, kv, split):
    """Past one chunk of keys (256 positions) a row's keys are scored, weighed
    and merged chunk by chunk, at boundaries that depend on positions only:
    the calls a prompt is fed in still change no bit of any token's output."""
    c = Case("long", *GQA, slots=(0,), positions=(3,), lengths=(600,), L=600, T=640)
    qkv, cos, sin, cache, *ints = make_inputs(c)
    cache = cache.astype(np.float16) if kv == "float16" else cache
    whole = att.attention_np(qkv, cos, sin, cache.copy(), *ints, **kwargs(c))
    got, at, cache2 = [], 0, cache.copy()
    for n in split:
        part = [a[:, at : at + n] for a in (qkv, cos, sin)]
        pos = np.asarray([3 + at], np.int32)
        length = np.asarray([n], np.int32)
        got.append(att.attention_np(*part, cache2, ints[0], pos, length, **kwargs(c)))
        at += n
    np.testing.assert_array_equal(np.concatenate(got, axis=1), whole)


# One sequence, one kv head, one long chunk: a single write unit of 256 rows
# (hd 256, slow to write), and 32 units of tokens that read them in order of
# their tokens, each faster than the writer. Without the wait between the two
# phases a thread that did not take the write would read rows still unwritten.
ONE_WRITER = Case(
    "one-writer",
    4,
    1,
    256,
    slots=(0,),
    positions=(0,),
    lengths=(256,),
    L=256,
    T=256,
    S=1,
)


@pytest.mark.parametrize("busy_cores", [False, True], ids=["idle", "busy"])
def test_the_cache_writes_come_before_any_read(lib, busy_cores):
    """The cache writes are the first phase of the threads' job: a thread
    waits until every taken write is done before it reads the cache. Two
    inputs alternate on one cache, back to back (the pool's workers spinning,
    so they join at once): a read of an unwritten row would see the other
    input's, and change the output. With busy processes on every core, some
    calls run with a worker and some without, some with a worker preempted
    mid-write: each must finish and give the same bits."""
    if cpu.num_threads() < 2:
        pytest.skip("one thread: no pool")
    c = ONE_WRITER
    inputs = [make_inputs(c, seed) for seed in (0, 1)]
    want = []
    for qkv, cos, sin, cache, *ints in inputs:
        before = cache.copy()
        out = att.attention_np(qkv, cos, sin, cache, *ints, **kwargs(c))
        check(
            c,
            out,
            cache,
            before,
            attention_ref(qkv, cos, sin, before, *ints, **kwargs(c)),
        )
        want.append(out)
    shared = inputs[0][3].copy()
    busy = []
    if busy_cores:
        spin = [sys.executable, "-c", "while True: pass"]
        busy = [subprocess.Popen(spin) for _ in range(os.cpu_count() or 2)]
    try:
        for i in range(400):
            qkv, cos, sin, _, *ints = inputs[i % 2]
            got = att.attention_np(qkv, cos, sin, shared, *ints, **kwargs(c))
            np.testing.assert_array_equal(got, want[i % 2], err_msg=f"call {i}")
    finally:
        for p in busy:
            p.kill()
            p.wait()
