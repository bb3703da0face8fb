"""`cake split`: each folder holds only its worker's tensors and loads like the whole."""

from __future__ import annotations

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from cake.backends.base import Step
from cake.config import ModelConfig, RopeScaling
from cake.errors import CakeError, TopologyError
from cake.pipeline import load_local_stage
from cake.shard import Shard
from cake.split import hf_config_dict, split_model
from cake.tokenizer import load_tokenizer
from cake.topology import parse_topology
from cake.weights.checkpoint import open_checkpoint
from cake.weights.gguf import GGUFSource
from cake.weights.names import head_tensor_names, layer_tensor_names
from cake.weights.safetensors import SafetensorsSource
from tests.models import make_checkpoint
from tests.smollm import smollm_gguf

TOPOLOGY = """
w1:
  host: 127.0.0.1:10001
  layers: ['model.layers.1']
w2:
  host: 127.0.0.1:10002
  layers: ['model.layers.2']
"""  # the master keeps layer 0, the embedding and the head


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_checkpoint("llama", tmp_path_factory.mktemp("tiny"), shards=2)
    assert (folder / "model.safetensors.index.json").exists()
    vocab = {f"t{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text('{"eos_token": "t2"}')
    return folder


def _stage(config, source, shard):
    return load_local_stage(
        config, shard, source, "numpy", "float32", max_context=16, max_sequences=1
    )


def test_split_folders_hold_only_their_tensors(tiny, tmp_path):
    config, whole = open_checkpoint(tiny)
    folders = split_model(tiny, parse_topology(TOPOLOGY), tmp_path / "out")
    assert set(folders) == {"w1", "w2", "master"}
    want = {
        "w1": layer_tensor_names(config, 1),
        "w2": layer_tensor_names(config, 2),
        "master": ["model.embed_tokens.weight", *layer_tensor_names(config, 0)]
        + head_tensor_names(config),
    }
    for name, folder in folders.items():
        part = SafetensorsSource(folder)
        assert sorted(part.keys()) == sorted(want[name])
        size = sum(whole.get(n).nbytes for n in want[name])
        data = (folder / "model.safetensors").stat().st_size
        assert size <= data < size + 4096  # the header is small
        for n in want[name]:
            assert np.array_equal(part.get(n), whole.get(n))
        shard = json.loads((folder / "cake-shard.json").read_text())
        assert shard["bytes"] == size and shard["n_layers"] == 3
        assert ModelConfig.from_file(folder / "config.json") == config
        assert load_tokenizer(folder).encode("t5 t7") == [5, 7]
        assert (folder / "tokenizer_config.json").exists()
    assert json.loads((folders["w1"] / "cake-shard.json").read_text())["layers"] == [
        [1, 2]
    ]


def test_stages_from_split_folders_equal_the_whole(tiny, tmp_path):
    config, whole = open_checkpoint(tiny)
    folders = split_model(tiny, parse_topology(TOPOLOGY), tmp_path / "out")
    n = config.num_hidden_layers
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (1, 5)).astype(np.int32)
    step = Step((0,), (0,), (5,))
    shards = [
        (Shard(0, 1, n, embed=True), "master"),
        (Shard(1, 2, n), "w1"),
        (Shard(2, 3, n), "w2"),
        (Shard(n, n, n, head=True), "master"),
    ]
    x_whole = x_split = ids
    for shard, name in shards:
        _, part = open_checkpoint(folders[name])
        x_whole = _stage(config, whole, shard).forward(x_whole, step)
        x_split = _stage(config, part, shard).forward(x_split, step)
        assert np.array_equal(x_whole, x_split)
    assert x_split.shape == (1, config.vocab_size)


def test_bfloat16_split_reads_back_everywhere(tmp_path):
    import safetensors.numpy

    src = make_checkpoint("llama3", tmp_path / "bf16", dtype="bfloat16")
    folders = split_model(src, parse_topology(TOPOLOGY), tmp_path / "out")
    _, whole = open_checkpoint(src)
    stored = safetensors.numpy.load_file(folders["w2"] / "model.safetensors")
    for name, a in stored.items():
        assert a.dtype == ml_dtypes.bfloat16
        assert np.array_equal(a, whole.get(name))
    # tied embeddings: the master holds the embedding once, as the head too
    master = SafetensorsSource(folders["master"])
    assert "lm_head.weight" not in master and "model.embed_tokens.weight" in master


def test_bad_splits_are_clear_errors(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("")
    with pytest.raises(CakeError, match="not empty"):
        split_model(tiny, parse_topology(TOPOLOGY), out)
    bad = parse_topology("w:\n  host: h:1\n  layers: ['model.layers.2-3']\n")
    with pytest.raises(TopologyError, match="out of range"):
        split_model(tiny, bad, tmp_path / "out2")
    named = parse_topology("master:\n  host: h:1\n  layers: ['model.layers.2']\n")
    with pytest.raises(CakeError, match="--no-master"):
        split_model(tiny, named, tmp_path / "out3")


def test_gguf_splits_to_the_hugging_face_layout(tmp_path):
    gguf = smollm_gguf()
    topo = parse_topology(
        "first:\n  host: h:1\n  layers: ['model.layers.0']\n"
        "last:\n  host: h:2\n  layers: ['model.layers.29']\n"
    )
    folders = split_model(gguf, topo, tmp_path / "out", master=False)
    assert set(folders) == {"first", "last"}
    source = GGUFSource(gguf)
    config, part = open_checkpoint(folders["last"])
    assert config == source.config
    assert sorted(part.keys()) == sorted(layer_tensor_names(config, 29))
    for name in ("model.layers.29.self_attn.q_proj.weight",  # un-permuted
                 "model.layers.29.mlp.down_proj.weight"):  # fmt: skip
        assert np.array_equal(part.get(name), source.get(name))
    ours, theirs = load_tokenizer(folders["first"]), load_tokenizer(gguf)
    text = "Hello, world! <|im_start|>user\nHi<|im_end|>"
    for special in (True, False):
        assert ours.encode(text, special) == theirs.encode(text, special)
    assert ours.chat_template == theirs.chat_template
    assert ours.eos_token_ids == theirs.eos_token_ids
    assert ours.bos_token_id == theirs.bos_token_id


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig("llama", 128, 64, 96, 3, 4, 2, 16, tie_word_embeddings=True,
                    rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 32),
                    bos_token_id=1, eos_token_id=(2, 7)),
        ModelConfig("mistral", 128, 64, 96, 3, 4, 2, 16, sliding_window=6,
                    eos_token_id=(2,)),
        ModelConfig("qwen2", 128, 64, 96, 3, 4, 2, 16, attention_bias=True),
        ModelConfig("qwen3", 128, 64, 96, 3, 4, 2, 24, qk_norm=True,
                    sliding_window=8),
    ],
    ids=["llama3", "mistral", "qwen2", "qwen3"],
)  # fmt: skip
def test_hf_config_dict_reads_back_equal(config):
    d = json.loads(json.dumps(hf_config_dict(config)))
    assert ModelConfig.from_dict(d) == config


def test_cli_split(tiny, tmp_path):
    (tmp_path / "t.yml").write_text(TOPOLOGY)
    out = tmp_path / "out"
    args = ["--model", str(tiny), "--topology", str(tmp_path / "t.yml")]
    r = subprocess.run(
        [sys.executable, "-m", "cake", "split", *args, "--output", str(out),
         "--no-master"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["w1", "w2"]
    assert "w1:" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "cake", "split", *args, "--output", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("cake: error: output folder")
