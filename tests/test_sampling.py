import numpy as np
import pytest

from cake.errors import CakeError
from cake.sampling import Sampler, SamplingParams, apply_repetition_penalty
from cake.stops import StopMatcher

LOGITS = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], np.float32))


def draw(params: SamplingParams, n: int = 2000) -> np.ndarray:
    s = Sampler(params)
    return np.array([s(LOGITS) for _ in range(n)])


def test_greedy_is_argmax():
    assert Sampler(SamplingParams(temperature=0))(np.array([0.1, 3.0, -1.0])) == 1


def test_same_seed_same_tokens_and_different_seed_differs():
    p = SamplingParams(temperature=1.0, min_p=0.0, seed=7)
    a, b = draw(p, 200), draw(p, 200)
    assert (a == b).all()
    c = draw(SamplingParams(temperature=1.0, min_p=0.0, seed=8), 200)
    assert (a != c).any()


def test_temperature_one_follows_the_distribution():
    toks = draw(SamplingParams(temperature=1.0, min_p=0.0, seed=0), 20000)
    freq = np.bincount(toks, minlength=5) / toks.size
    np.testing.assert_allclose(freq, np.exp(LOGITS), atol=0.015)


def test_top_k_top_p_min_p_restrict_the_support():
    assert set(draw(SamplingParams(1.0, top_k=2, min_p=0.0, seed=0))) == {0, 1}
    # mass 0.5, 0.7, 0.85: top-p 0.8 keeps the three most likely tokens
    assert set(draw(SamplingParams(1.0, top_p=0.8, min_p=0.0, seed=0))) == {0, 1, 2}
    # min-p 0.35: keep p >= 0.175
    assert set(draw(SamplingParams(1.0, min_p=0.35, seed=0))) == {0, 1}


def test_repetition_penalty_follows_hf_rule():
    out = apply_repetition_penalty(
        np.array([2.0, -2.0, 1.0], np.float32), [0, 1, 1], 2.0
    )
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0])


def test_bad_parameters_are_cake_errors():
    for kw in ({"temperature": -1}, {"top_p": 0}, {"min_p": 2}, {"top_k": -1}):
        with pytest.raises(CakeError):
            SamplingParams(**kw)


def test_stop_matcher_holds_back_a_partial_stop_string():
    m = StopMatcher(["</s>"])
    assert m.push("Hello <") == ("Hello ", False)
    assert m.push("/") == ("", False)
    assert m.push("s> more") == ("", True)
    m = StopMatcher(["END"])
    assert m.push("E") == ("", False)
    assert m.push("x") == ("Ex", False)
    assert m.push("E", final=True) == ("E", False)


def test_presence_and_frequency_penalties_follow_openai_rule():
    from cake.sampling import apply_openai_penalties

    out = apply_openai_penalties(np.zeros(4, np.float32), {1: 1, 3: 3}, 0.5, 0.25)
    np.testing.assert_allclose(out, [0.0, -0.75, 0.0, -1.25])
    # a strong presence penalty stops greedy from repeating itself
    s = Sampler(SamplingParams(temperature=0, presence_penalty=2.0))
    logits = np.array([1.0, 0.5, 0.0], np.float32)
    assert [s(logits) for _ in range(3)] == [0, 1, 2]


def test_top_logprobs_are_the_log_softmax_of_the_logits():
    from cake.sampling import top_logprobs

    x = np.array([1.0, 3.0, -2.0, 2.5], np.float32)
    ref = x.astype(np.float64) - np.log(np.exp(x.astype(np.float64)).sum())
    value, top = top_logprobs(x, 2, 2)
    assert value == pytest.approx(ref[2])
    assert [i for i, _ in top] == [1, 3]
    np.testing.assert_allclose([v for _, v in top], ref[[1, 3]])


def test_the_earliest_stop_string_wins():
    assert StopMatcher(["b", "a"]).push("xaby") == ("x", True)


def _numpy_draw(logits, temperature, min_p, r):
    """The NumPy form of the draw (sampling.py's, without the kernels)."""
    from cake.sampling import _inverse_cdf

    z = logits.astype(np.float32) / np.float32(temperature)
    w = np.exp(z - z.max())
    w[w < np.float32(min_p)] = 0
    return _inverse_cdf(w, r)


