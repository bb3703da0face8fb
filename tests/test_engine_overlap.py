"""Overlap (cake.engine): each decode step is queued on the device, fed with
the ids the step before it drew, before the engine reads that step's tokens.
Forced on here (on the CPU the JAX stage runs each step inside its call, so
overlap is off by default): the tokens, stop reasons and cached prefixes are
those of the same runs without it, including runs that end on a token while
a step after it is already queued."""

from __future__ import annotations

import numpy as np
import pytest

import cake
from cake.backends.base import Draw, Step
from cake.errors import CakeError
from cake.request import Request
from cake.sampling import Sampler, SamplingParams
from tests.netutil import fresh, run_together, tiny_model

GREEDY = SamplingParams(temperature=0)
PROMPTS = [[5, 17, 99, 3, 42], [1, 2, 3], list(range(10, 60)), [7]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def pair(tiny):
    """The same tiny model twice on the JAX backend: without overlap, with it
    (its dispatches counted: how many were fed the ids of an earlier one)."""
    plain = cake.load(tiny, backend="jax", max_sequences=4, max_context=64)
    over = cake.load(tiny, backend="jax", max_sequences=4, max_context=64)
    assert not plain.engine.overlap and not over.engine.pipeline.asynchronous
    over.engine.overlap = True
    pipe = over.engine.pipeline
    inner, counts = pipe.dispatch, {"chained": 0, "fresh": 0}

    def dispatch(ids, step):
        counts["fresh" if isinstance(ids, np.ndarray) else "chained"] += 1
        return inner(ids, step)

    pipe.dispatch = dispatch
    over.counts = counts
    yield plain, over
    over.close()
    plain.close()


def both(pair, make) -> tuple[list, list]:
    """(tokens, requests) of `make()`'s requests run together, without and
    with overlap, each from empty caches."""
    out = []
    for m in pair:
        fresh(m.engine)
        reqs = make()
        out.append((run_together(m.engine, reqs), reqs))
    return out[0], out[1]


def test_overlap_queues_steps_ahead_and_changes_no_token(pair):
    hot = SamplingParams(temperature=0.9, top_p=0.9, top_k=20, min_p=0.02, seed=3)
    warm = SamplingParams(temperature=0.7, seed=5)

    def make():
        return [
            Request(PROMPTS[0], GREEDY, 20),
            Request(PROMPTS[1], hot, 17),
            Request(PROMPTS[2], warm, 9),
            Request(PROMPTS[3], GREEDY, 1),
        ]

    _, over = pair
    before = dict(over.counts)
    (plain_toks, plain_reqs), (over_toks, over_reqs) = both(pair, make)
    assert over_toks == plain_toks
    assert [len(t) for t in over_toks] == [20, 17, 9, 1]
    assert [r.stats.stop_reason for r in over_reqs] == ["max_tokens"] * 4
    # most decode steps were fed the ids of the one before, on the device
    chained = over.counts["chained"] - before["chained"]
    assert chained >= 8 and chained > over.counts["fresh"] - before["fresh"]


def test_a_stop_string_or_eos_ends_the_run_with_a_step_queued_after_it(pair):
    plain, over = pair
    fresh(plain.engine)
    (ref,) = run_together(plain.engine, [Request(PROMPTS[0], GREEDY, 24)])
    dec = plain.tokenizer.decode
    # the first token past the 4th whose word the text before it lacks
    k = next(i for i in range(4, 24) if dec([ref[i]]).strip() not in dec(ref[:i]))
    stop = dec([ref[k]]).strip()

    (p, _), (o, orq) = both(pair, lambda: [Request(PROMPTS[0], GREEDY, 24, (stop,))])
    assert o == p == [ref[: k + 1]] and orq[0].stats.stop_reason == "stop"
    # a token taken as EOS (the tiny tokenizer has none): not appended, and
    # the step queued behind it fed it; its next turn still reuses the prefix
    k = next(i for i in range(4, 24) if ref[i] not in ref[:i])
    for m in pair:
        m.engine._eos = frozenset({ref[k]})
    try:
        (p, _), (o, orq) = both(pair, lambda: [Request(PROMPTS[0], GREEDY, 24)])
        assert o == p == [ref[: k + 1]] and orq[0].stats.stop_reason == "eos"
        turn = PROMPTS[0] + ref[:k] + [9, 8]
        got = []
        for m in pair:  # each on top of the caches the first turn left
            req = Request(turn, GREEDY, 6)
            got.append((run_together(m.engine, [req]), req.stats.cached_tokens))
        assert got[1] == got[0] and got[0][1] == len(PROMPTS[0]) + k
    finally:
        for m in pair:
            m.engine._eos = frozenset(m.tokenizer.eos_token_ids)


def test_the_context_and_a_cancel_end_runs_as_without_overlap(pair):
    def make():
        return [Request(list(range(50)), GREEDY, 100), Request(PROMPTS[1], GREEDY, 30)]

    (p, pr), (o, orq) = both(pair, make)
    assert o == p and orq[0].stats.stop_reason == "context"
    assert len(o[0]) == 64 - 50 + 1
    # a cancel between two rounds: the queued step's tokens are not taken
    _, over = pair
    e = over.engine
    fresh(e)
    a, b = Request(PROMPTS[0], GREEDY, 40), Request(PROMPTS[1], GREEDY, 12)
    seen = {id(a): [], id(b): []}
    for r in (a, b):
        r.on_event = lambda ev, r=r: seen[id(r)].extend(ev.tokens)
        e.submit(r)
    while len(seen[id(a)]) < 5:
        e.step()
    e.cancel(a)
    n = len(seen[id(a)])
    while not b.done:
        e.step()
    assert a.stats.stop_reason == "cancelled" and len(seen[id(a)]) == n
    fresh(pair[0].engine)
    (ref_b,) = run_together(pair[0].engine, [Request(PROMPTS[1], GREEDY, 12)])
    assert seen[id(b)] == ref_b
    e.warm_up(batches=[1], widths=[1])  # idle again: nothing left queued


def test_a_sampler_draws_ahead_from_the_numbers_it_would_spend_in_order():
    p = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    one, two = Sampler(p), Sampler(p)
    rs = []
    for _ in range(4):
        rs.append(one.for_device()[2])
        one.record(1)
    first, second = two.for_device()[2], two.for_device(ahead=1)[2]
    assert two.for_device()[2] == first  # the same until it is recorded
    two.record(1)
    assert (first, second) == tuple(rs[:2]) and two.for_device()[2] == second
    two.record(1)
    assert two.for_device(ahead=1)[2] == rs[3]
    assert not Sampler(SamplingParams(presence_penalty=0.5)).draws_ahead


def test_a_jax_stage_chains_dispatched_steps_as_forward_steps(pair):
    plain, over = pair
    (a,), (b,) = plain.pipeline.stages, over.pipeline.stages
    for st in (a, b):
        st.release([0, 1])
    g = Draw((0.0, 0.0), (0.0, 0.0), (0.0, 0.0))
    prompt = np.array([PROMPTS[0], PROMPTS[0][::-1]], np.int32)
    ids = a.forward(prompt, Step((0, 1), (0, 0), (5, 5), draw=g)).reshape(2, 1)
    handle = b.dispatch(prompt, Step((0, 1), (0, 0), (5, 5), draw=g))
    want, got = [], []
    for i in range(5):
        step = Step((0, 1), (5 + i, 5 + i), (1, 1), draw=g)
        got.append(handle)
        handle = b.dispatch(handle, step)
        want.append(ids.ravel().tolist())
        ids = a.forward(ids, step).reshape(2, 1)
    assert [h.result().tolist() for h in got] == want
    with pytest.raises(CakeError, match="as many rows"):
        b.dispatch(handle, Step((0,), (10,), (1,), draw=Draw((0.0,), (0.0,), (0.0,))))
    for st in (a, b):
        st.release([0, 1])


def test_overlap_is_on_where_the_stage_runs_its_steps_after_the_call(tiny, monkeypatch):
    # XLA's attention on the CPU: its programs run after their call returns
    monkeypatch.setenv("CAKE_CPU_ATTENTION", "0")
    m = cake.load(tiny, backend="jax", max_context=64)
    try:
        assert m.pipeline.asynchronous and m.engine.overlap
        out = [
            t
            for ev in m.engine.events(Request([1, 2, 3], GREEDY, 8))
            for t in ev.tokens
        ]
        monkeypatch.setenv("CAKE_OVERLAP", "0")
        e = type(m.engine)(m.pipeline, m.tokenizer)
        assert not e.overlap
        fresh(m.engine)
        assert [
            t for ev in e.events(Request([1, 2, 3], GREEDY, 8)) for t in ev.tokens
        ] == out
        e.close()
    finally:
        m.close()
