"""The MLX backend keeps weights quantized: GGUF blocks and mlx-lm folders.

Per GGUF type, random blocks repacked for `mx.quantized_matmul` against
`gguf.quants.dequantize`; then tiny models written as GGUF and as an mlx-lm
folder against HF transformers run on the dequantized weights.
"""

from __future__ import annotations

import json

import gguf
import ml_dtypes
import numpy as np
import pytest
from gguf.quants import quantize

mx = pytest.importorskip("mlx.core")

from cake.backends import Step, get_backend  # noqa: E402
from cake.backends.mlx.quant import (  # noqa: E402
    dequantize,
    fuse,
    linear,
    linears,
    load_linear,
    nbytes,
    take_rows,
)
from cake.shard import Shard  # noqa: E402
from cake.weights.checkpoint import open_checkpoint  # noqa: E402
from cake.weights.gguf import GGUFSource, hf_name  # noqa: E402
from cake.weights.names import shard_tensor_names  # noqa: E402
from cake.weights.packed import F16_FIELDS, GGUF_FORMATS, Packed, gguf_block  # noqa: E402
from tests.models import hf_config, hf_reference, make_checkpoint  # noqa: E402
from tests.test_gguf import _permute  # noqa: E402

Q = gguf.GGMLQuantizationType
F32 = np.dtype(np.float32)
LOSSY = {"Q2_K", "Q6_K"}
# bytes held per 32 weights (quant.py's table)
HELD = {
    "Q8_0": 36,
    "Q4_0": 20,
    "Q4_1": 20,
    "Q5_0": 24,
    "Q5_1": 24,
    "Q4_K": 24,
    "Q5_K": 28,
    "Q3_K": 36,
    "Q2_K": 36,
    "Q6_K": 36,
}
PROMPT = [1, 5, 17, 99, 3, 42, 7, 64, 12, 33, 8]


