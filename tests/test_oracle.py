"""Every backend against HF transformers on tiny random checkpoints of every
architecture: whole, split across two stages, and (OLMo 2, Phi-3, Gemma 1-3) as
GGUF files against HF on their safetensors twins."""

from __future__ import annotations

import numpy as np
import pytest

from cake.backends import Step, available_backends, get_backend
from cake.config import ModelConfig
from cake.pipeline import Pipeline, load_local_stage
from cake.shard import Shard
from cake.weights.checkpoint import open_checkpoint
from tests.gguf_models import hf_twin, write_gguf
from tests.models import ARCHS, hf_reference, make_checkpoint

BACKENDS = [b for b in ("numpy", "jax", "mlx") if b in available_backends()]
# On the CPU the JAX stage attends through the attention kernel; "jax-xla" is the
# same stage with XLA's attention (what GPUs, TPUs and long prefills run).
if "jax" in BACKENDS:
    BACKENDS.insert(BACKENDS.index("jax") + 1, "jax-xla")
PROMPT = [1, 5, 17, 99, 3, 42, 7, 64, 12, 33, 8]


@pytest.fixture(scope="module", params=sorted(ARCHS))
def reference(request, tmp_path_factory):
    arch = request.param
    shards = 3 if arch == "llama" else 1  # one sharded checkpoint
    folder = make_checkpoint(arch, tmp_path_factory.mktemp(arch), shards=shards)
    return folder, hf_reference(folder, PROMPT, steps=8)


def load_whole(folder, backend: str, dtype: str = "float32"):
    config, tensors = open_checkpoint(folder)
    return get_backend(backend).load(
        config,
        Shard.whole(config.num_hidden_layers),
        tensors,
        dtype,
        max_context=64,
        max_sequences=4,
    )


def greedy_matches_hf(forward, reference) -> None:
    """Prefill logits of every position, then 8 greedy steps, against HF's."""
    prefill, tokens, step_logits = reference
    n = len(PROMPT)
    logits = forward(
        np.array([PROMPT], np.int32), Step((0,), (0,), (n,), all_logits=True)
    )
    np.testing.assert_allclose(logits[0], prefill, atol=1e-4, rtol=1e-4)
    tok, pos = tokens[0], n
    for i in range(8):
        lg = forward(np.array([[tok]], np.int32), Step((0,), (pos,), (1,)))
        np.testing.assert_allclose(lg[0], step_logits[i], atol=1e-4, rtol=1e-4)
        tok = int(lg[0].argmax())
        assert tok == tokens[i + 1]
        pos += 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_and_greedy_decode_match_hf(reference, backend, monkeypatch):
    folder, ref = reference
    if backend == "jax-xla":
        monkeypatch.setenv("CAKE_CPU_ATTENTION", "0")
        backend = "jax"
    greedy_matches_hf(load_whole(folder, backend).forward, ref)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "jax-xla"])
def test_a_middle_stage_leaves_its_input_as_it_was(reference, backend):
    """A stage's input is the caller's (a worker's received activations, kept
    to resend after a failure): the NumPy stage once wrote its rows into it."""
    folder, _ = reference
    config, tensors = open_checkpoint(folder)
    n = config.num_hidden_layers
    shard = Shard(1, n, n)
    stage = load_local_stage(
        config, shard, tensors, backend, "float32", max_context=64, max_sequences=4
    )
    x = np.random.default_rng(0).standard_normal((1, 4, config.hidden_size))
    x = x.astype(np.float32)
    kept = x.copy()
    out = stage.forward(x, Step((0,), (0,), (4,)))
    assert np.array_equal(x, kept) and not np.array_equal(out, x)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "jax-xla"])
