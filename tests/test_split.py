"""`cake split`: each folder holds only its worker's tensors, as stored, and loads
like the whole."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import ml_dtypes
import numpy as np
import pytest
from gguf.quants import quantize
from tokenizers import Tokenizer, models, pre_tokenizers

from cake.backends.base import Step
from cake.config import ModelConfig, Moe, RopeScaling
from cake.errors import CakeError, TopologyError
from cake.pipeline import load_local_stage
from cake.shard import Shard
from cake.sizes import checkpoint_sizes
from cake.split import (
    GGUF_PART,
    SHARD_FILE,
    hf_config_dict,
    split_model,
    write_safetensors,
)
from cake.tokenizer import load_tokenizer
from cake.topology import parse_topology
from cake.weights.checkpoint import open_checkpoint
from cake.weights.gguf import GGUFSource, llama3_rope_factors
from cake.weights.names import head_tensor_names, layer_tensor_names
from cake.weights.packed import Packed
from cake.weights.safetensors import SafetensorsSource
from tests.blocks import F16_FIELDS, random_blocks
from tests.models import make_checkpoint
from tests.smollm import smollm_gguf
from tests.split_parts import TOPOLOGY

Q = gguf.GGMLQuantizationType


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


def test_gguf_splits_into_gguf_parts(tmp_path):
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
        assert part.format(name) == source.format(name) == "Q4_1"
        assert np.array_equal(part.get(name), source.get(name))
    ours, theirs = load_tokenizer(folders["first"]), load_tokenizer(gguf)
    text = "Hello, world! <|im_start|>user\nHi<|im_end|>"
    for special in (True, False):
        assert ours.encode(text, special) == theirs.encode(text, special)
        # the part's GGUF carries the tokenizer too
        again = load_tokenizer(folders["first"] / GGUF_PART)
        assert again.encode(text, special) == theirs.encode(text, special)
    assert ours.chat_template == theirs.chat_template
    assert ours.eos_token_ids == theirs.eos_token_ids
    assert ours.bos_token_id == theirs.bos_token_id
    # 1 of 30 layers: about a thirtieth of the file, not a float32 copy
    size = (folders["last"] / GGUF_PART).stat().st_size
    layer = sum(source.nbytes(n) for n in layer_tensor_names(config, 29))
    assert layer < size < layer + 2_000_000  # + the metadata (vocabulary)


# a tiny Q4_K_M-like GGUF: 4 layers, hidden 256 (K-quant blocks are 256 wide)
QCONFIG = ModelConfig("llama", 64, 256, 512, 4, 4, 2, 64, rms_norm_eps=2.0**-20,
                      rope_theta=500000.0,
                      rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
                      max_position_embeddings=128, bos_token_id=1,
                      eos_token_id=(2,))  # fmt: skip
_TYPES = {"q_proj": Q.Q4_0, "k_proj": Q.Q4_0, "o_proj": Q.Q8_0, "gate_proj": Q.Q4_1,
          "up_proj": Q.Q4_1}  # fmt: skip


def _small_blocks(fmt: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random valid blocks with small scales, so activations stay moderate."""
    raw = random_blocks(fmt, rows, cols, seed).reshape(rows, cols // 256, -1)
    for off in F16_FIELDS[fmt]:
        raw[..., off : off + 2] = np.array([2e-4], np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def _quantized_gguf(path):
    """QCONFIG as a GGUF mixing types as llama.cpp's Q4_K_M does: attn_v and
    ffn_down in Q6_K for the layers `use_more_bits` picks (0 and 3 of 4), Q4_K
    elsewhere; the head Q6_K, the embedding Q8_0, other matrices legacy types;
    F32 norms, llama 3 `rope_freqs` and a byte-level vocabulary."""
    c, rng = QCONFIG, np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_file_type(15)  # llama.cpp's MOSTLY_Q4_K_M
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(ord("A") + i) for i in range(c.vocab_size)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def matrix(name, rows, cols, kind, seed):
        if kind in (Q.Q4_K, Q.Q6_K):
            w.add_tensor(
                name, _small_blocks(kind.name, rows, cols, seed), raw_dtype=kind
            )
        else:
            x = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
            w.add_tensor(name, quantize(x, kind), raw_dtype=kind)

    d, f, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim
    matrix("token_embd.weight", c.vocab_size, d, Q.Q8_0, 0)
    factors = llama3_rope_factors(c.head_dim, c.rope_theta, factor=8.0)
    w.add_tensor("rope_freqs.weight", factors)
    for i in range(c.num_hidden_layers):
        more = i in (0, 3)
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", np.ones(d, np.float32))
        matrix(b + "attn_q.weight", d, d, _TYPES["q_proj"], i)
        matrix(b + "attn_k.weight", kv, d, _TYPES["k_proj"], i)
        matrix(b + "attn_v.weight", kv, d, Q.Q6_K if more else Q.Q4_K, i)
        matrix(b + "attn_output.weight", d, d, _TYPES["o_proj"], i)
        w.add_tensor(b + "ffn_norm.weight", np.ones(d, np.float32))
        matrix(b + "ffn_gate.weight", f, d, _TYPES["gate_proj"], i)
        matrix(b + "ffn_up.weight", f, d, _TYPES["up_proj"], i)
        matrix(b + "ffn_down.weight", d, f, Q.Q6_K if more else Q.Q4_K, i + 10)
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    matrix("output.weight", c.vocab_size, d, Q.Q6_K, 99)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


QTOPOLOGY = """
w1:
  host: 127.0.0.1:10001
  layers: ['model.layers.1']
w2:
  host: 127.0.0.1:10002
  layers: ['model.layers.2-3']
"""  # the master keeps layer 0, the embedding and the head


def test_a_quantized_gguf_splits_as_stored(tmp_path):
    src = _quantized_gguf(tmp_path / "q4_k_m.gguf")
    config, whole = open_checkpoint(src)
    assert config == QCONFIG
    downs = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(4)]
    assert [whole.format(n) for n in downs] == ["Q6_K", "Q4_K", "Q4_K", "Q6_K"]
    folders = split_model(src, parse_topology(QTOPOLOGY), tmp_path / "out")
    rope = int(next(t.n_bytes for t in whole.reader.tensors if "rope" in t.name))
    total = 0
    for folder in folders.values():
        files = {p.name for p in folder.iterdir()}
        assert {"config.json", SHARD_FILE, GGUF_PART} <= files
        cfg, part = open_checkpoint(folder)  # the folder, as a worker opens it
        assert cfg == config  # an untied head and llama 3 rope, without output.weight
        for n in part.keys():  # each tensor as stored: same type, same bytes
            a, b = part.stored(n), whole.stored(n)
            assert part.format(n) == whole.format(n), n
            if isinstance(b, Packed):
                assert (a.format, a.shape) == (b.format, b.shape)
                assert np.array_equal(a.data, b.data), n
            else:
                assert a.dtype == b.dtype and np.array_equal(a, b), n
        shard = json.loads((folder / SHARD_FILE).read_text())
        held = sum(whole.nbytes(n) for n in part.keys())
        assert shard["bytes"] == held + rope and shard["file"] == GGUF_PART
        assert held < (folder / GGUF_PART).stat().st_size < held + rope + 8192
        # the planner counts a part's layers as the whole counts them
        ranges = [tuple(r) for r in shard["layers"]]
        sizes = checkpoint_sizes(config, whole, "float32")
        mine = checkpoint_sizes(cfg, part, "float32")
        for a, b in ranges:
            assert mine.range_bytes(a, b) == sizes.range_bytes(a, b)
        total += shard["bytes"]
    original = sum(int(t.n_bytes) for t in whole.reader.tensors)
    assert total == original + 2 * rope  # rope_freqs goes into each of 3 parts
    assert len(set(checkpoint_sizes(config, whole, "float32").per_layer)) == 2
    # a worker loaded from its part computes what the whole does
    n = config.num_hidden_layers
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, 5))
    step = Step((0,), (0,), (5,))
    shards = [
        (Shard(0, 1, n, embed=True), "master"),
        (Shard(1, 2, n), "w1"),
        (Shard(2, 4, n), "w2"),
        (Shard(n, n, n, head=True), "master"),
    ]
    x_whole = x_split = ids.astype(np.int32)
    for shard, name in shards:
        _, part = open_checkpoint(folders[name])
        x_whole = _stage(config, whole, shard).forward(x_whole, step)
        x_split = _stage(config, part, shard).forward(x_split, step)
        assert np.array_equal(x_whole, x_split)
    assert x_split.shape == (1, config.vocab_size) and np.isfinite(x_split).all()


