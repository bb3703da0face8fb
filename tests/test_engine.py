"""The continuous-batching engine (cake.engine) on a tiny checkpoint: batched,
chunked, reused and replayed runs give the tokens of one stream run alone."""

from __future__ import annotations

import threading

import pytest

import cake
from cake.engine import Engine
from cake.errors import ContextLengthError
from cake.pipeline import Pipeline
from cake.request import QueueFullError, Request
from cake.sampling import SamplingParams
from tests.netutil import ForgetfulStage, fresh, run_together, tiny_model

GREEDY = SamplingParams(temperature=0)
PROMPTS = [[5, 17, 99, 3, 42], [1, 2, 3], list(range(10, 60)), [7]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module", params=["numpy", "jax", "jax-overlap"])
def model(request, tiny):
    backend, _, overlap = request.param.partition("-")
    m = cake.load(tiny, backend=backend, max_sequences=4, max_context=128)
    if overlap:  # each decode step queued before the last one's tokens are read
        assert m.engine.pipeline.can_dispatch
        m.engine.overlap = True
    yield m
    m.close()


def alone(model, prompt, n=12, params=GREEDY) -> list[int]:
    """The tokens of `prompt` run by itself, from an empty cache."""
    m = cake.load(model, backend="numpy", max_context=128)
    try:
        out = []
        for ev in m.engine.events(Request(list(prompt), params, n)):
            out += ev.tokens
        return out
    finally:
        m.close()


@pytest.fixture(scope="module")
def expected(tiny):
    return [alone(tiny, p) for p in PROMPTS]


def test_a_batch_gives_each_sequence_its_own_greedy_tokens(model, expected):
    fresh(model.engine)
    reqs = [Request(p, GREEDY, 12) for p in PROMPTS]
    assert run_together(model.engine, reqs) == expected
    assert [r.stats.cached_tokens for r in reqs] == [0, 0, 0, 0]
    assert all(r.stats.stop_reason == "max_tokens" for r in reqs)


def test_a_long_prompt_is_fed_in_chunks_between_decode_steps(model, expected):
    fresh(model.engine)
    e = model.engine
    seen = []

    class Watch:
        def step(self, kind, batch, tokens, seconds):
            seen.append((kind, batch, tokens))

        def first_token(self, req): ...

        def finished(self, req): ...

    chunk, e.observer, e.prefill_chunk = e.prefill_chunk, Watch(), 16
    try:
        short = Request(PROMPTS[0], GREEDY, 12)
        long = Request(PROMPTS[2], GREEDY, 12)
        got = run_together(e, [short, long])
    finally:
        e.observer, e.prefill_chunk = type(e.observer)(), chunk
    assert got == [expected[0], expected[2]]
    # the 50-id prompt went in as 16 + 16 + 16 + 2 while the short one decoded
    assert [t for k, _, t in seen if k == "prefill"][1:] == [16, 16, 16, 2]
    assert ("decode", 2, 2) in seen


def test_a_next_turn_reuses_the_cached_prefix(model, tiny):
    fresh(model.engine)
    first = Request(PROMPTS[0], GREEDY, 6)
    (answer,) = run_together(model.engine, [first])
    turn = PROMPTS[0] + answer + [9, 8]
    second = Request(turn, GREEDY, 8)
    (got,) = run_together(model.engine, [second])
    # the last drawn token was never fed: the cache holds prompt + answer[:-1]
    assert second.stats.cached_tokens == len(PROMPTS[0]) + len(answer) - 1
    assert got == alone(tiny, turn, 8)


def test_seeded_sampling_does_not_depend_on_the_batch(model, tiny):
    fresh(model.engine)
    hot = SamplingParams(temperature=1.0, min_p=0.0, seed=11)
    reqs = [Request(PROMPTS[1], hot, 10)] + [
        Request(p, GREEDY, 10) for p in PROMPTS[2:]
    ]
    got = run_together(model.engine, reqs)
    assert got[0] == alone(tiny, PROMPTS[1], 10, hot)


def test_a_cancelled_request_frees_its_sequence(tiny):
    m = cake.load(tiny, backend="numpy", max_sequences=1, max_context=128)
    try:
        e = m.engine
        a = Request(PROMPTS[0], GREEDY, 100)
        b = Request(PROMPTS[1], GREEDY, 4)
        e.submit(a), e.submit(b)
        e.step()
        assert e.running == 1 and e.waiting == 1
        e.cancel(a)
        while not b.done:
            e.step()
        assert (
            a.stats.stop_reason == "cancelled" and b.stats.stop_reason == "max_tokens"
        )
    finally:
        m.close()


def test_a_full_queue_and_a_long_prompt_are_refused(tiny):
    m = cake.load(tiny, backend="numpy", max_sequences=1, max_context=32)
    e = Engine(m.pipeline, m.tokenizer, max_sequences=1, max_waiting=2)
    try:
        # one for the idle sequence, then two may wait
        for i in range(3):
            e.submit(Request([i + 1], GREEDY, 4))
        with pytest.raises(QueueFullError):
            e.submit(Request([9], GREEDY, 4))
        with pytest.raises(ContextLengthError):
            e.submit(Request(list(range(40)), GREEDY, 4))
        with pytest.raises(ContextLengthError):
            e.submit(Request([], GREEDY, 4))
    finally:
        e.close()
        m.close()


def test_the_context_ends_a_generation(tiny):
    m = cake.load(tiny, backend="numpy", max_context=16)
    try:
        r = Request(list(range(10)), GREEDY, 100)
        toks = [t for ev in m.engine.events(r) for t in ev.tokens]
        assert r.stats.stop_reason == "context" and len(toks) == 7
    finally:
        m.close()


def test_a_stage_reset_replays_every_running_sequence(tiny, expected):
    """A worker that comes back empty mid-batch: all sequences are fed again from
    position 0 and every output is unchanged."""
    m = cake.load(tiny, backend="numpy", max_sequences=4, max_context=128)
    stages = m.pipeline.stages

    e = Engine(
        Pipeline([ForgetfulStage(stages[0], {2, 5, 6, 11})], 128),
        m.tokenizer,
        max_sequences=4,
    )
    try:
        assert run_together(e, [Request(p, GREEDY, 12) for p in PROMPTS]) == expected
    finally:
        m.close()


def test_the_engine_thread_serves_concurrent_submitters(model, expected):
    fresh(model.engine)
    e = model.engine
    e.start()
    try:
        got = [None] * len(PROMPTS)

        def client(i):
            done = threading.Event()
            toks = []

            def on(ev):
                toks.extend(ev.tokens)
                if ev.finish:
                    done.set()

            e.submit(Request(PROMPTS[i], GREEDY, 12, on_event=on))
            assert done.wait(60)
            got[i] = toks

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert got == expected
    finally:
        e.stop()  # the model stays for the other tests


def test_stage_sequences_check_a_step_against_what_is_held():
    from cake.backends.base import Step
    from cake.errors import CacheFullError, ContextLengthError, PositionError
    from cake.sequence import StageSequences

    held = StageSequences(max_sequences=2, max_context=16)
    step = Step((7, 9), (0, 0), (4, 2))
    assert held.admit(step) == [0, 1]
    held.advance(step)
    assert held.length == {7: 4, 9: 2}
    with pytest.raises(CacheFullError):
        held.admit(Step((3,), (0,), (1,)))
    with pytest.raises(PositionError, match="sequence 9 is at position 2, not 3"):
        held.admit(Step((9,), (3,), (1,)))
    with pytest.raises(ContextLengthError):
        held.admit(Step((7,), (4,), (13,)))
    rewind = Step((7,), (1,), (1,))  # a position below what is held rewinds
    assert held.admit(rewind) == [0]
    held.advance(rewind)
    assert held.length[7] == 2
    held.release([9, 12345])
    assert 9 not in held and len(held) == 1
    assert held.admit(Step((3,), (0,), (1,))) == [1]  # 9's slot is free again


def test_warm_up_compiles_every_shape_the_engine_then_sends(tiny, expected):
    import jax

    m = cake.load(tiny, backend="jax", max_sequences=4, max_context=128)
    compiles = []  # XLA compilations, also those of a step traced before

    def heard(name: str, _seconds: float, **_kw) -> None:
        if name.endswith("backend_compile_duration"):
            compiles.append(name)

    jax.monitoring.register_event_duration_secs_listener(heard)
    try:
        m.engine.prefill_chunk = 16
        shapes, _ = m.engine.warm_up()
        assert shapes == 4 + 4  # decode of 1..4 sequences; chunks of 2, 4, 8, 16
        compiles.clear()  # (none where the persistent cache held these steps)
        # requests that join and leave: every batch size, chunks of every width
        reqs = [Request(p, GREEDY, 12 - i) for i, p in enumerate(PROMPTS)]
        got = run_together(m.engine, reqs)
        assert compiles == []
        assert got == [e[: 12 - i] for i, e in enumerate(expected)]
        assert all(r.stats.compile_s == 0 for r in reqs)
        # a width never warmed compiles, and the prompt's rate leaves it out
        m.engine.prefill_chunk = 64
        fresh_ids = PROMPTS[2][::-1]  # 50 ids sharing no prefix with the parked
        (wide,) = [Request(fresh_ids, GREEDY, 2)]
        run_together(m.engine, [wide])
        st = wide.stats
        assert st.prompt_compile_s > 0 and st.decode_compile_s == 0
        assert st.prompt_compile_tokens == len(fresh_ids)
        assert st.prompt_tokens_per_s == pytest.approx(
            len(fresh_ids) / st.prompt_s  # every prefill step compiled: all time
        )
    finally:
        jax.monitoring.unregister_event_duration_listener(heard)
        m.close()
