"""A model split into parts (`cake split`) computes what the whole does."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cake.backends.base import Step
from cake.config import ModelConfig
from cake.pipeline import load_local_stage
from cake.shard import Shard
from cake.weights.checkpoint import open_checkpoint

# the parts split_model makes of a 3-layer model for the walk below
TOPOLOGY = """
w1:
  host: 127.0.0.1:10001
  layers: ['model.layers.1']
w2:
  host: 127.0.0.1:10002
  layers: ['model.layers.2']
"""  # the master keeps layer 0, the embedding and the head


def assert_parts_compute_the_whole(
    config: ModelConfig, whole, folders: dict[str, Path]
) -> None:
    """The 3-layer model's stages, each loaded from the whole and from its part
    ("master" embeds and holds layer 0 and the head, "w1" layer 1, "w2" layer
    2), give the same numbers on NumPy, stage after stage, within float32
    rounding: the parts hold the same bytes (the callers check), but BLAS may
    sum a product in another order for operands at other addresses (numpy
    2.4.6: 4.8e-6 apart after a Qwen3-MoE stage, the same code)."""

    def stage(source, shard):
        return load_local_stage(config, shard, source, "numpy", "float32",
                                max_context=16, max_sequences=1)  # fmt: skip

    n = config.num_hidden_layers
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, 5))
    step = Step((0,), (0,), (5,))
    x_whole = x_split = ids.astype(np.int32)
    stages = [
        (Shard(0, 1, n, embed=True), "master"),
        (Shard(1, 2, n), "w1"),
        (Shard(2, 3, n), "w2"),
        (Shard(n, n, n, head=True), "master"),
    ]
    for shard, name in stages:
        _, part = open_checkpoint(folders[name])
        x_whole = stage(whole, shard).forward(x_whole, step)
        x_split = stage(part, shard).forward(x_split, step)
        np.testing.assert_allclose(
            x_split, x_whole, rtol=1e-5, atol=1e-5 * np.abs(x_whole).max()
        )
    assert x_split.shape == (1, config.vocab_size) and np.isfinite(x_split).all()
