"""Placement: a table of Llama-3-70B-sized clusters, optimality against brute force,
baselines, dropped devices, clear errors, the topology a plan becomes, and a
quantized 70B placed by the bytes it stores."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from cake.bench import DeviceProfile, synthetic_config
from cake.pipeline import expected_shape
from cake.plan import (
    PlanError,
    checkpoint_sizes,
    even_split,
    layer_seconds,
    memory_share_split,
    model_sizes,
    plan,
    to_topology,
)
from cake.topology import dump_topology, parse_topology, placements
from cake.weights.names import layer_tensor_names

# Llama-3-70B: 80 layers, hidden 8192, intermediate 28672, 8 KV heads of 128, bf16
SIZES = model_sizes(synthetic_config("llama3-70b"), "bfloat16")
CONTEXT = 4096
PER_LAYER = SIZES.layer_bytes + SIZES.kv_bytes_per_token * CONTEXT  # 1.73 GB


def dev(name: str, gb: float, ms: float, rtt_ms: float | None = 0.3, mb_s=1000.0):
    """A device holding `gb` GB, decoding one 70B layer in `ms` ms; rtt None: the
    master's own process."""
    t = ms / 1e3
    return DeviceProfile(
        name=name,
        backend="jax",
        device_kind="gpu",
        device_name=name,
        memory_bytes=int(gb * 1e9),
        model="test",
        dtype="bfloat16",
        layers_probed=2,
        short_context=128,
        long_context=CONTEXT,
        prefill_chunk=512,
        decode_batch=8,
        decode_s=(t, t),
        decode_batch_s=(2 * t, 2 * t),
        prefill_s=(50 * t, 50 * t),
        layer_bytes=SIZES.layer_bytes,
        kv_bytes_per_1k=SIZES.kv_bytes_per_token * 1000,
        address=None if rtt_ms is None else f"{name}.lan:10128",
        rtt_s=None if rtt_ms is None else rtt_ms / 1e3,
        bandwidth_bytes_s=None if rtt_ms is None else mb_s * 1e6,
    )


def gpu(name="gpu0"):  # 24 GB, ~900 GB/s
    return dev(name, 24, 2.0)


MAC, LAPTOP = dev("mac16", 16, 9.0), dev("laptop8", 8, 35.0)
CPU64 = dev("cpu64", 64, 45.0, mb_s=110)

# (case, profiles, devices expected to be left out)
CASES = [
    (
        "everyone helps",
        [dev("master", 128, 60.0, None), gpu("gpu0"), gpu("gpu1"), MAC, LAPTOP, CPU64],
        set(),
    ),
    (
        "a slow board is not needed",
        [dev("master", 128, 30.0, None), gpu("gpu0"), gpu("gpu1"), dev("pi", 8, 400)],
        {"pi"},
    ),
    (
        "a hop over a slow link costs more than it saves",
        [dev("master", 256, 40.0, None), gpu("gpu0"), dev("wan", 8, 35.0, 60.0, 5)],
        {"wan"},
    ),
    (
        "a slow box is kept when its memory is needed",
        [
            dev("master", 16, 9.0, None),
            gpu("gpu0"),
            gpu("gpu1"),
            CPU64,
            dev("old", 64, 200.0),
        ],
        set(),
    ),  # fmt: skip
    (
        "no master profile: workers only",
        [gpu("gpu0"), gpu("gpu1"), dev("cpu128", 128, 45.0)],
        set(),
    ),
    (
        "a small master runs no layers",
        [dev("master", 5, 80.0, None), gpu("gpu0"), CPU64, dev("cpu128", 128, 45)],
        {"master"},
    ),
]


def _args(profiles):
    return (
        profiles, SIZES.n_layers, SIZES.layer_bytes, SIZES.kv_bytes_per_token,
        CONTEXT, "master",
    )  # fmt: skip


KW = dict(activation_bytes=SIZES.activation_bytes, master_bytes=SIZES.master_bytes)


