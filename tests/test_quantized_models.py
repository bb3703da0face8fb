"""Quantized GGUF models on every backend against HF on the same weights decoded.

A tiny llama (in-dims multiples of 256, as K-quants need) is written as a GGUF
in each type; HF transformers runs the file's weights dequantized by gguf-py
(the oracle). Backends that multiply the stored floats exactly (NumPy; JAX with
its float paths) must match it to float32 rounding. Kernels that quantize the
activations per block as llama.cpp does (the JAX CPU kernels for the integer
formats) are held to the error that rounding brings, measured here against
the same oracle. Each stage must also hold about the file's bytes, not more.
"""

from __future__ import annotations

import numpy as np
import pytest

from cake.backends import Step, available_backends, get_backend
from cake.shard import Shard
from cake.weights.checkpoint import open_checkpoint
from tests.gguf_models import hf_twin, write_gguf
from tests.models import hf_reference, make_checkpoint

BACKENDS = [b for b in ("numpy", "jax") if b in available_backends()]
PROMPT = [1, 5, 17, 99, 3, 42, 7, 64, 12, 33, 8]
# logits here reach ~10 (random blocks decode to larger values than HF's init):
# float32 rounding in a different summation order is ~1e-4 of that
ATOL = 1e-3
FORMATS = [
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "mixed",
]


def q4_k_m(name: str) -> str:
    """A Q4_K_M-like mix: v and down projections Q6_K, embedding Q8_0, rest Q4_K."""
    if "v_proj" in name or "down_proj" in name:
        return "Q6_K"
    return "Q8_0" if "embed" in name else "Q4_K"


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return make_checkpoint(
        "llama",
        tmp_path_factory.mktemp("hf"),
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_hidden_layers=2,
    )


@pytest.fixture(scope="module", params=FORMATS)
def model(request, hf_folder, tmp_path_factory):
    fmt = request.param
    d = tmp_path_factory.mktemp(fmt)
    path = write_gguf(hf_folder, d / "m.gguf", q4_k_m if fmt == "mixed" else fmt)
    twin = hf_twin(path, hf_folder, d / "twin")
    return fmt, path, hf_reference(twin, PROMPT, steps=6)


def exact(backend: str, fmt: str) -> bool:
    """Whether this backend's products are float math on the stored weights."""
    if backend == "numpy" or fmt in ("F16", "BF16"):
        return True
    from cake.backends.jax.linear import cpu_kernel_formats

    return not cpu_kernel_formats()  # the jnp fallback decodes, then float dot


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_gguf_matches_hf_on_decoded_weights(model, backend):
    fmt, path, (prefill, tokens, step_logits) = model
    config, tensors = open_checkpoint(path)
    stage = get_backend(backend).load(
        config,
        Shard.whole(config.num_hidden_layers),
        tensors,
        "float32",
        max_context=64,
        max_sequences=2,
    )
    file_bytes = sum(tensors.nbytes(n) for n in tensors.keys())
    assert stage.weight_bytes <= 1.15 * file_bytes, (stage.weight_bytes, file_bytes)
    n = len(PROMPT)
    logits = stage.forward(
        np.array([PROMPT], np.int32), Step((0,), (0,), (n,), all_logits=True)
    )[0]
    if exact(backend, fmt):
        np.testing.assert_allclose(logits, prefill, atol=ATOL, rtol=1e-4)
    else:
        # activations rounded to 8 bits per block: an error of ~1% of the spread
        err = np.abs(logits - prefill).max() / prefill.std()
        assert err < 0.05, err
    tok, pos = tokens[0], n
    for i in range(6):
        lg = stage.forward(np.array([[tok]], np.int32), Step((0,), (pos,), (1,)))[0]
        if exact(backend, fmt):
            np.testing.assert_allclose(lg, step_logits[i], atol=ATOL, rtol=1e-4)
            tok = int(lg.argmax())
            assert tok == tokens[i + 1]
        else:
            assert np.abs(lg - step_logits[i]).max() / step_logits[i].std() < 0.05
            tok = tokens[i + 1]  # follow the oracle's path
        pos += 1