def random_blocks(fmt, rows, cols, rng, lo=1e-3, hi=1e-1) -> Packed:
    """Random bytes with every float16 field set to +-uniform(lo, hi)."""
    elems, size = gguf_block(fmt)
    data = rng.integers(0, 256, (rows, cols // elems, size), dtype=np.uint8)
    for at in F16_FIELDS[fmt]:
        d = rng.uniform(lo, hi, data.shape[:2]) * rng.choice([-1, 1], data.shape[:2])
        data[..., at : at + 2] = d.astype(np.float16)[..., None].view(np.uint8)
    return Packed(fmt, (rows, cols), data.reshape(rows, -1))


def lossy_bound(want: np.ndarray) -> np.ndarray:
    """quant.py's bound per weight: a group's (max - min) / 510, with float16 slack."""
    g = want.reshape(len(want), -1, 32)
    span = g.max(-1, keepdims=True) - g.min(-1, keepdims=True)
    bound = span / 510 * (1 + 2**-9) + 2**-24
    return np.broadcast_to(bound, g.shape).reshape(want.shape)


# --- (1) each GGUF type against gguf.quants ---------------------------------------


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_repacked_blocks_match_gguf_dequantize(fmt):
    rng = np.random.default_rng(sorted(GGUF_FORMATS).index(fmt))
    rows, cols = 8, 512
    packed = random_blocks(fmt, rows, cols, rng)
    want = packed.dequantize()  # gguf.quants.dequantize
    held = load_linear(packed, F32)
    assert held["group_size"] == 32 and held["w"].dtype == mx.uint32
    assert nbytes(held) == HELD[fmt] * rows * cols // 32
    got = dequantize(held)
    x = rng.standard_normal((3, cols)).astype(np.float32)
    y = np.array(linear(mx.array(x), held))
    size = np.abs(x) @ np.abs(want).T  # float32 rounding scales with this
    if fmt in LOSSY:
        bound = lossy_bound(want)
        assert np.all(np.abs(got - want) <= bound)
        assert np.all(np.abs(y - x @ want.T) <= np.abs(x) @ bound.T + 1e-5 * size)
    else:
        np.testing.assert_array_equal(got, want)
        assert np.all(np.abs(y - x @ want.T) <= 1e-5 * size)
    ids = np.array([[3, 0], [7, 3]])
    rows_ = np.array(take_rows(held, mx.array(ids), mx.float32))
    np.testing.assert_array_equal(rows_, got[ids])


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_K"])
def test_bfloat16_activations(fmt):
    rng = np.random.default_rng(5)
    packed = random_blocks(fmt, 8, 256, rng)
    held = load_linear(packed, np.dtype(ml_dtypes.bfloat16))
    x = mx.array(rng.standard_normal((2, 256)).astype(np.float32)).astype(mx.bfloat16)
    y = linear(x, held)
    assert y.dtype == mx.bfloat16
    # computed in float32 (the scales are float16 or float32), rounded to bfloat16
    x32, w = np.array(x.astype(mx.float32)), packed.dequantize()
    want, size = x32 @ w.T, np.abs(x32) @ np.abs(w).T
    got = np.array(y.astype(mx.float32))
    assert np.all(np.abs(got - want) <= 2**-8 * np.abs(want) + 1e-5 * size)


def test_mlx_format_passes_through_unchanged():
    rng = np.random.default_rng(6)
    w = mx.array(rng.standard_normal((16, 128)).astype(np.float32)).astype(mx.bfloat16)
    q, s, b = mx.quantize(w, group_size=64, bits=5)
    bf = np.array(s.view(mx.uint16)).view(ml_dtypes.bfloat16)
    bb = np.array(b.view(mx.uint16)).view(ml_dtypes.bfloat16)
    packed = Packed("MLX5G64", (16, 128), np.array(q), bf, bb)
    held = load_linear(packed, F32)
    assert (held["bits"], held["group_size"]) == (5, 64)
    assert held["scales"].dtype == mx.bfloat16
    for key, a in (("w", q), ("scales", s), ("biases", b)):
        assert mx.array_equal(held[key], a)
    np.testing.assert_array_equal(dequantize(held), packed.dequantize())


def test_fusion_only_when_layouts_match():
    rng = np.random.default_rng(7)
    same = [load_linear(random_blocks("Q4_0", 8, 64, rng), F32) for _ in range(3)]
    mixed = [*same[:2], load_linear(random_blocks("Q8_0", 8, 64, rng), F32)]
    floats = [load_linear(rng.standard_normal((8, 64)).astype(f), F32) for f in "ff"]
    assert len(fuse(same)) == 1 and len(fuse(mixed)) == 3 and len(fuse(floats)) == 1
    x = mx.array(rng.standard_normal((2, 64)).astype(np.float32))
    for parts in (same, mixed):
        want = np.concatenate([np.array(linear(x, p)) for p in parts], axis=-1)
        np.testing.assert_allclose(np.array(linears(x, fuse(parts))), want, rtol=1e-6)


# --- (2), (3) tiny models against HF on the dequantized weights -------------------


def write_gguf(path, cfg, tensors: dict[str, tuple[np.ndarray, Q | None]]) -> None:
    """A llama GGUF of HF config `cfg`; tensors: HF name -> (array as the file
    stores it, raw type or None for the array's own dtype)."""
    n = cfg.num_hidden_layers
    names = ["token_embd", "output_norm", "output"] + [
        f"blk.{i}.{x}"
        for i in range(n)
        for x in "attn_q attn_k attn_v attn_output ffn_gate ffn_up ffn_down "
        "attn_norm ffn_norm".split()
    ]
    to_gguf = {hf_name(f"{g}.weight"): f"{g}.weight" for g in names}
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(n)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    for name, (array, raw) in tensors.items():
        w.add_tensor(to_gguf[name], array, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def hf_on(cfg, weights: dict[str, np.ndarray], folder):
    """Save an HF model of `cfg` holding `weights`; HF's outputs on PROMPT."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in weights.items()}
    missing = model.load_state_dict(state, strict=False).missing_keys
    assert missing == (["lm_head.weight"] if cfg.tie_word_embeddings else [])
    model.save_pretrained(folder)
    return hf_reference(folder, PROMPT, steps=4)


def assert_matches_hf(stage, reference) -> None:
    prefill, tokens, step_logits = reference
    n = len(PROMPT)
    logits = stage.forward(
        np.array([PROMPT], np.int32), Step((0,), (0,), (n,), all_logits=True)
    )
    np.testing.assert_allclose(logits[0], prefill, atol=1e-4, rtol=1e-4)
    tok, pos = tokens[0], n
    for i, want in enumerate(step_logits):
        lg = stage.forward(np.array([[tok]], np.int32), Step((0,), (pos,), (1,)))
        np.testing.assert_allclose(lg[0], want, atol=1e-4, rtol=1e-4)
        tok, pos = int(lg[0].argmax()), pos + 1
        assert tok == tokens[i + 1]


def load_stage(config, tensors, dtype="float32"):
    shard = Shard.whole(config.num_hidden_layers)
    stage = get_backend("mlx").load(
        config, shard, tensors, dtype, max_context=64, max_sequences=2
    )
    file_bytes = sum(tensors.nbytes(n) for n in shard_tensor_names(config, shard))
    return stage, file_bytes


def _matrix_format(name: str, formats: dict[str, str]) -> str | None:
    """The format of a matrix by its role (q_proj, embed_tokens, ...): the most
    specific key of `formats` found in the name."""
    hits = [k for k in formats if k in name]
    return formats[max(hits, key=len)] if hits else None


# legacy types, quantized from HF's random weights by gguf.quants
LEGACY = {
    "q8_tied": {"weight": "Q8_0"},
    "mixed": {
        "embed_tokens": "Q4_1",
        "q_proj": "Q8_0",
        "k_proj": "Q8_0",
        "layers.1.self_attn.k_proj": "Q4_0",  # layer 1: q/k/v not fused
        "v_proj": "Q8_0",
        "o_proj": "Q5_0",
        "gate_proj": "Q4_0",
        "up_proj": "Q5_1",  # never fused with gate
        "down_proj": "Q4_1",
        "lm_head": "Q5_0",
    },
}


@pytest.mark.parametrize("mix", sorted(LEGACY))
def test_gguf_legacy_types_match_hf(tmp_path, mix):
    tied = mix == "q8_tied"
    folder = make_checkpoint("llama", tmp_path / "hf", tie_word_embeddings=tied)
    cfg = hf_config("llama", tie_word_embeddings=tied)
    _, floats = open_checkpoint(folder)
    tensors = {}
    for name in floats.keys():
        w = floats.get(name)
        fmt = _matrix_format(name, LEGACY[mix]) if w.ndim == 2 else None
        if ".q_proj." in name:
            w = _permute(w, cfg.num_attention_heads)
        elif ".k_proj." in name:
            w = _permute(w, cfg.num_key_value_heads)
        tensors[name] = (w, None) if fmt is None else (quantize(w, Q[fmt]), Q[fmt])
    write_gguf(tmp_path / "m.gguf", cfg, tensors)
    src = GGUFSource(tmp_path / "m.gguf")
    assert src.config.tie_word_embeddings is tied
    reference = hf_on(cfg, {n: src.get(n) for n in src.keys()}, tmp_path / "deq")
    stage, file_bytes = load_stage(src.config, src)
    assert_matches_hf(stage, reference)
    assert file_bytes <= stage.weight_bytes <= 1.15 * file_bytes
    if mix == "mixed":  # products fused only where the formats match
        assert [len(stage.layers[i]["qkv"]) for i in range(3)] == [1, 3, 1]
        assert len(stage.layers[0]["gate_up"]) == 2


# K-quants from random blocks (gguf.quants cannot quantize them): 256-wide rows
K_MIX = {
    "embed_tokens": "Q3_K",
    "q_proj": "Q4_K",
    "k_proj": "Q4_K",
    "layers.1.self_attn.k_proj": "Q5_K",
    "v_proj": "Q4_K",
    "o_proj": "Q5_K",
    "gate_proj": "Q2_K",
    "up_proj": "Q2_K",
    "down_proj": "Q6_K",
    "lm_head": "Q6_K",
}


def test_gguf_k_quants_match_hf(tmp_path):
    cfg = hf_config(
        "llama",
        hidden_size=256,
        intermediate_size=256,
        head_dim=64,
        num_hidden_layers=2,
    )
    rng = np.random.default_rng(8)
    p = "model.layers.{}."
    shapes = {"model.embed_tokens.weight": (128, 256), "lm_head.weight": (128, 256)}
    for i in range(2):
        for x, rows in (("q", 256), ("k", 128), ("v", 128), ("o", 256)):
            shapes[p.format(i) + f"self_attn.{x}_proj.weight"] = (rows, 256)
        for x in ("gate", "up", "down"):
            shapes[p.format(i) + f"mlp.{x}_proj.weight"] = (256, 256)
        for x in ("input_layernorm", "post_attention_layernorm"):
            shapes[p.format(i) + f"{x}.weight"] = (256,)
    shapes["model.norm.weight"] = (256,)
    tensors = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            tensors[name] = (rng.uniform(0.5, 1.5, shape).astype(np.float32), None)
            continue
        fmt = _matrix_format(name, K_MIX)
        first = random_blocks(fmt, *shape, rng)
        # rescale the float16 fields so that the weights' std is about 0.1
        c = 0.1 / first.dequantize().std()
        block = random_blocks(fmt, *shape, rng, 1e-3 * c, 1e-1 * c)
        tensors[name] = (block.data, Q[fmt])
    write_gguf(tmp_path / "m.gguf", cfg, tensors)
    src = GGUFSource(tmp_path / "m.gguf")
    # the reference: gguf's decoding; for the lossy types what the stage holds,
    # which test_repacked_blocks_match_gguf_dequantize bounds
    weights = {}
    for name in src.keys():
        w = src.stored(name)
        held = isinstance(w, Packed) and w.format in LOSSY
        weights[name] = dequantize(load_linear(w, F32)) if held else src.get(name)
    reference = hf_on(cfg, weights, tmp_path / "deq")
    stage, _ = load_stage(src.config, src)
    assert_matches_hf(stage, reference)
    assert [len(layer["qkv"]) for layer in stage.layers] == [1, 3]
    held_bytes = sum(
        HELD[f] * np.prod(s) // 32 if len(s) == 2 else 4 * s[0]
        for s, f in ((shapes[n], _matrix_format(n, K_MIX)) for n in shapes)
    )
    assert stage.weight_bytes == held_bytes


def test_mlx_lm_folder_matches_hf(tmp_path):
    """mx.quantize'd linears (4 bits, groups of 64; layer 1's up_proj 8 bits in
    groups of 32 by a per-module entry) with bfloat16 scales, as mlx-lm writes."""
    folder = make_checkpoint("llama", tmp_path / "hf", intermediate_size=128)
    cfg = hf_config("llama", intermediate_size=128)
    _, floats = open_checkpoint(folder)
    override = "model.layers.1.mlp.up_proj"
    out, weights = {}, {}
    for name in floats.keys():
        w = floats.get(name)
        if w.ndim == 1:
            out[name] = mx.array(w)
            weights[name] = w
            continue
        module = name.removesuffix(".weight")
        group, bits = (32, 8) if module == override else (64, 4)
        bf = mx.array(w).astype(mx.bfloat16)
        q, s, b = mx.quantize(bf, group_size=group, bits=bits)
        out |= {name: q, f"{module}.scales": s, f"{module}.biases": b}
        # exact: mx.dequantize computes in the scales' dtype
        s32, b32 = s.astype(mx.float32), b.astype(mx.float32)
        deq = mx.dequantize(q, s32, b32, group_size=group, bits=bits)
        weights[name] = np.array(deq)
    quant = tmp_path / "q"
    quant.mkdir()
    mx.save_safetensors(str(quant / "model.safetensors"), out)
    config = json.loads((folder / "config.json").read_text())
    config["quantization"] = {
        "group_size": 64,
        "bits": 4,
        override: {"group_size": 32, "bits": 8},
    }
    (quant / "config.json").write_text(json.dumps(config))
    reference = hf_on(cfg, weights, tmp_path / "deq")
    config, tensors = open_checkpoint(quant)
    stage, file_bytes = load_stage(config, tensors)
    assert_matches_hf(stage, reference)
    assert len(stage.layers[1]["gate_up"]) == 2 and len(stage.layers[0]["gate_up"]) == 1
    assert file_bytes <= stage.weight_bytes <= 1.15 * file_bytes


def test_quantized_gguf_in_bfloat16_stays_close(tmp_path):
    folder = make_checkpoint("llama", tmp_path / "hf")
    cfg = hf_config("llama")
    _, floats = open_checkpoint(folder)
    tensors = {}
    for name in floats.keys():
        w = floats.get(name)
        if ".q_proj." in name:
            w = _permute(w, cfg.num_attention_heads)
        elif ".k_proj." in name:
            w = _permute(w, cfg.num_key_value_heads)
        tensors[name] = (w, None) if w.ndim == 1 else (quantize(w, Q.Q4_0), Q.Q4_0)
    write_gguf(tmp_path / "m.gguf", cfg, tensors)
    src = GGUFSource(tmp_path / "m.gguf")
    step = Step((0,), (0,), (len(PROMPT),), all_logits=True)
    x = np.array([PROMPT], np.int32)
    want = load_stage(src.config, src)[0].forward(x, step)
    got = load_stage(src.config, src, "bfloat16")[0].forward(x, step)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.75
