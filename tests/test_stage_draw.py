"""Tokens drawn inside the head stage (backends.base.Draw): the JAX stage's
draw, through the CPU kernel and through XLA, gives the host sampler's token
from the same logits and random number; the engine draws in the stage where
it can, and its tokens stay those of the host draw."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax")

import cake  # noqa: E402
from cake.backends import Step  # noqa: E402
from cake.backends.base import Draw  # noqa: E402
from cake.backends.jax import JaxBackend  # noqa: E402
from cake.engine import Engine  # noqa: E402
from cake.kernels import cpu  # noqa: E402
from cake.pipeline import Pipeline  # noqa: E402
from cake.request import Request  # noqa: E402
from cake.sampling import Sampler, SamplingParams, draw_rows  # noqa: E402
from cake.shard import Shard  # noqa: E402
from cake.weights.checkpoint import open_checkpoint  # noqa: E402
from tests.models import make_checkpoint  # noqa: E402
from tests.netutil import (  # noqa: E402
    ForgetfulStage,
    fresh,
    run_together,
    tiny_model,
)

HOT = SamplingParams(temperature=1.0, min_p=0.0, seed=11)
WARM = SamplingParams(temperature=0.7, min_p=0.1, seed=5)
GREEDY = SamplingParams(temperature=0)
PROMPTS = [[5, 17, 99, 3, 42], [1, 2, 3], list(range(10, 60))]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_checkpoint("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "xla"])
def test_the_stage_draws_the_host_samplers_token(llama, kernel):
    """Each step twice at the same positions (the second rewinds the cache):
    once drawing in the stage, once returning logits that the host draws from
    with the same numbers; greedy, temperature, min-p, top-k and top-p rows in
    one batch."""
    if kernel and not cpu.sample_available():
        pytest.skip("no CPU kernels here")
    config, tensors = open_checkpoint(llama)
    stage = JaxBackend().load(
        config,
        Shard.whole(config.num_hidden_layers),
        tensors,
        "float32",
        max_context=64,
        max_sequences=3,
    )
    stage._draw_kernel = kernel  # read when the steps are traced, below
    rng = np.random.default_rng(0)
    seqs = (0, 1, 2)
    x = rng.integers(3, 128, (3, 5), dtype=np.int32)
    stage.forward(x, Step(seqs, (0, 0, 0), (5, 5, 5)))
    pos, drawn = 5, 0
    for _ in range(12):
        rs = (0.0, rng.random(), rng.random())
        # greedy, min-p, and top-k with top-p or either alone
        k, p = [(5, 0.8), (0, 0.6), (20, 1.0)][pos % 3]
        d = Draw((0.0, 0.8, 1.5), (0.0, 0.1, 0.0), rs, (0, 0, k), (1.0, 1.0, p))
        step = Step(seqs, (pos,) * 3, (1, 1, 1), draw=d)
        ids = stage.forward(x[:, -1:], step)
        assert ids.dtype == np.int32 and ids.shape == (3,)
        logits = stage.forward(x[:, -1:], Step(seqs, (pos,) * 3, (1, 1, 1)))
        assert logits.shape == (3, 128)
        assert ids.tolist() == draw_rows(logits, d).tolist()
        drawn += len(set(ids.tolist()))
        x = np.concatenate([x, ids[:, None]], axis=1)
        pos += 1
    assert drawn > 12  # the rows did not all draw one token


@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "xla"])
def test_a_row_with_nan_or_no_finite_logit_draws_nothing(kernel):
    import jax

    from cake.backends.jax import draw as jdraw

    if kernel and not cpu.sample_available():
        pytest.skip("no CPU kernels here")
    logits = np.full((3, 40), -np.inf, np.float32)
    logits[1, 7] = np.nan
    logits[2, 9] = 1.0
    d = Draw((0.5, 0.0, 0.5), (0.0, 0.0, 0.0), (0.25, 0.0, 0.75))
    f = jax.jit(lambda *a: jdraw.draw_tokens(*a, kernel=kernel))
    assert np.asarray(f(logits, *jdraw.host_inputs(d, 3))).tolist() == [-1, -1, 9]
    assert draw_rows(logits, d).tolist() == [-1, -1, 9]
    # a step that asks for logits draws nothing
    assert np.asarray(f(logits, *jdraw.host_inputs(None, 3))).tolist() == [-1] * 3


def test_r_travels_exactly():
    from cake.backends.jax import draw as jdraw

    rs = (0.0, 0.5, 1 - 2**-53, np.random.default_rng(3).random())
    _, _, r, _, _ = jdraw.host_inputs(Draw((1.0,) * 4, (0.0,) * 4, rs), 4)
    k = r.view(np.uint32).astype(np.uint64)
    assert [float((int(hi) << 32 | int(lo)) * 2.0**-53) for hi, lo in k] == list(rs)
    with pytest.raises(ValueError, match="2\\^-53"):
        jdraw.host_inputs(Draw((1.0,), (0.0,), (1e-20,)), 1)


def test_draw_inputs_match_their_array_form_and_repeat():
    from cake.backends.jax import draw as jdraw

    rng = np.random.default_rng(5)
    for b in (1, 3, 8):
        t = tuple(float(x) for x in rng.choice([0.0, 0.3, 0.7, 1.0, 1.3], b))
        mp = tuple(float(x) for x in rng.choice([0.0, 0.05], b))
        rs = tuple(float(x) for x in rng.random(b))
        ks = tuple(int(x) for x in rng.choice([0, 1, 40, 2**40], b))
        ps = tuple(float(x) for x in rng.choice([1.0, 0.9], b))
        inv_t, min_p, r, top_k, top_p = jdraw.host_inputs(Draw(t, mp, rs, ks, ps), b)
        tt = np.array(t)  # the same inputs as array ops
        want = np.divide(1.0, tt, out=np.zeros_like(tt), where=tt != 0)
        np.testing.assert_array_equal(inv_t, want.astype(np.float32))
        np.testing.assert_array_equal(min_p, np.array(mp, np.float32))
        k = (np.array(rs) * 2.0**53).astype(np.uint64)
        halves = np.stack([k >> np.uint64(32), k & np.uint64(0xFFFFFFFF)], 1)
        np.testing.assert_array_equal(r.view(np.uint32), halves.astype(np.uint32))
        # top_k past int32 keeps every token, as 0 does
        want_k = [k if k < 2**31 else 0 for k in ks]
        assert top_k.dtype == np.int32 and top_k.tolist() == want_k
        np.testing.assert_array_equal(top_p, np.array(ps, np.float32))
        again = jdraw.host_inputs(Draw(t, mp, rs, ks, ps), b)  # a repeated step's
        mine = (inv_t, min_p, r, top_k, top_p)
        assert all(x is y for x, y in zip(again, mine, strict=True))
        assert not any(x.flags.writeable for x in again)
    none = jdraw.host_inputs(None, 2)
    assert none[0].tolist() == [-1.0, -1.0] and none[2].shape == (2, 2)
    assert none[3].tolist() == [0, 0] and none[4].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="2\\^-53"):
        jdraw.host_inputs(Draw((1.0,), (0.0,), (float("nan"),)), 1)


def test_a_sampler_spends_one_number_per_token_even_when_a_step_fails():
    s, t = Sampler(HOT), Sampler(HOT)
    first = s.for_device()
    assert s.for_device() == first  # the step failed: the same number again
    logits = np.random.default_rng(1).standard_normal(64).astype(np.float32)
    # the host draw after a step that did not draw spends that number too
    assert s(logits) == t(logits)
    s.record(3)
    assert s.for_device()[2] == t.for_device()[2] != first[2]


def reqs() -> list[Request]:
    return [
        Request(p, q, 10) for p, q in zip(PROMPTS, (HOT, WARM, GREEDY), strict=True)
    ]


def _engine_tokens(model, reqs, stage_draws: bool):
    e = model.engine
    e.stage_draws = stage_draws
    steps = []
    forward = e.pipeline.forward

    def spy(ids, step):
        steps.append(step.draw is not None)
        return forward(ids, step)

    e.pipeline.forward = spy
    try:
        return run_together(e, reqs), steps
    finally:
        del e.pipeline.forward
        e.stage_draws = True
        fresh(e)


@pytest.mark.parametrize("backend", ["jax", "numpy"])
def test_the_engine_draws_in_the_stage_the_host_draws_tokens(tiny, backend):
    """The same tokens whether the head stage draws (jax) or the pipeline draws
    from its logits (numpy), as when the engine draws each one itself."""
    m = cake.load(tiny, backend=backend, max_sequences=3, max_context=128)
    try:
        here, steps_here = _engine_tokens(m, reqs(), stage_draws=False)
        staged, steps = _engine_tokens(m, reqs(), stage_draws=True)
        assert staged == here and all(len(t) == 10 for t in here)
        assert not any(steps_here) and sum(steps) >= 9  # every decode step drew
        # top-k and top-p are drawn in the stage too: the same tokens
        kp = [
            SamplingParams(temperature=0.9, top_p=0.8, seed=1),
            SamplingParams(temperature=1.2, top_k=5, seed=2),
            SamplingParams(temperature=1.0, top_k=20, top_p=0.7, min_p=0.0, seed=3),
        ]
        kp_reqs = [Request(p, q, 10) for p, q in zip(PROMPTS, kp, strict=True)]
        here, _ = _engine_tokens(m, kp_reqs, stage_draws=False)
        kp_reqs = [Request(p, q, 10) for p, q in zip(PROMPTS, kp, strict=True)]
        staged, steps = _engine_tokens(m, kp_reqs, stage_draws=True)
        assert staged == here and sum(steps) >= 9
        # what needs logits or a host-only draw takes them, for the whole step
        for p in (
            SamplingParams(temperature=0.7, repetition_penalty=1.3, seed=1),
            SamplingParams(temperature=0, repetition_penalty=1.3),
        ):
            _, steps = _engine_tokens(m, [Request(PROMPTS[0], p, 4)], True)
            assert not any(steps)
        # OpenAI's penalties count drawn tokens: the first is drawn in the stage
        p = SamplingParams(temperature=0.7, presence_penalty=0.5, seed=1)
        _, steps = _engine_tokens(m, [Request(PROMPTS[0], p, 4)], True)
        assert steps[0] and not any(steps[1:])
        r = Request(PROMPTS[0], GREEDY, 4, logprobs=2)
        _, steps = _engine_tokens(m, [r], True)
        assert not any(steps)
    finally:
        m.close()


def test_a_replay_after_a_reset_draws_the_same_sampled_tokens(tiny):
    """A worker that comes back empty while the stage draws: the seeded tokens
    are those of a run with no failure (each sampler spends its numbers once)."""
    m = cake.load(tiny, backend="jax", max_sequences=3, max_context=128)
    try:
        stage = m.pipeline.stages[-1]
        assert stage.draws

        class Forgetful(ForgetfulStage):
            draws = True

        want, _ = _engine_tokens(m, reqs(), stage_draws=True)
        e = Engine(
            Pipeline([Forgetful(stage, {3, 7, 12})], 128),
            m.tokenizer,
            max_sequences=3,
        )
        assert run_together(e, reqs()) == want
    finally:
        m.close()


def test_nan_logits_fail_the_request_with_one_clear_error(tiny):
    m = cake.load(tiny, backend="numpy", max_sequences=1, max_context=128)
    try:
        inner = m.pipeline.stages[-1]

        class Broken:
            shard = inner.shard

            def forward(self, x, step):
                return np.full_like(inner.forward(x, step), np.nan)

            def release(self, ids):
                inner.release(ids)

        e = Engine(Pipeline([Broken()], 128), m.tokenizer, max_sequences=1)
        r = Request(PROMPTS[0], HOT, 4)
        events = list(e.events(r))
        assert r.stats.stop_reason == "error"
        assert "NaN" in str(events[-1].error)
    finally:
        m.close()


@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "xla"])
def test_the_stage_draws_top_k_ties_and_top_p_cuts_as_the_host(kernel):
    """Top-k keeps the k-th logit's ties, top-p cuts ties by the lower id: the
    in-step draw (kernel or XLA) keeps what the host keeps."""
    import jax

    from cake.backends.jax import draw as jdraw

    if kernel and not cpu.sample_available():
        pytest.skip("no CPU kernels here")
    row = np.array([0.0, 3.0, 3.0, 1.0, 3.0, 3.0, -1.0], np.float32)
    rs = tuple(i / 64 for i in range(64))  # multiples of 2^-53
    logits = np.tile(row, (len(rs), 1))
    f = jax.jit(lambda *a: jdraw.draw_tokens(*a, kernel=kernel))
    n = len(rs)
    for k, p, want in ((2, 1.0, {1, 2, 4, 5}), (0, 0.3, {1, 2}), (1, 0.99, None)):
        d = Draw((1.0,) * n, (0.0,) * n, rs, (k,) * n, (p,) * n)
        ids = np.asarray(f(logits, *jdraw.host_inputs(d, n)))
        assert ids.tolist() == draw_rows(logits, d).tolist()
        assert want is None or set(ids.tolist()) == want