def test_split_in_two_stages_matches_hf(reference, backend):
    """Layers [0, 1) and [1, 3) as two stages: the whole model's numbers."""
    folder, ref = reference
    config, tensors = open_checkpoint(folder)
    n = config.num_hidden_layers
    stages = [
        load_local_stage(
            config,
            Shard(a, b, n, embed=a == 0, head=b == n),
            tensors,
            backend,
            "float32",
            max_context=64,
            max_sequences=4,
        )
        for a, b in ((0, 1), (1, n))
    ]
    greedy_matches_hf(Pipeline(stages, 64).forward, ref)


# One GGUF per family llama.cpp writes differently from llama (its own tensor
# names, no Q/K permutation, Phi-3's fused tensors and rope factor tensors,
# Gemma's norms + 1, experts stacked per projection), in a float and a
# quantized type; Phi-4-mini's shape with a sliding window added. A Gemma 2/3
# file holds no query scale nor local pattern: llama.cpp takes head_dim ** -0.5
# (27B aside) and its fixed pattern (every other layer; five in six, with a
# local RoPE base of 10000), so the twins do. A Mixtral file (llama) holds no
# sliding window, so its twin has none.
GGUF_ARCHS = ("olmo2", "phi4-mini", "gemma", "gemma2", "gemma3", "mixtral",
              "qwen2_moe", "qwen3_moe")  # fmt: skip
GGUF_MODELS = [(a, f) for a in GGUF_ARCHS for f in ("F16", "Q8_0")]
GGUF_EXTRA = {
    "phi4-mini": {"sliding_window": 6},
    "mixtral": {"sliding_window": None},  # a llama GGUF holds no window
    "gemma2": {"query_pre_attn_scalar": 16},
    "gemma3": {
        "query_pre_attn_scalar": 16,
        "num_hidden_layers": 6,
        "sliding_window_pattern": 6,
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 4.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    },
}
CONFIG_FIELDS = (
    "model_type",
    "head_dim",
    "partial_rotary_factor",
    "sliding_window",
    "layer_types",
    "rope_theta",
    "rope_local_base_freq",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "hidden_act",
    "tie_word_embeddings",
    "moe",
)


@pytest.fixture(
    scope="module", params=GGUF_MODELS, ids=[f"{a}-{f}" for a, f in GGUF_MODELS]
)
def gguf_reference(request, tmp_path_factory):
    arch, fmt = request.param
    d = tmp_path_factory.mktemp(f"{arch}-{fmt}")
    folder = make_checkpoint(arch, d / "hf", **GGUF_EXTRA.get(arch, {}))
    path = write_gguf(folder, d / "m.gguf", fmt)
    twin = hf_twin(path, folder, d / "twin")  # the file's weights as float32
    return fmt, path, twin, hf_reference(twin, PROMPT, steps=8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gguf_matches_its_safetensors_twin(gguf_reference, backend, monkeypatch):
    fmt, path, twin, ref = gguf_reference
    got, _ = open_checkpoint(path)
    want = ModelConfig.from_file(twin / "config.json")
    for field in CONFIG_FIELDS:
        assert getattr(got, field) == getattr(want, field), field
    if want.rope_scaling is not None:  # float32 in the file
        g, w = got.rope_scaling, want.rope_scaling
        assert g.rope_type == w.rope_type
        np.testing.assert_allclose(g.factor, w.factor, rtol=1e-6)
    if want.rope_scaling is not None and want.rope_scaling.rope_type == "longrope":
        assert g.original_max_position_embeddings == w.original_max_position_embeddings
        for a in ("short_factor", "long_factor", "attention_factor"):
            np.testing.assert_allclose(getattr(g, a), getattr(w, a), rtol=1e-6)
    if backend == "jax-xla":
        monkeypatch.setenv("CAKE_CPU_ATTENTION", "0")
        backend = "jax"
    if backend == "jax" and fmt == "Q8_0":
        # the CPU kernels round activations to 8 bits per block, as llama.cpp
        # does (held to that in test_quantized_models): decode the blocks here
        monkeypatch.setenv("CAKE_CPU_KERNELS", "0")
    greedy_matches_hf(load_whole(path, backend).forward, ref)
