"""Properties every backend keeps: split equals whole (across backends), batched
equals sequential, bfloat16 hidden states at stage boundaries."""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest

from cake.backends import Step, available_backends
from cake.pipeline import Pipeline, load_local_stage
from cake.shard import Shard
from cake.weights.checkpoint import open_checkpoint
from tests.models import make_checkpoint

BACKENDS = [b for b in ("numpy", "jax", "mlx") if b in available_backends()]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return make_checkpoint("qwen3", tmp_path_factory.mktemp("qwen3"))


def stage(folder, backend, start, end, dtype="float32"):
    config, tensors = open_checkpoint(folder)
    n = config.num_hidden_layers
    shard = Shard(start, end, n, embed=start == 0, head=end == n)
    return load_local_stage(
        config, shard, tensors, backend, dtype, max_context=64, max_sequences=4
    )


def run(pipe: Pipeline, prompt: list[int], steps: int) -> np.ndarray:
    """Prefill logits of every position, then greedy decode logits, stacked."""
    out = [
        pipe.forward(
            np.array([prompt], np.int32),
            Step((0,), (0,), (len(prompt),), all_logits=True),
        )[0]
    ]
    tok, pos = int(out[0][-1].argmax()), len(prompt)
    for _ in range(steps):
        lg = pipe.forward(np.array([[tok]], np.int32), Step((0,), (pos,), (1,)))
        out.append(lg)
        tok, pos = int(lg[0].argmax()), pos + 1
    return np.concatenate(out)


PAIRS = list(itertools.product(BACKENDS, BACKENDS))


@pytest.mark.parametrize(("first", "second"), PAIRS)
def test_split_equals_whole(qwen3, first, second):
    prompt = [3, 14, 15, 92, 65, 35]
    whole = run(Pipeline([stage(qwen3, "numpy", 0, 3)], 64), prompt, 4)
    split = run(
        Pipeline([stage(qwen3, first, 0, 1), stage(qwen3, second, 1, 3)], 64), prompt, 4
    )
    np.testing.assert_allclose(split, whole, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_equals_sequential(qwen3, backend):
    prompts = {7: [1, 2, 3, 4, 5, 6, 7], 8: [9, 8], 9: [5, 4, 3, 2]}
    alone = {}
    for sid, p in prompts.items():
        s = stage(qwen3, backend, 0, 3)
        a = s.forward(np.array([p], np.int32), Step((sid,), (0,), (len(p),)))
        b = s.forward(np.array([[11]], np.int32), Step((sid,), (len(p),), (1,)))
        alone[sid] = (a[0], b[0])
    s = stage(qwen3, backend, 0, 3)
    # step 1: all three prefill together, padded to the longest
    ids = np.zeros((3, 7), np.int32)
    for i, p in enumerate(prompts.values()):
        ids[i, : len(p)] = p
    lens = tuple(len(p) for p in prompts.values())
    first = s.forward(ids, Step(tuple(prompts), (0, 0, 0), lens))
    second = s.forward(
        np.full((3, 1), 11, np.int32), Step(tuple(prompts), lens, (1, 1, 1))
    )
    for i, sid in enumerate(prompts):
        np.testing.assert_allclose(first[i], alone[sid][0], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(second[i], alone[sid][1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_hidden_state_at_the_boundary(tmp_path, backend):
    folder = make_checkpoint("llama", tmp_path / "bf16", dtype="bfloat16")
    first = stage(folder, backend, 0, 2, dtype="bfloat16")
    h = first.forward(np.array([[1, 2, 3]], np.int32), Step((0,), (0,), (3,)))
    assert h.dtype == np.dtype(ml_dtypes.bfloat16) and h.shape == (1, 3, 64)
    ref = stage(folder, "numpy", 0, 2, dtype="bfloat16").forward(
        np.array([[1, 2, 3]], np.int32), Step((0,), (0,), (3,))
    )
    # a backend may compute in bfloat16 (MLX does): compare on the scale of the values
    h, ref = h.astype(np.float32), ref.astype(np.float32)
    assert np.abs(h - ref).max() <= 0.05 * np.abs(ref).max()
