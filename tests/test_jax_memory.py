"""A JAX step's scratch memory holds at most about one layer's widened matrices.

Where a step widens stored matrices to float32 (a long prefill through the
CPU kernels' `dequantize`; XLA's decode without the kernels, as on GPUs), the
widening depends on the weights alone, and XLA:CPU's scheduler put every
layer's first and held them all: a whole float32 copy of the model per step.
The compiled programs' own buffer assignment (`memory_analysis`) says what a
step takes; the logits are checked against NumPy's stage besides.
"""

from __future__ import annotations

import numpy as np
import pytest

from cake.backends import Step, available_backends, get_backend
from cake.shard import Shard
from cake.weights.checkpoint import open_checkpoint
from tests.gguf_models import write_gguf
from tests.models import make_checkpoint
from tests.test_quantized_models import SHAPE as QUANTIZED_SHAPE

pytestmark = pytest.mark.skipif(
    "jax" not in available_backends(), reason="jax not installed"
)

LAYERS = 8
SHAPE = {**QUANTIZED_SHAPE, "num_hidden_layers": LAYERS, "vocab_size": 512}
ROWS = 160  # past the kernels' 128 rows: the widened path


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    folder = make_checkpoint("llama", tmp_path_factory.mktemp("hf"), **SHAPE)
    d = tmp_path_factory.mktemp("gguf")
    return {
        f: write_gguf(folder, d / f"{f}.gguf", f, fan_in_scale=True)
        for f in ("Q8_0", "Q4_0", "F16")
    }


def widened_layer_bytes() -> int:
    """One layer's matrices in float32."""
    h, i = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    q = SHAPE["num_attention_heads"] * SHAPE["head_dim"]
    kv = SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
    return 4 * (h * q + 2 * h * kv + q * h + 3 * h * i)


def stage_of(path, backend: str):
    config, tensors = open_checkpoint(path)
    return get_backend(backend).load(
        config,
        Shard.whole(config.num_hidden_layers),
        tensors,
        "float32",
        max_context=256,
        max_sequences=1,
    )


def steps(stage) -> list[np.ndarray]:
    ids = (np.arange(ROWS, dtype=np.int32) * 7 % SHAPE["vocab_size"])[None]
    out = [stage.forward(ids, Step((0,), (0,), (ROWS,)))[0]]
    tok = np.array([[3]], np.int32)
    out.append(stage.forward(tok, Step((0,), (ROWS,), (1,)))[0])
    return out


@pytest.mark.parametrize("kernels", ["on", "off"])
@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "F16"])
def test_a_step_widens_one_layer_at_a_time(gguf_files, fmt, kernels, monkeypatch):
    from cake.backends.jax.linear import cpu_kernel_formats

    if kernels == "off":
        monkeypatch.setenv("CAKE_CPU_KERNELS", "0")
    elif fmt not in cpu_kernel_formats():
        pytest.skip(f"the CPU kernels do not multiply {fmt} here")
    elif fmt == "F16":
        pytest.skip("the kernels multiply 16-bit rows at any count, widening none")
    stage = stage_of(gguf_files[fmt], "jax")
    got = steps(stage)
    stage.programs.drain()
    ref = steps(stage_of(gguf_files[fmt], "numpy"))
    for g, r in zip(got, ref, strict=True):
        # the kernels round activations per block to 8 bits, as llama.cpp does
        tol = 0.05 if kernels == "on" else 1e-3
        np.testing.assert_allclose(g, r, atol=tol * np.abs(r).max())
    head = 4 * SHAPE["vocab_size"] * SHAPE["hidden_size"]
    worst = 0
    for shape, prog in list(stage.programs._ready.items()):
        temp = prog.memory_analysis().temp_size_in_bytes
        worst = max(worst, temp)
        # all layers widened at once would be LAYERS x this (plus the head);
        # one or two layers at a time, the head, activations and attention
        assert temp < 3 * widened_layer_bytes() + head, (shape, temp)
    assert worst > 0


HEAD_SHAPE = {**SHAPE, "num_hidden_layers": 2, "vocab_size": 16384}


@pytest.fixture(scope="module")
def big_head_files(tmp_path_factory):
    folder = make_checkpoint("llama", tmp_path_factory.mktemp("hf"), **HEAD_SHAPE)
    d = tmp_path_factory.mktemp("gguf")
    return {
        f: write_gguf(folder, d / f"{f}.gguf", f, fan_in_scale=True)
        for f in ("Q8_0", "F16")
    }


@pytest.mark.parametrize("fmt", ["Q8_0", "F16"])
def test_a_large_matrix_is_widened_in_parts(big_head_files, fmt, monkeypatch):
    """Without the kernels a head of 16 MB in float32 goes through XLA's dot in
    parts of WIDEN_BYTES, one after another, and gives the same logits."""
    from cake.backends.jax import linear

    monkeypatch.setenv("CAKE_CPU_KERNELS", "0")
    monkeypatch.setattr(linear, "WIDEN_BYTES", 1 << 20)
    stage = stage_of(big_head_files[fmt], "jax")
    ids = (np.arange(8, dtype=np.int32) * 7 % HEAD_SHAPE["vocab_size"])[None]
    got = stage.forward(ids, Step((0,), (0,), (8,)))[0]
    stage.programs.drain()
    ref = stage_of(big_head_files[fmt], "numpy").forward(ids, Step((0,), (0,), (8,)))[0]
    np.testing.assert_allclose(got, ref, atol=1e-3 * np.abs(ref).max())
    head = 4 * HEAD_SHAPE["vocab_size"] * HEAD_SHAPE["hidden_size"]
    for shape, prog in list(stage.programs._ready.items()):
        temp = prog.memory_analysis().temp_size_in_bytes
        # the whole head widened would be 16 MB alone; parts of 1 MB and a
        # layer or two besides (2.4 MB each)
        assert temp < head // 4, (shape, temp)
