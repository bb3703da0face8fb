"""The fused attention kernel (kernels/cpu/src/attention.cc) against a NumPy reference.

The reference (tests/attention_ref.py) is written from the definition in
float64. attention_np (ctypes), the jitted FFI call, and the AVX2 / plain C++
builds must match it within float32 rounding, leave every other cache entry
untouched, and the FFI call must update a donated cache without copying it.
Whether a token's bits depend on its call: test_kernels_attention_calls.py.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import replace
from functools import partial

import ml_dtypes
import numpy as np
import pytest

from cake.kernels.cpu import attention as att
from tests.attention_ref import (
    GQA,
    MHA,
    Case,
    attention_ref,
    check,
    kwargs,
    make_inputs,
)


@pytest.fixture(scope="module")
def lib(lib):
    assert att.available(), "the CPU kernels were built without attention.cc"
    return lib


CASES = [
    *(
        Case(f"decode-t{p}", *GQA, slots=(1,), positions=(p,), lengths=(1,), T=256)
        for p in (0, 1, 17, 200, 255)
    ),
    Case("decode-mha", *MHA, slots=(3,), positions=(40,), lengths=(1,), layer=0),
    Case(
        "batch3-padding",
        *GQA,
        slots=(2, 0, 3),
        positions=(5, 0, 30),
        lengths=(3, 1, 2),
        L=3,
    ),
    Case(
        "batch3-mha-empty-row",
        *MHA,
        slots=(0, 99, 2),  # the empty row's slot and position are never read
        positions=(9, -5, 3),
        lengths=(2, 0, 1),
        L=2,
    ),
    Case("chunk5", *GQA, slots=(2,), positions=(7,), lengths=(5,), L=5),
    Case("chunk5-mha", *MHA, slots=(0,), positions=(11,), lengths=(5,), L=5),
    Case("window4-decode", *GQA, slots=(1,), positions=(10,), lengths=(1,), window=4),
    Case(
        "window4-chunk", *MHA, slots=(3,), positions=(2,), lengths=(5,), L=5, window=4
    ),
    Case("window-wide", *GQA, slots=(0,), positions=(1,), lengths=(3,), L=3, window=40),
    # enough work for the thread pool: sequences in parallel; one sequence with
    # its kv heads' query heads split between threads
    Case(
        "batch8-t200",
        *GQA,
        slots=tuple(range(8)),
        positions=tuple(190 + 3 * i for i in range(8)),
        lengths=(1,) * 8,
        T=256,
        S=8,
    ),
    Case(
        "decode-t1500", *GQA, slots=(0,), positions=(1500,), lengths=(1,), T=2048, S=1
    ),
    # keys in several chunks (attention.cc's kChunk, 256 positions), merged
    Case(
        "batch2-chunks",
        *GQA,
        slots=(1, 0),
        positions=(300, 777),
        lengths=(1, 1),
        T=1024,
        S=2,
    ),
    Case(
        "prefill-chunks-window",
        *GQA,
        slots=(0,),
        positions=(200,),
        lengths=(120,),
        L=120,
        T=512,
        S=1,
        window=300,
    ),
    Case(
        "softcap-chunks",
        *MHA,
        slots=(0,),
        positions=(600,),
        lengths=(1,),
        T=700,
        S=1,
        softcap=2.0,
    ),
    # tokens blocked per unit, odd head sizes (vector tails), a window across blocks
    Case(
        "prefill-hd128",
        8,
        2,
        128,
        slots=(1, 0),
        positions=(0, 20),
        lengths=(40, 33),
        L=40,
        T=96,
        S=2,
    ),
    Case(
        "prefill-hd80-window",
        6,
        2,
        80,
        slots=(0,),
        positions=(3,),
        lengths=(37,),
        L=37,
        window=9,
    ),
    Case("hd40", 2, 1, 40, slots=(1,), positions=(12,), lengths=(4,), L=4),
    Case("hd6", 3, 1, 6, slots=(0, 1), positions=(0, 2), lengths=(2, 1), L=2, T=8),
    # Gemma: a query scale other than 1 / sqrt(hd), and soft-capped scores (a
    # cap of 2 bites on these random scores, whose spread is about 1 / scale)
    Case("scale", *GQA, slots=(1,), positions=(20,), lengths=(3,), L=3, scale=0.3),
    Case(
        "softcap-decode", *GQA, slots=(0,), positions=(40,), lengths=(1,), softcap=2.0
    ),
    Case(
        "softcap-window-chunk",
        *MHA,
        slots=(2, 0),
        positions=(9, 0),
        lengths=(6, 4),
        L=6,
        window=4,
        scale=0.2,
        softcap=2.0,
    ),
    Case(
        "softcap-batch8-t200",
        *GQA,
        slots=tuple(range(8)),
        positions=tuple(190 + 3 * i for i in range(8)),
        lengths=(1,) * 8,
        T=256,
        S=8,
        softcap=3.0,
    ),
]
BY_NAME = {c.name: c for c in CASES}


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.name)
def test_attention_np_equals_reference(lib, c):
    qkv, cos, sin, cache, *ints = make_inputs(c)
    before = cache.copy()
    ref = attention_ref(qkv, cos, sin, before, *ints, **kwargs(c))
    out = att.attention_np(qkv, cos, sin, cache, *ints, **kwargs(c))
    check(c, out, cache, before, ref)


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])
@pytest.mark.parametrize("c", CASES, ids=lambda c: c.name)
def test_portable_paths(lib, portable_libs, march, c):
    raw = portable_libs[march].raw
    qkv, cos, sin, cache, *ints = make_inputs(c)
    before = cache.copy()
    ref = attention_ref(qkv, cos, sin, before, *ints, **kwargs(c))
    out = att._call(raw, qkv, cos, sin, cache, *ints, **kwargs(c))
    check(c, out, cache, before, ref)


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.name)
def test_jit_equals_reference(lib, c):
    jax = pytest.importorskip("jax")
    qkv, cos, sin, cache, *ints = make_inputs(c)
    ref = attention_ref(qkv, cos, sin, cache, *ints, **kwargs(c))
    f = jax.jit(partial(att.attention, **kwargs(c)))
    out, new_cache = f(qkv, cos, sin, cache, *ints)
    check(c, out, new_cache, cache, ref)


KV16 = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
CASES16 = [
    c
    for c in CASES
    if c.name in ("decode-t17", "decode-t200", "batch2-chunks", "prefill-chunks-window")
] + CASES[-3:]


@pytest.mark.parametrize("march", ["native", "x86-64-v3", "x86-64"])
@pytest.mark.parametrize("kv", sorted(KV16))
@pytest.mark.parametrize("c", CASES16, ids=lambda c: c.name)
def test_a_16_bit_cache(lib, portable_libs, march, kv, c):
    """A float16 / bfloat16 cache: each written k and v is the float32 one
    rounded to the type (to within one unit of the last place: the kernel
    turns k in float32, the reference in float64), no other entry changes, and
    the output is the reference's over the cache as written."""
    raw = lib.raw if march == "native" else portable_libs[march].raw
    qkv, cos, sin, cache, *ints = make_inputs(c)
    cache = cache.astype(KV16[kv])
    before = cache.copy()
    out = att._call(raw, qkv, cos, sin, cache, *ints, **kwargs(c))
    want, want_cache, written = attention_ref(
        qkv, cos, sin, before.astype(np.float32), *ints, **kwargs(c), attend_over=cache
    )
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5, err_msg=c.name)
    got = cache[written].astype(np.float64)
    ulp = np.spacing(np.abs(want_cache[written]).astype(KV16[kv])).astype(np.float64)
    assert (np.abs(got - want_cache[written]) <= ulp).all()
    nearest = want_cache[written].astype(np.float32).astype(KV16[kv])
    assert (cache[written] == nearest).mean() > 0.99  # rounded to nearest
    np.testing.assert_array_equal(
        cache.view(np.uint16)[~written], before.view(np.uint16)[~written]
    )


