"""`cake bench` probes: synthetic and real layers, JSON round trip, estimates, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from cake.backends.base import DeviceInfo
from cake.bench import (
    DeviceProfile,
    SyntheticSource,
    available_memory,
    load_profiles,
    profile_local,
    save_profiles,
    synthetic_config,
)
from cake.errors import CakeError
from cake.pipeline import expected_shape
from cake.weights.checkpoint import open_checkpoint
from cake.weights.names import layer_tensor_names
from tests.models import make_checkpoint

SMALL = dict(context=256, short=16, chunk=64, batch=2, repeats=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_checkpoint("llama", tmp_path_factory.mktemp("tiny"))


def test_synthetic_probe_and_json_round_trip(tmp_path):
    seen = []
    p = profile_local(
        "numpy", synthetic_config("tiny"), None, label="synthetic tiny",
        progress=lambda phase, done, total: seen.append((phase, done, total)),
        **SMALL,
    )  # fmt: skip
    assert (p.backend, p.device_kind, p.dtype, p.layers_probed) == (
        "numpy", "cpu", "bfloat16", 2,
    )  # fmt: skip
    assert (p.short_context, p.long_context, p.prefill_chunk, p.decode_batch) == (
        16, 256, 64, 2,
    )  # fmt: skip
    for pair in (p.decode_s, p.decode_batch_s, p.prefill_s):
        assert all(math.isfinite(t) and t > 0 for t in pair)
    assert p.memory_bytes > 0 and p.estimated == ()
    cfg = synthetic_config("tiny")  # 64 hidden, 96 intermediate, 4 x 16, 2 KV heads
    weights = 2 * 64 + 64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 96
    assert p.layer_bytes == 2 * weights  # bfloat16
    assert p.kv_bytes_per_1k == 2 * cfg.num_key_value_heads * 16 * 2 * 1000
    # progress: starts at load, ends with every planned call done
    assert seen[0][0] == "load" and seen[-1][1] == seen[-1][2]
    assert [d for _, d, _ in seen] == sorted(d for _, d, _ in seen)
    # JSON
    path = tmp_path / "bench.json"
    save_profiles(path, [p, DeviceProfile(**{**p.to_dict(), "name": "w1",
                                             "rtt_s": 1e-4, "address": "h:1"})])  # fmt: skip
    back = load_profiles(path)
    assert back[0] == p and back[1].rtt_s == 1e-4
    assert json.loads(path.read_text())["devices"][0]["decode_s"] == list(p.decode_s)


def test_probe_of_a_checkpoint_counts_its_bytes(tiny):
    config, tensors = open_checkpoint(tiny)
    p = profile_local("numpy", config, tensors, layers=3, label="tiny", **SMALL)
    names = layer_tensor_names(config, 0)
    assert p.layer_bytes == sum(tensors.get(n).nbytes for n in names)
    assert p.held_layer_bytes == p.layer_bytes  # NumPy keeps float32 as stored
    assert p.active_layer_bytes is None  # dense: a token reads every weight
    assert p.dtype == "float32" and p.layers_probed == 3 and p.model == "tiny"


def test_batched_long_decode_is_estimated_when_filling_is_costly():
    p = profile_local("numpy", synthetic_config("tiny"), None, fill_budget=0.0, **SMALL)
    assert p.estimated == ("decode_batch_s",)
    d_short, d_long = p.decode_s
    want = p.decode_batch_s[0] + p.decode_batch * max(d_long - d_short, 0.0)
    assert p.decode_batch_s[1] == pytest.approx(want)


def test_probe_picks_layers_a_split_folder_holds():
    class Only:  # a source holding layers 2 and 3 of the synthetic tiny model
        def __init__(self):
            self.inner = SyntheticSource(cfg, range(2, 4), "float32")

        def keys(self):
            return self.inner.keys()

        def __contains__(self, name):
            return name in self.inner

        def shape(self, name):
            return self.inner.shape(name)

        def get(self, name):
            assert ".layers.2." in name or ".layers.3." in name
            return self.inner.get(name)

    cfg = synthetic_config("tiny")
    p = profile_local("numpy", cfg, Only(), **SMALL)
    assert p.layers_probed == 2 and p.dtype == "float32"


def test_synthetic_source_is_repeatable_and_shaped():
    cfg = synthetic_config("llama3.2-1b")
    a = SyntheticSource(cfg, range(1), "float32")
    name = "model.layers.0.self_attn.k_proj.weight"
    w = a.get(name)
    assert w.shape == expected_shape(cfg, name) == (512, 2048)
    assert np.array_equal(w, SyntheticSource(cfg, range(1), "float32").get(name))
    assert abs(float(w.std()) - 1 / np.sqrt(2048)) < 1e-3  # keeps hidden scale
    with pytest.raises(CakeError, match="no tensor"):
        a.get("model.layers.1.self_attn.k_proj.weight")


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(CakeError, match="unknown synthetic shape 'gpt5'"):
        synthetic_config("gpt5")
    with pytest.raises(CakeError, match="must exceed"):
        profile_local("numpy", synthetic_config("tiny"), None, context=100)
    bad = tmp_path / "bad.json"
    bad.write_text('{"devices": [{"name": "x"}]}')
    with pytest.raises(CakeError, match="lacks 'backend'"):
        load_profiles(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(CakeError, match="not a profile file"):
        load_profiles(bad)
    with pytest.raises(CakeError, match="not found"):
        load_profiles(tmp_path / "missing.json")


def test_available_memory():
    assert available_memory(DeviceInfo("gpu", "x", 24 * 10**9)) == 24 * 10**9
    host = available_memory(DeviceInfo("cpu", "numpy", 1))
    assert 10**8 < host  # /proc/meminfo MemAvailable, not the 1 byte reported


def cake(*args: str, timeout: float = 180):
    return subprocess.run(
        [sys.executable, "-m", "cake", *args], capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_cli_bench_writes_json_and_a_table(tiny, tmp_path):
    out = tmp_path / "bench.json"
    r = cake("bench", "--model", str(tiny), "--backend", "numpy", "--context",
             "1024", "--layers", "1", "--json", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "decode x8" in r.stdout and "tokens/s" in r.stdout
    (p,) = load_profiles(out)
    assert p.name == "master" and p.long_context == 1024 and p.layers_probed == 1
    r = cake("bench", "--workers", "nohost", "--backend", "numpy")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("cake: error: bad worker")


def test_cli_plan_writes_a_topology(tiny, tmp_path):
    from cake.topology import load_topology

    config, tensors = open_checkpoint(tiny)
    layer = sum(tensors.get(n).nbytes for n in layer_tensor_names(config, 0))
    base = profile_local("numpy", config, tensors, layers=1, **SMALL).to_dict()
    base.update(layer_bytes=layer, memory_bytes=10**9)
    fast = dict(rtt_s=1e-4, bandwidth_bytes_s=1e9, decode_s=(1e-3, 1e-3))
    profiles = [
        DeviceProfile(**{**base, "name": "master", "decode_s": (1e-2, 1e-2)}),
        DeviceProfile(**{**base, **fast, "name": "w1", "address": "127.0.0.1:10001"}),
        DeviceProfile(**{**base, **fast, "name": "w2", "address": "127.0.0.1:10002",
                         "decode_s": (0.5, 0.5)}),
    ]  # fmt: skip
    save_profiles(tmp_path / "bench.json", profiles)
    out = tmp_path / "topology.yml"
    r = cake("plan", "--model", str(tiny), "--profile", str(tmp_path / "bench.json"),
             "--context", "64", "-o", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "predicted" in r.stdout and "tokens/s" in r.stdout
    assert "w2: left out, too slow" in r.stdout
    topo = load_topology(out)
    assert [(w.name, w.ranges, w.backend) for w in topo.workers] == [
        ("w1", ((0, 3),), "numpy")
    ]
    r = cake("plan", "--model", str(tiny), "--profile", str(tmp_path / "none.json"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("cake: error: profile file")


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_probe_of_a_moe_records_what_a_token_read(arch, tmp_path):
    from cake.sizes import checkpoint_sizes, model_sizes

    config, tensors = open_checkpoint(make_checkpoint(arch, tmp_path / arch))
    s = checkpoint_sizes(config, tensors, "float32")
    # qwen2_moe: layers 0 (sparse) and 1 (dense, mlp_only_layers), as the mean
    p = profile_local("numpy", config, tensors, layers=2, **SMALL)
    assert p.layer_bytes == round(sum(s.per_layer[:2]) / 2)  # every expert
    assert p.active_layer_bytes == round(sum(s.active_per_layer[:2]) / 2)
    assert p.active_layer_bytes < p.layer_bytes
    assert p.held_layer_bytes == p.layer_bytes  # held: every expert, as stored
    assert DeviceProfile.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    # a synthetic probe of the same shape (a worker without the model) alike
    q = profile_local("numpy", config, None, layers=2, dtype="float32", **SMALL)
    m = model_sizes(config, "float32")
    assert q.layer_bytes == p.layer_bytes == round(sum(m.per_layer[:2]) / 2)
    assert q.active_layer_bytes == p.active_layer_bytes
    # `cake plan` says what the experts hold and what a token reads
    save_profiles(tmp_path / "bench.json", [p])
    r = cake("plan", "--model", str(tmp_path / arch), "--profile",
             str(tmp_path / "bench.json"), "--context", "64")  # fmt: skip
    assert r.returncode == 0, r.stderr
    e = config.moe
    mb = f"{s.active_weight_bytes / 1e6:.2f} of {s.weight_bytes / 1e6:.2f} MB"
    assert f"experts: {e.num_experts}" in r.stderr and mb in r.stderr
    assert f"{e.top_k} active per token" in r.stderr
    assert "predicted" in r.stdout
