"""The MLX backend: batching, splits with NumPy, bfloat16, cache limits, experts.

Numbers against HF transformers are in test_oracle.py; these check the
properties that the oracle's single-sequence run does not reach.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from cake.backends import Step, get_backend  # noqa: E402
from cake.backends.mlx import moe  # noqa: E402
from cake.backends.mlx.llama import _SeqCache, mlp, to_mx, to_numpy  # noqa: E402
from cake.backends.mlx.quant import load_linear, nbytes  # noqa: E402
from cake.backends.numpy import llama as numpy_llama  # noqa: E402
from cake.config import ModelConfig  # noqa: E402
from cake.errors import (  # noqa: E402
    CacheFullError,  # noqa: E402
    CakeError,
    ContextLengthError,
    ModelError,
)
from cake.shard import Shard  # noqa: E402
from cake.weights.checkpoint import open_checkpoint  # noqa: E402
from cake.weights.layer import LayerWeights  # noqa: E402
from cake.weights.names import shard_tensor_names  # noqa: E402
from cake.weights.packed import stored_tensor  # noqa: E402
from tests.models import hf_config, make_checkpoint  # noqa: E402
from tests.test_mlx_quant import random_blocks  # noqa: E402


# qwen2_moe: routed experts, a shared expert and a dense layer (1)
@pytest.fixture(scope="module", params=["llama", "mistral", "qwen3", "qwen2_moe"])
def model(request, tmp_path_factory):
    folder = make_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    return open_checkpoint(folder)


def load(model, backend="mlx", shard=None, dtype="float32", **kw):
    config, tensors = model
    shard = shard or Shard.whole(config.num_hidden_layers)
    kw = {"max_context": 64, "max_sequences": 4, **kw}
    return get_backend(backend).load(config, shard, tensors, dtype, **kw)


def ids(rng, n):
    return rng.integers(0, 128, size=n).astype(np.int32)


def pad(rows, length):
    out = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def test_batched_equals_sequential(model, monkeypatch):
    # Tiny cache growth steps so that the batch also crosses buffer growth.
    monkeypatch.setattr(_SeqCache, "STEP", 4)
    rng = np.random.default_rng(0)
    a0, b0 = ids(rng, 5), ids(rng, 3)
    a1, b1, c1 = ids(rng, 1), ids(rng, 4), ids(rng, 7)  # decode, chunk, prefill
    a2, b2, c2 = ids(rng, 1), ids(rng, 1), ids(rng, 2)

    batched = load(model)
    batched.forward(pad([a0, b0], 5), Step((10, 20), (0, 0), (5, 3)))
    step1 = Step((10, 20, 30), (5, 3, 0), (1, 4, 7), all_logits=True)
    out1 = batched.forward(pad([a1, b1, c1], 7), step1)  # (3, 7, V)
    step2 = Step((30, 10, 20), (7, 6, 7), (2, 1, 1), all_logits=True)
    out2 = batched.forward(pad([c2, a2, b2], 2), step2)

    alone = load(model)
    for sid, chunks, rows in [
        (10, [(0, a0), (5, a1), (6, a2)], [(out1, 0), (out2, 1)]),
        (20, [(0, b0), (3, b1), (7, b2)], [(out1, 1), (out2, 2)]),
        (30, [(0, c1), (7, c2)], [(out1, 2), (out2, 0)]),
    ]:
        outs = [
            alone.forward(t[None], Step((sid,), (p,), (len(t),), all_logits=True))
            for p, t in chunks
        ]
        for got, (batch_out, row) in zip(outs[-2:], rows, strict=True):
            n = got.shape[1]
            np.testing.assert_allclose(batch_out[row, :n], got[0], atol=1e-5)


def test_padding_rows_of_hidden_are_zero(model):
    config = model[0]
    stage = load(model, shard=Shard(0, 2, config.num_hidden_layers, embed=True))
    rng = np.random.default_rng(1)
    h = stage.forward(pad([ids(rng, 4), ids(rng, 2)], 4), Step((0, 1), (0, 0), (4, 2)))
    assert h.shape == (2, 4, config.hidden_size) and h.dtype == np.float32
    assert not h[1, 2:].any() and h[1, :2].any()


@pytest.mark.parametrize("k", [1, 2])
def test_split_mlx_then_numpy_equals_whole_numpy(model, k):
    n_layers = model[0].num_hidden_layers
    first = load(model, shard=Shard(0, k, n_layers, embed=True))
    second = load(model, "numpy", shard=Shard(k, n_layers, n_layers, head=True))
    whole = load(model, "numpy")
    rng = np.random.default_rng(2)
    tokens, pos = ids(rng, 9)[None], 0
    for _ in range(4):
        step = Step((7,), (pos,), (tokens.shape[1],), all_logits=True)
        hidden = first.forward(tokens, step)
        assert isinstance(hidden, np.ndarray) and hidden.dtype == np.float32
        got, want = second.forward(hidden, step), whole.forward(tokens, step)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
        pos += tokens.shape[1]
        tokens = np.array([[int(want[0, -1].argmax())]], np.int32)


def test_bfloat16_crosses_as_bits_and_stays_close(tmp_path):
    folder = make_checkpoint("qwen2", tmp_path / "bf16", dtype="bfloat16")
    model = open_checkpoint(folder)
    n_layers = model[0].num_hidden_layers
    first = load(model, shard=Shard(0, 2, n_layers, embed=True), dtype="bfloat16")
    second = load(
        model, shard=Shard(2, n_layers, n_layers, head=True), dtype="bfloat16"
    )
    ref = load(model, dtype="float32")
    assert first.dtype == "bfloat16"
    tokens = ids(np.random.default_rng(3), 8)[None]
    step = Step((0,), (0,), (8,), all_logits=True)
    hidden = first.forward(tokens, step)
    assert hidden.dtype == ml_dtypes.bfloat16 and hidden.shape == (1, 8, 64)
    # The bits round-trip exactly through MLX.
    back = to_numpy(to_mx(hidden, "bfloat16"))
    assert back.dtype == ml_dtypes.bfloat16
    assert np.array_equal(back.view(np.uint16), hidden.view(np.uint16))
    logits, want = second.forward(hidden, step), ref.forward(tokens, step)
    assert logits.dtype == np.float32 and logits.shape == want.shape
    scale = np.abs(want).max()
    assert np.abs(logits - want).max() < 0.05 * scale
    assert np.mean(logits.argmax(-1) == want.argmax(-1)) >= 0.75


def test_release_frees_a_sequence(model):
    stage = load(model, max_sequences=2)
    one = np.array([[3, 4, 5]], np.int32)
    stage.forward(one, Step((1,), (0,), (3,)))
    stage.forward(one, Step((2,), (0,), (3,)))
    with pytest.raises(CacheFullError):
        stage.forward(one, Step((3,), (0,), (3,)))
    stage.release([1])
    assert 1 not in stage.caches
    stage.forward(one, Step((3,), (0,), (3,)))
    stage.release([2, 3])
    assert not stage.caches
    with pytest.raises(CakeError, match="position"):
        stage.forward(one[:, :1], Step((1,), (3,), (1,)))  # its cache is gone
    stage.release([99])  # unknown ids are ignored


def test_bad_token_ids_raise(model):
    stage = load(model)
    with pytest.raises(CakeError, match="token ids"):
        stage.forward(np.array([[1, 128]], np.int32), Step((0,), (0,), (2,)))
    assert not stage.caches


def test_over_long_prompt_raises(model):
    stage = load(model, max_context=8)
    with pytest.raises(ContextLengthError):
        stage.forward(np.zeros((1, 9), np.int32), Step((0,), (0,), (9,)))
    stage.forward(np.zeros((1, 8), np.int32), Step((0,), (0,), (8,)))
    with pytest.raises(ContextLengthError):
        stage.forward(np.zeros((1, 1), np.int32), Step((0,), (8,), (1,)))
    assert stage.seqs.length[0] == 8


def test_device_info():
    from cake.backends.mlx import MlxBackend

    assert MlxBackend.is_available()
    (dev,) = MlxBackend.devices()
    assert dev.kind in ("cpu", "metal") and dev.memory_bytes


# --- mixtures of experts (moe.py) ---------------------------------------------


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    return open_checkpoint(make_checkpoint("mixtral", tmp_path_factory.mktemp("moe")))


def test_moe_weight_bytes_count_every_expert(moe_model):
    config, tensors = moe_model
    whole = Shard.whole(config.num_hidden_layers)
    stored = sum(
        stored_tensor(tensors, n).nbytes for n in shard_tensor_names(config, whole)
    )
    assert load(moe_model).weight_bytes == stored  # float32 in, float32 held


def test_moe_sorted_by_expert_equals_unsorted(moe_model, monkeypatch):
    tokens = ids(np.random.default_rng(4), 40)[None]
    step = Step((0,), (0,), (40,), all_logits=True)
    monkeypatch.setattr(moe, "SORT_AT", 10**9)
    unsorted = load(moe_model).forward(tokens, step)
    monkeypatch.setattr(moe, "SORT_AT", 1)
    got = load(moe_model).forward(tokens, step)
    np.testing.assert_allclose(got, unsorted, atol=1e-5, rtol=1e-5)


def _gguf_experts(rng, gate: str, up: str, down: str, n: int = 4) -> LayerWeights:
    """A Qwen2-MoE layer's MLP tensors of 256 wide, as GGUF blocks."""
    d = i = 256

    def block(fmt, rows, cols):
        return random_blocks(fmt, rows, cols, rng, 1e-3, 2e-2)

    def dense(rows, cols):
        return rng.normal(0, 0.1, (rows, cols)).astype(np.float32)

    return LayerWeights(
        attn_norm=None,
        mlp_norm=None,
        qkv=(),
        o=None,
        gate_up=(block("Q8_0", i, d), block("Q8_0", i, d)),
        down=block("Q8_0", d, i),
        router=dense(n, d),
        expert_gate_up=tuple((block(gate, i, d), block(up, i, d)) for _ in range(n)),
        expert_down=tuple(block(down, d, i) for _ in range(n)),
        shared_gate=dense(1, d),
    )