@pytest.mark.parametrize("case,profiles,dropped", CASES, ids=[c[0] for c in CASES])
def test_plan_table(case, profiles, dropped):
    best = plan(*_args(profiles), **KW)
    by_name = {p.name: p for p in profiles}
    # contiguous, in order, covering [0, 80)
    assert [a.start for a in best.assignments][0] == 0
    for a, b in itertools.pairwise(best.assignments):
        assert a.end == b.start and a.layers > 0
    assert best.assignments[-1].end == SIZES.n_layers
    # every device fits: weights and KV for the context (plus the master's part)
    for a in best.assignments:
        extra = SIZES.master_bytes if a.name == "master" else 0
        assert a.memory_bytes == a.layers * PER_LAYER + extra
        assert a.memory_bytes <= 0.9 * by_name[a.name].memory_bytes
    names = [a.name for a in best.assignments]
    if "master" in names:
        assert names[0] == "master"  # it embeds
    assert {n for n, _ in best.dropped} == dropped
    assert set(names) | dropped == set(by_name)
    # never worse than the baselines, when they fit
    for baseline in (even_split, memory_share_split):
        other = baseline(*_args(profiles), **KW)
        if other is not None:
            assert best.seconds_per_token <= other.seconds_per_token + 1e-12
    # the prediction is the cost model's sum
    hops = sum(
        (p.rtt_s + 2 * SIZES.activation_bytes / p.bandwidth_bytes_s)
        for p in map(by_name.get, names)
        if p.rtt_s is not None
    )
    layers = sum(a.layers * by_name[a.name].decode_s[1] for a in best.assignments)
    assert best.seconds_per_token == pytest.approx(layers + hops)
    assert best.tokens_per_second == pytest.approx(1 / best.seconds_per_token)


def test_dropped_reasons_say_why():
    _, profiles, _ = CASES[1]
    assert "too slow" in dict(plan(*_args(profiles), **KW).dropped)["pi"]
    _, profiles, _ = CASES[2]
    assert "hop costs" in dict(plan(*_args(profiles), **KW).dropped)["wan"]
    small = [dev("master", 256, 30.0, None), dev("tiny", 1, 1.0)]
    assert "cannot hold one layer" in dict(plan(*_args(small), **KW).dropped)["tiny"]


def test_even_and_memory_share_are_beaten_on_a_mixed_cluster():
    profiles = CASES[0][1]
    best = plan(*_args(profiles), **KW)
    assert even_split(*_args(profiles), **KW) is None  # 80/6 layers overflow a GPU
    share = memory_share_split(*_args(profiles), **KW)
    assert share is not None
    assert best.seconds_per_token < 0.9 * share.seconds_per_token


@pytest.mark.parametrize(
    "profiles",
    [
        [gpu("gpu0"), gpu("gpu1"), MAC, LAPTOP],
        [dev("master", 4, 9.0, None), gpu("gpu0")],  # master cannot hold the embedding
    ],
)
def test_infeasible_is_a_clear_error(profiles):
    with pytest.raises(PlanError) as e:
        plan(*_args(profiles), **KW)
    msg = str(e.value)
    assert "\n" not in msg and "GB" in msg
    if len(profiles) == 4:  # 12 + 12 + 8 + 4 layers fit: 44 are missing
        assert "36 of 80 layers" in msg
        assert f"{44 * PER_LAYER / 1e9:.2f} GB more is needed" in msg


def test_bad_profiles_are_clear_errors():
    with pytest.raises(PlanError, match="named 'gpu0'"):
        plan(*_args([gpu("gpu0"), gpu("gpu0")]), **KW)
    with pytest.raises(PlanError, match="run `cake bench`"):
        plan(*_args([]), **KW)


