"""Placement: a table of Llama-3-70B-sized clusters, optimality against brute force,
baselines, dropped devices, clear errors, the topology a plan becomes, a
quantized 70B placed by the bytes it stores, and mixtures of experts placed by
every expert they store and timed by the experts a token reads."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from cake.bench import DeviceProfile, synthetic_config
from cake.config import ModelConfig
from cake.pipeline import expected_shape
from cake.plan import (
    PlanError,
    even_split,
    held_factor,
    layer_seconds,
    memory_share_split,
    plan,
    to_topology,
)
from cake.sizes import checkpoint_sizes, experts_line, model_sizes
from cake.topology import dump_topology, parse_topology, placements
from cake.weights.checkpoint import open_checkpoint
from cake.weights.names import layer_names, layer_tensor_names
from tests.models import make_checkpoint

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


# --- mixtures of experts: memory by every expert, time by the experts a token uses -----

# Mixtral 8x7B's shape (its config.json), bf16
MIXTRAL = ModelConfig.from_dict(
    dict(model_type="mixtral", vocab_size=32000, hidden_size=4096,
         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
         num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
         torch_dtype="bfloat16")
)  # fmt: skip
# Qwen1.5-MoE-A2.7B's shape, and the same with its first layer made dense as
# mlp_only_layers allows
QWEN15_MOE = dict(
    model_type="qwen2_moe", vocab_size=151936, hidden_size=2048,
    intermediate_size=5632, moe_intermediate_size=1408,
    shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4,
    num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
    torch_dtype="bfloat16",
)  # fmt: skip
QWEN2_MOE = ModelConfig.from_dict({**QWEN15_MOE, "mlp_only_layers": [0]})


def test_mixtral_stores_every_expert_and_a_token_reads_two():
    s = model_sizes(MIXTRAL, "bfloat16")
    d, kv, inter, e = 4096, 8 * 128, 14336, 8
    attention = 2 * d * d + 2 * kv * d + 2 * d  # q, o, k, v and the two norms
    router, expert = e * d, 3 * inter * d  # gate | up and down
    stored, active = attention + router + e * expert, attention + router + 2 * expert
    assert s.per_layer == (2 * stored,) * 32 and s.each_layer == ()
    assert s.active_per_layer == (2 * active,) * 32
    assert s.master_bytes == 2 * (2 * 32000 * d + d)  # embedding, head, final norm
    params = s.weight_bytes // 2
    assert params == 32 * stored + 2 * 32000 * d + d == 46_702_792_704  # 46.7B
    reads = s.active_weight_bytes // 2
    assert reads == 32 * active + 2 * 32000 * d + d == 12_879_925_248  # 12.9B active
    assert experts_line(MIXTRAL, s) == (
        "experts: 8, 2 active per token; a token reads 25.76 of 93.41 GB"
    )
    # a dense model: a token reads every weight
    dense = model_sizes(synthetic_config("llama3-8b"), "bfloat16")
    assert dense.each_active == () and dense.active_per_layer == dense.per_layer
    assert experts_line(synthetic_config("llama3-8b"), dense) is None


def test_qwen2_moe_layers_differ_where_mlp_only_layers_are_dense():
    s = model_sizes(QWEN2_MOE, "bfloat16")
    d, e = 2048, 60
    attention = 4 * d * d + 3 * d + 2 * d  # q, k, v, o, the q|k|v bias, the norms
    shared = 3 * 5632 * d + d  # the shared expert and its sigmoid gate
    dense = attention + 3 * 5632 * d
    sparse = attention + e * d + shared + e * 3 * 1408 * d
    active = attention + e * d + shared + 4 * 3 * 1408 * d
    assert s.per_layer == (2 * dense,) + (2 * sparse,) * 23
    assert s.active_per_layer == (2 * dense,) + (2 * active,) * 23  # dense: all read
    assert s.layer_bytes == 2 * sparse  # what the planner reserves for each layer
    real = model_sizes(ModelConfig.from_dict(QWEN15_MOE), "bfloat16")
    assert real.weight_bytes == s.weight_bytes + 2 * (sparse - dense)
    assert 14.2e9 < real.weight_bytes / 2 < 14.4e9  # Qwen1.5-MoE: 14.3B in all
    assert 2.6e9 < real.active_weight_bytes / 2 < 2.8e9  # and 2.7B active
    assert experts_line(QWEN2_MOE, s) == (
        "experts: 60 and a shared one, 4 active per token in 23 of 24 layers; "
        "a token reads 5.31 of 27.59 GB"
    )
    # a plan predicts each range's time from its own layers' active bytes
    p = dev("master", 20, 5.0, None)  # probed on a dense 70B layer
    w = dev("w1", 16, 5.0)
    args = (
        [p, w], 24, s.per_layer, s.kv_bytes_per_token, CONTEXT, "master",
    )  # fmt: skip
    kw = dict(master_bytes=s.master_bytes, active_bytes=s.active_per_layer)
    best = plan(*args, **kw)
    assert [a.name for a in best.assignments] == ["master", "w1"]
    assert best.assignments[-1].end == 24
    # the master's range holds the dense layer, which a token reads less of
    assert best.assignments[0].layer_seconds < best.assignments[1].layer_seconds
    for a in best.assignments:
        read = s.active_range_bytes(a.start, a.end) / a.layers
        prof = p if a.name == "master" else w
        want = layer_seconds(prof, CONTEXT, read, s.kv_bytes_per_token)
        assert a.layer_seconds == pytest.approx(want)
        kv = a.layers * s.kv_bytes_per_token * CONTEXT
        extra = s.master_bytes if a.name == "master" else 0
        assert a.memory_bytes == s.range_bytes(a.start, a.end) + kv + extra


def test_a_moe_plan_places_by_stored_bytes_and_times_by_active_bytes():
    s = model_sizes(MIXTRAL, "bfloat16")
    master = dev("master", 64, 10.0, None)  # 10 ms per 70B layer, probed dense
    worker = dev("w1", 48, 12.0)
    args = ([master, worker], 32, s.per_layer, s.kv_bytes_per_token, CONTEXT, "master")
    kw = dict(activation_bytes=s.activation_bytes, master_bytes=s.master_bytes)
    moe = plan(*args, **kw, active_bytes=s.active_per_layer)
    dense = plan(*args, **kw)  # a dense model that stores as many bytes
    # the same placement: room counts every expert (19 and 13 of the 2.9 GB layers)
    per_layer = s.layer_bytes + s.kv_bytes_per_token * CONTEXT
    assert int((0.9 * 64e9 - s.master_bytes) // per_layer) == 19
    got = [(a.name, a.start, a.end, a.memory_bytes) for a in moe.assignments]
    assert got == [(a.name, a.start, a.end, a.memory_bytes) for a in dense.assignments]
    assert [(a.start, a.end) for a in moe.assignments] == [(0, 19), (19, 32)]
    # a token reads 27 % of each layer: the weights part of its time shrinks so
    ratio = s.mean_active_bytes / s.mean_layer_bytes
    assert ratio == pytest.approx(394_305_536 / 1_451_270_144)
    for a, b in zip(moe.assignments, dense.assignments, strict=True):
        assert a.layer_seconds == pytest.approx(ratio * b.layer_seconds)  # no slope
        assert a.hop_seconds == b.hop_seconds
    assert moe.tokens_per_second > 3 * dense.tokens_per_second
    # the baselines place and time the same way
    for fn in (even_split, memory_share_split):
        a, b = fn(*args, **kw, active_bytes=s.active_per_layer), fn(*args, **kw)
        assert a is None or a.seconds_per_token < b.seconds_per_token
    # a device probed on Mixtral itself scales from what its probe read
    probed = DeviceProfile(
        **{**master.to_dict(), "layer_bytes": s.layer_bytes,
           "active_layer_bytes": s.mean_active_bytes, "held_layer_bytes": s.layer_bytes}
    )  # fmt: skip
    assert layer_seconds(
        probed, CONTEXT, s.mean_active_bytes, s.kv_bytes_per_token
    ) == pytest.approx(0.010)
    assert held_factor(probed) == 1.0  # memory per stored byte, not per byte read
    # profiles written before experts were counted load, reading every weight
    old = {k: v for k, v in probed.to_dict().items() if k != "active_layer_bytes"}
    assert DeviceProfile.from_dict(old).active_layer_bytes is None
    assert layer_seconds(
        DeviceProfile.from_dict(old), CONTEXT, s.layer_bytes, s.kv_bytes_per_token
    ) == pytest.approx(0.010)


def test_active_sizes_must_match_the_layers():
    with pytest.raises(PlanError, match="2 active sizes given for 4 layers"):
        plan([dev("master", 256, 9.0, None)], 4, 5, 1, 16, active_bytes=[1, 2])
    with pytest.raises(PlanError, match="exceeds the bytes its layer stores"):
        plan([dev("master", 256, 9.0, None)], 4, 5, 1, 16, active_bytes=6)
    same = plan([dev("master", 256, 9.0, None)], 4, 5, 1, 16, active_bytes=5)
    assert same == plan([dev("master", 256, 9.0, None)], 4, 5, 1, 16)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_checkpoint_sizes_of_a_moe_count_every_expert_as_stored(arch, dtype, tmp_path):
    config, tensors = open_checkpoint(
        make_checkpoint(arch, tmp_path / arch, dtype=dtype)
    )
    s = checkpoint_sizes(config, tensors, "float32")  # cache in float32
    m = config.moe
    for i in range(config.num_hidden_layers):
        names = layer_names(config, i)
        experts = {n for parts in names.expert_gate_up for n in parts}
        experts |= set(names.expert_down)
        assert set(names.all()) <= set(tensors.keys())  # every expert is stored
        nbytes = {n: tensors.get(n).nbytes for n in names.all()}  # as the file has
        routed = sum(nbytes[n] for n in experts)
        base = sum(nbytes.values()) - routed
        assert s.per_layer[i] == base + routed
        assert s.active_per_layer[i] == base + round(routed * m.top_k / m.num_experts)
        assert config.is_moe(i) == (s.active_per_layer[i] < s.per_layer[i])
    if arch == "qwen2_moe":  # mlp_only_layers [1]: a dense layer amid sparse ones
        assert not config.is_moe(1) and len(set(s.per_layer)) == 2
    # parameters x the file's dtype: what model_sizes counts
    assert s.per_layer == model_sizes(config, dtype).per_layer
    assert s.active_per_layer == model_sizes(config, dtype).active_per_layer
    assert s.kv_bytes_per_token == model_sizes(config, "float32").kv_bytes_per_token