@pytest.mark.parametrize(
    "gate, up, down", [("Q8_0", "Q8_0", "Q4_0"), ("Q4_K", "Q8_0", "Q5_K")]
)
def test_moe_quantized_experts_match_numpy(gate, up, down):
    """GGUF experts repacked per expert and stacked (gate and up fused where
    they share a layout) give the NumPy reference's MLP, held as compactly as
    the per-expert repacks."""
    config = ModelConfig.from_dict(hf_config("qwen2_moe").to_dict())
    rng = np.random.default_rng(5)
    lw = _gguf_experts(rng, gate, up, down)

    def matrix(t):
        return load_linear(t, np.dtype(np.float32))

    w = moe.load_experts(lw, matrix)
    w["gate_up"], w["down"] = [matrix(p) for p in lw.gate_up], matrix(lw.down)
    assert len(w["expert_gate_up"]) == (1 if gate == up else 2)
    experts = [p for e in lw.expert_gate_up for p in e] + list(lw.expert_down)
    held = sum(nbytes(p) for p in [*w["expert_gate_up"], w["expert_down"]])
    assert held == sum(nbytes(matrix(p)) for p in experts)

    x = rng.normal(0, 0.1, (2, 9, 256)).astype(np.float32)
    got = np.array(mlp(config, w, mx.array(x)))
    ref_w = {
        "router": lw.router,
        "expert_gate_up": lw.expert_gate_up,
        "expert_down": lw.expert_down,
        "gate_up": lw.gate_up,
        "down": lw.down,
        "shared_gate": lw.shared_gate,
    }
    want = numpy_llama.mlp(config, ref_w, x.reshape(-1, 256)).reshape(x.shape)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=1e-4)