@pytest.mark.parametrize("min_p", [0.0, 0.05])
def test_the_kernel_draw_is_the_numpy_draw(min_p):
    """The CPU kernels' draw (src/sample.cc) over a 49k vocabulary with masked
    tokens: the token NumPy's inverse CDF gives for the same r, but where r
    falls within rounding of a boundary (their exps differ by ~1 ulp), and
    never a masked one nor one under min-p."""
    from cake.kernels import cpu

    if not cpu.available():
        pytest.skip("no CPU kernels here: the sampler draws with NumPy")
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal(49152) * 2).astype(np.float32)
    logits[rng.integers(0, 49152, 5000)] = -np.inf
    rs = rng.random(3000)
    got = [cpu.sample_np(logits, 0.8, min_p, r) for r in rs]
    want = [_numpy_draw(logits, 0.8, min_p, r) for r in rs]
    assert np.mean(np.array(got) == np.array(want)) > 0.999
    w = np.exp((logits - logits.max()) / 0.8)
    assert all(np.isfinite(logits[t]) and w[t] >= min_p for t in got)
    # no finite maximum: no draw here (the sampler falls back to NumPy)
    assert cpu.sample_np(np.full(8, -np.inf, np.float32), 1.0, 0.0, 0.5) is None
    assert cpu.sample_np(np.array([1.0, np.nan], np.float32), 1.0, 0.0, 0.5) is None


def _numpy_kept(logits, temperature, top_k, top_p, min_p):
    """What NumPy's form of the draw keeps (sampling.py's rules)."""
    from cake.sampling import _top_p_mask

    z = logits.astype(np.float32) / np.float32(temperature)
    if top_k and top_k < z.size:
        z[z < np.partition(z, -top_k)[-top_k]] = -np.inf
    w = np.exp(z - z.max())
    kept = w > 0
    if top_p < 1.0:
        kept &= _top_p_mask(w, top_p)
    return kept & (w >= np.float32(min_p))


def _without_kernels(monkeypatch):
    from cake.kernels import cpu

    monkeypatch.setattr(cpu, "sample_np", lambda *a, **k: None)


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_the_kernel_top_k_top_p_draw_is_the_numpy_draw(monkeypatch, ties):
    """src/sample.cc's top-k and top-p (buckets of the weights' exponents, one
    bucket sorted) against NumPy's (a partition and a sort): the same token
    for the same r but where r or the top-p cut falls within rounding of a
    boundary, and never one NumPy's rules leave out; logits with ties (the
    k-th's kept, the top-p cut's by the lower id) and masked tokens."""
    from cake import sampling
    from cake.kernels import cpu

    if not cpu.available():
        pytest.skip("no CPU kernels here: the sampler draws with NumPy")
    rng = np.random.default_rng(7)
    got, want = [], []
    for _ in range(300):
        v = int(rng.choice([9, 300, 49152]))
        logits = rng.standard_normal(v) * rng.choice([1.0, 3.0, 10.0])
        logits = logits.astype(np.float32)
        if ties:
            logits = np.round(logits * 2) / 2
        logits[rng.integers(0, v, v // 10)] = -np.inf
        t = float(rng.choice([0.5, 1.0, 2.0, 5.0]))
        k = int(rng.choice([0, 1, 3, 40]))
        p = float(rng.choice([1.0, 0.3, 0.9, 0.99]))
        mp = float(rng.choice([0.0, 0.05]))
        if not k and p == 1.0:
            p = 0.6
        r = float(rng.random())
        tok = cpu.sample_np(logits, t, mp, r, k, p)
        assert _numpy_kept(logits, t, k, p, mp)[tok], (v, t, k, p, mp, r)
        got.append(tok)
        with monkeypatch.context() as m:
            _without_kernels(m)
            want.append(sampling.draw(logits, t, mp, r, k, p))
    assert np.mean(np.array(got) == np.array(want)) > 0.99


def test_top_k_keeps_ties_and_top_p_cuts_ties_by_the_lower_id(monkeypatch):
    from cake import sampling

    logits = np.array([0.0, 3.0, 3.0, 1.0, 3.0, 3.0, -1.0], np.float32)
    rs = np.linspace(0, 1, 50, endpoint=False)

    def support(**kw):
        return {sampling.draw(logits, 1.0, 0.0, float(r), **kw) for r in rs}

    for kernels in (True, False):
        with monkeypatch.context() as m:
            if not kernels:
                _without_kernels(m)
            assert support(top_k=2) == {1, 2, 4, 5}  # the 2nd largest is tied
            # four tokens of ~0.24 each: 0.3 of the mass takes the first two
            assert support(top_p=0.3) == {1, 2}
            assert support(top_k=1, top_p=0.99) == {1, 2, 4, 5}
            assert support(top_k=10**30) == support()  # past the vocabulary: off