def _brute_force(profiles, n_layers, act):
    """Least cost over every way to give each device 0..n layers."""
    caps = [min(n_layers, int(0.9 * p.memory_bytes // PER_LAYER)) for p in profiles]
    best = float("inf")
    for counts in itertools.product(*(range(c + 1) for c in caps)):
        if sum(counts) != n_layers:
            continue
        cost = 0.0
        for k, p in zip(counts, profiles, strict=True):
            if k:
                cost += k * p.decode_s[0]
                if p.rtt_s is not None:
                    cost += p.rtt_s + 2 * act / p.bandwidth_bytes_s
        best = min(best, cost)
    return best


def test_exact_against_brute_force():
    rng = random.Random(0)
    for _ in range(60):
        profiles = [
            dev(f"d{i}", rng.choice([1.2, 2.3, 3.4, 5.6, 12]) * PER_LAYER / 1e9,
                rng.uniform(1, 50), rng.choice([None, 0.5, 5, 40]), 100)
            for i in range(rng.randint(3, 4))
        ]  # fmt: skip
        n_layers = rng.randint(4, 10)
        args = (profiles, n_layers, SIZES.layer_bytes, SIZES.kv_bytes_per_token,
                CONTEXT, "nobody")  # fmt: skip
        want = _brute_force(profiles, n_layers, 16384)
        if want == float("inf"):
            with pytest.raises(PlanError):
                plan(*args, activation_bytes=16384)
            continue
        got = plan(*args, activation_bytes=16384)
        assert got.seconds_per_token == pytest.approx(want)


def test_greedy_for_many_devices():
    profiles = [dev("master", 72, 40.0, None)]
    profiles += [dev(f"gpu{i}", 12, 2.0 + i / 10) for i in range(8)]
    profiles += [dev(f"slow{i}", 32, 300.0 + i, 2.0) for i in range(6)]
    best = plan(*_args(profiles), **KW)
    assert best.method == "greedy"
    assert best.assignments[-1].end == 80
    assert {n for n, _ in best.dropped} == {f"slow{i}" for i in range(6)}
    share = memory_share_split(*_args(profiles), **KW)
    assert share is None or best.seconds_per_token <= share.seconds_per_token


def test_layer_seconds_rescales_the_probe():
    # probed on an 8B layer: 10 ms at 128 positions, 12 ms at 4096
    p8 = model_sizes(synthetic_config("llama3-8b"), "bfloat16")
    probe = DeviceProfile(**{**dev("x", 24, 10.0).to_dict(), "decode_s": (0.010, 0.012),
                             "layer_bytes": p8.layer_bytes,
                             "kv_bytes_per_1k": p8.kv_bytes_per_token * 1000})  # fmt: skip
    slope = 0.002 / (4096 - 128)
    fixed = 0.010 - slope * 128
    assert layer_seconds(probe, 4096, p8.layer_bytes, p8.kv_bytes_per_token) == (
        pytest.approx(0.012)
    )
    scale = SIZES.layer_bytes / p8.layer_bytes  # 70B layers are ~7.8x larger
    got = layer_seconds(probe, 1000, SIZES.layer_bytes, SIZES.kv_bytes_per_token)
    assert got == pytest.approx(fixed * scale + slope * 1000)  # same KV per token


def test_plan_becomes_a_topology():
    profiles = CASES[0][1]
    best = plan(*_args(profiles), **KW)
    topo = to_topology(best)
    again = parse_topology(dump_topology(topo))
    assert again == topo
    places = placements(again, SIZES.n_layers)
    master = best.assignments[0]
    assert (places[0].start, places[0].end, places[0].worker) == (0, master.end, None)
    got = {p.worker.name: (p.start, p.end) for p in places if p.worker is not None}
    want = {a.name: (a.start, a.end) for a in best.assignments[1:]}
    assert got == want
    assert again.worker("gpu0").host == "gpu0.lan"
    assert again.worker("gpu0").backend == "jax"
    # addresses can come from outside; a worker without one is an error
    moved = to_topology(best, {"gpu0": "10.0.0.9:9000"})
    assert moved.worker("gpu0").address == "tcp://10.0.0.9:9000"
    local = [dev("master", 256, 60.0, None), dev("second", 24, 2.0, None)]
    with pytest.raises(PlanError, match="'second' has no address"):
        to_topology(plan(*_args(local), **KW))
    with pytest.raises(PlanError, match="no topology file is needed"):
        to_topology(plan(*_args([dev("master", 256, 9.0, None)]), **KW))


# --- a quantized checkpoint: placement by the bytes it stores ------------------------


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's rule (src/llama-quant.cpp) for the layers Q4_K_M gives more bits."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


class Q4KMSource:
    """Llama-3-70B as llama.cpp's Q4_K_M preset stores it: names, shapes, formats
    and bytes, no data. Q4_K by default; attn_v and ffn_down Q6_K in the layers
    `_use_more_bits` picks, elsewhere attn_v Q5_K (the 70B bump: its attn_v is 8x
    smaller than attn_q) and ffn_down Q4_K; the output Q6_K; norms F32."""

    def __init__(self, config):
        self.config = config
        n = config.num_hidden_layers
        self._fmt = {
            "model.embed_tokens.weight": "Q4_K",
            "model.norm.weight": "F32",
            "lm_head.weight": "Q6_K",
        }
        for i in range(n):
            more = _use_more_bits(i, n)
            for name in layer_tensor_names(config, i):
                fmt = "F32" if name.endswith("norm.weight") else "Q4_K"
                if ".v_proj." in name:
                    fmt = "Q6_K" if more else "Q5_K"
                elif ".down_proj." in name and more:
                    fmt = "Q6_K"
                self._fmt[name] = fmt

    def keys(self):
        return list(self._fmt)

    def __contains__(self, name):
        return name in self._fmt

    def shape(self, name):
        return expected_shape(self.config, name)

    def format(self, name):
        return self._fmt[name]

    def nbytes(self, name):
        count = math.prod(self.shape(name))
        if self._fmt[name] == "F32":
            return 4 * count
        elems, block = GGML_QUANT_SIZES[GGMLQuantizationType[self._fmt[name]]]
        return count // elems * block

    def get(self, name):
        raise AssertionError("planning reads no tensor data")


def test_a_q4_k_m_70b_fits_four_16_gb_devices_that_float32_overflows():
    config = synthetic_config("llama3-70b")
    source = Q4KMSource(config)
    q = checkpoint_sizes(config, source, "float32")  # KV cache in float32
    n = config.num_hidden_layers
    assert sum(_use_more_bits(i, n) for i in range(n)) == 40
    small, large = sorted(set(q.per_layer))  # Q4_K/Q5_K and Q6_K-heavy layers
    assert (small, large) == (482_410_496, 544_079_872) and q.layer_bytes == large
    params = sum(math.prod(source.shape(k)) for k in source.keys())
    assert 41.5e9 < q.weight_bytes < 43.5e9  # ~42.5 GB: 4.8 bits per weight
    assert 4.7 < 8 * q.weight_bytes / params < 5.0

    def gpu16(name, rtt_ms):
        p = dev(name, 16, 2.0, rtt_ms)  # probed on this model
        layer, kv = round(q.mean_layer_bytes), q.kv_bytes_per_token * 1000
        return DeviceProfile(**{**p.to_dict(), "layer_bytes": layer,
                                "kv_bytes_per_1k": kv, "dtype": "float32"})  # fmt: skip

    profiles = [gpu16("master", None), gpu16("w1", 0.3), gpu16("w2", 0.3),
                gpu16("w3", 0.3)]  # fmt: skip
    args = (profiles, n, q.per_layer, q.kv_bytes_per_token, CONTEXT, "master")
    kw = dict(activation_bytes=q.activation_bytes, master_bytes=q.master_bytes)
    best = plan(*args, **kw)
    assert [a.name for a in best.assignments] == ["master", "w1", "w2", "w3"]
    assert best.assignments[-1].end == n
    kv_ctx = q.kv_bytes_per_token * CONTEXT
    for a in best.assignments:
        extra = q.master_bytes if a.name == "master" else 0
        weights = q.range_bytes(a.start, a.end)  # the range's real bytes
        assert a.memory_bytes == weights + a.layers * kv_ctx + extra
        # reserved as the largest layer each, so any range fits
        assert a.layers * (large + kv_ctx) + extra <= 0.9 * a.memory_available
    held = [a.memory_bytes - a.layers * kv_ctx for a in best.assignments]
    assert sum(held) == q.weight_bytes
    # the same model counted as float32 (what cake counted before) does not fit
    f32 = model_sizes(config, "float32")
    assert f32.layer_bytes > 6 * q.mean_layer_bytes
    with pytest.raises(PlanError, match="hold 13 of 80 layers"):
        plan(profiles, n, f32.layer_bytes, f32.kv_bytes_per_token, CONTEXT,
             "master", master_bytes=f32.master_bytes)  # fmt: skip


def test_layer_sizes_must_match_the_layers():
    with pytest.raises(PlanError, match="3 layer sizes given for 4 layers"):
        plan([dev("master", 256, 9.0, None)], 4, [1, 2, 3], 1, 16)
    even = plan([dev("master", 256, 9.0, None)], 4, [5, 5, 5, 5], 1, 16)
    assert even == plan([dev("master", 256, 9.0, None)], 4, 5, 1, 16)