def test_moe_experts_of_one_matrix_must_share_a_quantization():
    rng = np.random.default_rng(6)
    lw = _gguf_experts(rng, "Q8_0", "Q8_0", "Q4_0")
    odd = random_blocks("Q8_0", 256, 256, rng)
    lw = LayerWeights(**{**lw.__dict__, "expert_down": (*lw.expert_down[:-1], odd)})
    with pytest.raises(ModelError, match="share a quantization"):
        moe.load_experts(lw, lambda t: load_linear(t, np.dtype(np.float32)))


def test_moe_bfloat16_experts(tmp_path):
    """16-bit float experts (which mlx's CPU gather_mm does not take): in
    float32 the NumPy reference's numbers, prefill (many picks) and decode
    (few); in bfloat16 close to them."""
    model = open_checkpoint(make_checkpoint("mixtral", tmp_path, dtype="bfloat16"))
    stages = [load(model), load(model, dtype="bfloat16"), load(model, "numpy")]
    tokens, pos = ids(np.random.default_rng(7), 9)[None], 0
    for _ in range(3):
        step = Step((0,), (pos,), (tokens.shape[1],), all_logits=True)
        got, low, want = (s.forward(tokens, step) for s in stages)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
        assert np.abs(low - want).max() < 0.05 * np.abs(want).max()
        pos += tokens.shape[1]
        tokens = np.array([[int(want[0, -1].argmax())]], np.int32)