def test_mlx_quantized_tensors_are_written_as_stored(tmp_path):
    import safetensors.numpy

    rng = np.random.default_rng(0)
    q = Packed(
        "MLX4G64",
        (8, 128),
        rng.integers(0, 2**32, (8, 16), dtype=np.uint32),  # any bits are codes
        rng.uniform(1e-3, 1e-1, (8, 2)).astype(np.float16),
        rng.uniform(-0.1, 0.1, (8, 2)).astype(np.float16),
    )
    norm = np.ones(128, ml_dtypes.bfloat16)
    stored = {"m.q_proj.weight": q, "m.norm.weight": norm}

    class MlxSource:  # what SafetensorsSource offers for an mlx-lm folder
        def shape(self, name):
            return stored[name].shape

        def format(self, name):
            return stored[name].format if name == "m.q_proj.weight" else "BF16"

        def stored(self, name):
            return stored[name]

    path = tmp_path / "model.safetensors"
    nbytes = write_safetensors(path, list(stored), MlxSource())
    assert nbytes == q.nbytes + norm.nbytes  # as stored, not dequantized
    got = safetensors.numpy.load_file(path)
    assert set(got) == {"m.q_proj.weight", "m.q_proj.scales", "m.q_proj.biases",
                        "m.norm.weight"}  # fmt: skip
    pairs = [("m.q_proj.weight", q.data), ("m.q_proj.scales", q.scales),
             ("m.q_proj.biases", q.biases), ("m.norm.weight", norm)]  # fmt: skip
    for name, want in pairs:
        assert got[name].dtype == want.dtype and np.array_equal(got[name], want)
    blocks = Packed("Q4_0", (8, 32), np.zeros((8, 18), np.uint8))
    stored["m.q_proj.weight"] = blocks
    with pytest.raises(CakeError, match="split the GGUF file itself"):
        write_safetensors(tmp_path / "x.safetensors", list(stored), MlxSource())


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig("llama", 128, 64, 96, 3, 4, 2, 16, tie_word_embeddings=True,
                    rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 32),
                    bos_token_id=1, eos_token_id=(2, 7)),
        ModelConfig("mistral", 128, 64, 96, 3, 4, 2, 16, sliding_window=6,
                    eos_token_id=(2,)),
        ModelConfig("qwen2", 128, 64, 96, 3, 4, 2, 16, attention_bias=True),
        ModelConfig("qwen3", 128, 64, 96, 3, 4, 2, 24, sliding_window=8),
        ModelConfig("olmo2", 128, 64, 96, 3, 4, 2, 16, rope_theta=500000.0),
        ModelConfig("phi3", 128, 64, 96, 3, 4, 2, 16, sliding_window=6,
                    partial_rotary_factor=0.75, tie_word_embeddings=True,
                    rope_scaling=RopeScaling(
                        "longrope", 2.0, original_max_position_embeddings=128,
                        short_factor=(1.0, 1.5, 2.0, 2.5, 3.0, 4.0),
                        long_factor=(1.0, 2.0, 4.0, 8.0, 16.0, 32.0),
                        attention_factor=1.07)),
        ModelConfig("gemma", 128, 64, 96, 3, 4, 2, 16, tie_word_embeddings=True,
                    hidden_act="gelu_pytorch_tanh"),
        ModelConfig("gemma2", 128, 64, 96, 4, 4, 2, 16, tie_word_embeddings=True,
                    sliding_window=4, hidden_act="gelu_pytorch_tanh",
                    layer_types=("sliding_attention", "full_attention") * 2,
                    query_pre_attn_scalar=24.0, attn_logit_softcapping=10.0),
        ModelConfig("gemma3_text", 128, 64, 96, 3, 4, 2, 16,
                    tie_word_embeddings=True, sliding_window=4,
                    rope_theta=1e6, rope_scaling=RopeScaling("linear", 8.0),
                    layer_types=("sliding_attention",) * 2 + ("full_attention",),
                    rope_local_base_freq=1e4, hidden_act="gelu_pytorch_tanh",
                    query_pre_attn_scalar=24.0, final_logit_softcapping=8.0),
        ModelConfig("mixtral", 128, 64, 96, 3, 4, 2, 16, sliding_window=6,
                    moe=Moe(4, 2, 96, True)),
        ModelConfig("qwen2_moe", 128, 64, 96, 3, 4, 2, 16, attention_bias=True,
                    moe=Moe(4, 2, 32, False, 48, mlp_only_layers=(1,))),
        ModelConfig("qwen3_moe", 128, 64, 96, 4, 4, 2, 24,
                    moe=Moe(8, 3, 24, True, decoder_sparse_step=2)),
    ],
    ids=["llama3", "mistral", "qwen2", "qwen3", "olmo2", "phi4-mini", "gemma",
         "gemma2", "gemma3", "mixtral", "qwen2_moe", "qwen3_moe"],
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
