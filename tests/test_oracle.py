"""Every backend against HF transformers on tiny random checkpoints of every
architecture: whole, and split across two stages."""

from __future__ import annotations

import numpy as np
import pytest

from cake.backends import Step, available_backends, get_backend
from cake.pipeline import Pipeline, load_local_stage
from cake.shard import Shard
from cake.weights.checkpoint import open_checkpoint
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