@pytest.mark.parametrize("kv", sorted(KV16))
def test_a_16_bit_cache_in_jit_equals_the_ctypes_call(lib, kv):
    jax = pytest.importorskip("jax")
    c = CASES16[-1]
    qkv, cos, sin, cache, *ints = make_inputs(c)
    cache = cache.astype(KV16[kv])
    want_cache = cache.copy()
    want = att.attention_np(qkv, cos, sin, want_cache, *ints, **kwargs(c))
    out, new_cache = jax.jit(partial(att.attention, **kwargs(c)))(
        qkv, cos, sin, cache, *ints
    )
    assert new_cache.dtype == KV16[kv]
    np.testing.assert_array_equal(np.asarray(out), want)
    np.testing.assert_array_equal(
        np.asarray(new_cache).view(np.uint16), want_cache.view(np.uint16)
    )


def _two_layers(cache, qkv0, qkv1, cos, sin, *ints, nh, window):
    outs = []
    for layer, qkv in enumerate((qkv0, qkv1)):
        out, cache = att.attention(
            qkv, cos, sin, cache, *ints, n_heads=nh, layer=layer, window=window
        )
        outs.append(out)
    return *outs, cache


def test_jit_two_layers_donated_cache_is_not_copied(lib):
    jax = pytest.importorskip("jax")
    c = BY_NAME["batch3-padding"]
    qkv0, cos, sin, cache, *ints = make_inputs(c, seed=1)
    qkv1 = make_inputs(c, seed=2)[0]
    before = cache.copy()
    ref0 = attention_ref(qkv0, cos, sin, before, *ints, n_heads=c.nh, layer=0)
    ref1 = attention_ref(qkv1, cos, sin, ref0[1], *ints, n_heads=c.nh, layer=1)
    f = jax.jit(partial(_two_layers, nh=c.nh, window=0), donate_argnums=0)
    args = (qkv0, qkv1, cos, sin, *ints)

    hlo = f.lower(jax.numpy.asarray(cache), *args).compile().as_text()
    shape = "f32[" + ",".join(map(str, cache.shape)) + "]"
    copies = [
        ln.strip()
        for ln in hlo.splitlines()
        if re.search(r"\bcopy(-start)?\(", ln) and shape in ln
    ]
    assert not copies, "XLA copies the donated cache:\n" + "\n".join(copies)
    assert hlo.count('custom_call_target="cake_cpu_attention"') == 2
    # the check can see a copy: without donation XLA copies the cache once
    undonated = jax.jit(partial(_two_layers, nh=c.nh, window=0))
    hlo = undonated.lower(jax.numpy.asarray(cache), *args).compile().as_text()
    assert (
        sum(bool(re.search(r"\bcopy\(", ln)) and shape in ln for ln in hlo.splitlines())
        == 1
    )

    dev_cache = jax.device_put(cache)
    out0, out1, new_cache = f(dev_cache, *args)
    assert dev_cache.is_deleted(), "the donated cache should have been consumed"
    new_cache = np.asarray(new_cache)
    written = ref0[2] | ref1[2]
    np.testing.assert_allclose(np.asarray(out0), ref0[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out1), ref1[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        new_cache[written], ref1[1][written], rtol=1e-6, atol=1e-6
    )
    np.testing.assert_array_equal(new_cache[~written], before[~written])


def _bad(c: Case, **change):
    qkv, cos, sin, cache, slots, positions, lengths = make_inputs(c)
    for name, (i, v) in change.items():
        {"slots": slots, "positions": positions, "lengths": lengths}[name][i] = v
    return qkv, cos, sin, cache, slots, positions, lengths


BAD = [
    ("slot", {"slots": (1, 4)}, "slots", -7),
    ("negative-slot", {"slots": (0, -1)}, "slots", -7),
    ("position-at-T", {"positions": (0, 62)}, "position", -8),  # 62 + 3 tokens > T = 64
    ("negative-position", {"positions": (0, -1)}, "position", -8),
    ("length-over-L", {"lengths": (0, 4)}, "lengths", -6),
    ("zero-scale", {"scale": 0.0}, "scale", -9),
    ("negative-softcap", {"softcap": -1.0}, "softcap", -9),
    ("infinite-softcap", {"softcap": np.inf}, "softcap", -9),
]


@pytest.mark.parametrize(
    "change,match,rc", [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_arguments(lib, change, match, rc):
    c = BY_NAME["batch3-padding"]  # L = 3, T = 64, S = 4
    change = dict(change)
    floats = {k: change.pop(k) for k in ("scale", "softcap") if k in change}
    c = replace(c, **floats)
    scale_softcap = (att._scale(c.hd, c.scale), c.softcap)
    qkv, cos, sin, cache, slots, positions, lengths = _bad(c, **change)
    before = cache.copy()
    with pytest.raises(ValueError, match=match):
        att.attention_np(qkv, cos, sin, cache, slots, positions, lengths, **kwargs(c))
    # the C entry point checks too, before writing anything
    out = np.zeros((3, c.L, c.nh * c.hd), np.float32)
    fn = lib.raw.cake_attention
    fn.argtypes = (
        [ctypes.c_void_p] * 4
        + [ctypes.c_int]
        + [ctypes.c_void_p] * 3
        + [ctypes.c_int64] * 10
        + [ctypes.c_float] * 2
        + [ctypes.c_void_p]
    )

    def call(kv_type: int) -> int:
        return fn(
            *(a.ctypes.data for a in (qkv, cos, sin, cache)),
            kv_type,
            *(a.ctypes.data for a in (slots, positions, lengths)),
            *(3, c.L, c.nh, c.nkv, c.hd, c.n_layers, c.S, c.T, c.layer, c.window),
            *scale_softcap,
            out.ctypes.data,
        )

    assert call(0) == rc
    assert call(3) in (rc, -10)  # an unknown cache type: refused too
    np.testing.assert_array_equal(cache, before)
    assert not out.any()


def test_bad_static_arguments(lib):
    c = BY_NAME["batch3-padding"]
    qkv, cos, sin, cache, *ints = make_inputs(c)
    with pytest.raises(ValueError, match="layer"):
        att.attention_np(qkv, cos, sin, cache, *ints, n_heads=c.nh, layer=2)
    with pytest.raises(ValueError, match="window"):
        att.attention_np(qkv, cos, sin, cache, *ints, n_heads=c.nh, layer=0, window=-1)
    with pytest.raises(ValueError, match="n_heads"):
        att.attention_np(qkv, cos, sin, cache, *ints, n_heads=8, layer=0)
    with pytest.raises(ValueError, match="qkv"):
        att.attention_np(qkv[..., :-1], cos, sin, cache, *ints, n_heads=c.nh, layer=0)
    with pytest.raises(ValueError, match="cos"):
        att.attention_np(qkv, cos[:, :1], sin, cache, *ints, n_heads=c.nh, layer=0)
    with pytest.raises(ValueError, match="float32"):
        att.attention_np(
            qkv, cos, sin, cache.astype(np.float64), *ints, n_heads=c.nh, layer=0
        )
    with pytest.raises(ValueError, match="contiguous"):
        att.attention_np(qkv, cos, sin, cache[:, :, ::-1], *ints, n_heads=c.nh, layer=0)


def test_jit_bad_slot_fails_at_run_time(lib):
    jax = pytest.importorskip("jax")
    c = BY_NAME["batch3-padding"]
    qkv, cos, sin, cache, slots, positions, lengths = _bad(c, slots=(1, 4))
    f = jax.jit(partial(att.attention, **kwargs(c)))
    with pytest.raises(Exception, match="slot is out of range"):
        jax.block_until_ready(f(qkv, cos, sin, cache, slots, positions, lengths))
