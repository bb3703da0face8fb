"""The host EmbeddingStage: the master's first stage when a worker holds layer 0."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from cake.backends import Step
from cake.embedding import EmbeddingStage
from cake.errors import CakeError
from cake.pipeline import load_local_stage
from cake.shard import Shard
from cake.weights.checkpoint import open_checkpoint
from tests.models import make_checkpoint

PROMPT = [1, 5, 17, 99, 3, 42, 7]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {
        dt: make_checkpoint("llama", tmp_path_factory.mktemp(dt), dtype=dt)
        for dt in ("float32", "bfloat16")
    }


def load(folder, shard, backend, dtype):
    config, tensors = open_checkpoint(folder)
    return load_local_stage(
        config, shard, tensors, backend, dtype, max_context=32, max_sequences=2
    )


@pytest.mark.parametrize("backend", ["numpy", "jax", "mlx"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scaled_embedding_then_layers_equals_whole(tmp_path, backend, dtype):
    """Gemma's embeddings times sqrt(hidden_size), rounded to the model dtype
    on the host as inside a whole stage."""
    folder = make_checkpoint("gemma2", tmp_path, dtype=dtype)
    first = load(folder, Shard(0, 0, 4, embed=True), backend, dtype)
    rest = load(folder, Shard(0, 4, 4, head=True), backend, dtype)
    whole = load(folder, Shard.whole(4), backend, dtype)
    x = np.array([PROMPT], np.int32)
    step = Step((0,), (0,), (len(PROMPT),))
    config, tensors = open_checkpoint(folder)
    rows = np.asarray(tensors.get("model.embed_tokens.weight"), np.float32)[PROMPT]
    h = first.forward(x, step)
    want = (rows * np.float32(8.0)).astype(h.dtype)  # sqrt(64), exact in bf16
    np.testing.assert_array_equal(h[0], want)
    np.testing.assert_array_equal(rest.forward(h, step), whole.forward(x, step))


@pytest.mark.parametrize(
    ("ckpt", "dtype"),
    [("float32", "float32"), ("bfloat16", "bfloat16"), ("float32", "bfloat16")],
)
def test_embedding_then_layers_equals_whole(folders, ckpt, dtype):
    """Embedding on the host + the layers and head on JAX = the whole model on JAX."""
    folder = folders[ckpt]
    first = load(folder, Shard(0, 0, 3, embed=True), "jax", dtype)
    assert isinstance(first, EmbeddingStage)  # whatever backend was asked for
    rest = load(folder, Shard(0, 3, 3, head=True), "jax", dtype)
    whole = load(folder, Shard.whole(3), "jax", dtype)
    n = len(PROMPT)
    x = np.array([PROMPT], np.int32)
    step = Step((0,), (0,), (n,))
    h = first.forward(x, step)
    assert h.shape == (1, n, 64) and h.dtype == np.dtype(
        ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    )
    np.testing.assert_array_equal(rest.forward(h, step), whole.forward(x, step))
    step = Step((0,), (n,), (1,))
    tok = np.array([[9]], np.int32)
    np.testing.assert_array_equal(
        rest.forward(first.forward(tok, step), step), whole.forward(tok, step)
    )


def test_rows_are_the_checkpoint_rows_kept_narrow(folders):
    config, tensors = open_checkpoint(folders["bfloat16"])
    shard = Shard(0, 0, 3, embed=True)
    ours = EmbeddingStage(
        config, shard, tensors, "bfloat16", max_context=32, max_sequences=2
    )
    assert ours._table.dtype == ml_dtypes.bfloat16  # kept narrow, not widened
    table = np.asarray(tensors.get("model.embed_tokens.weight"), np.float32)
    x = np.array([PROMPT, PROMPT[::-1]], np.int32)
    step = Step((0, 1), (0, 0), (7, 7))
    np.testing.assert_array_equal(ours.forward(x, step).astype(np.float32), table[x])


def test_positions_are_checked_and_released(folders):
    config, tensors = open_checkpoint(folders["float32"])
    stage = EmbeddingStage(
        config,
        Shard(0, 0, 3, embed=True),
        tensors,
        "float32",
        max_context=8,
        max_sequences=1,
    )
    stage.forward(np.array([[1, 2, 3]], np.int32), Step((0,), (0,), (3,)))
    with pytest.raises(CakeError, match="position 3, not 5"):
        stage.forward(np.array([[4]], np.int32), Step((0,), (5,), (1,)))
    with pytest.raises(CakeError, match="full"):
        stage.forward(np.array([[4]], np.int32), Step((1,), (0,), (1,)))
    with pytest.raises(CakeError, match="context"):
        stage.forward(np.ones((1, 6), np.int32), Step((0,), (3,), (6,)))
    with pytest.raises(CakeError, match="token ids"):
        stage.forward(np.array([[128]], np.int32), Step((0,), (3,), (1,)))
    stage.release([0])
    stage.forward(np.array([[4]], np.int32), Step((1,), (0,), (1,)))
    with pytest.raises(ValueError):
        EmbeddingStage(
            config,
            Shard(0, 1, 3, embed=True),
            tensors,
            "float32",
            max_context=8,
            max_sequences=1,
        )
