"""TensorSource: lazy, by-name access to a checkpoint's tensors."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class TensorSource(Protocol):
    """Tensors under Hugging Face names (`model.layers.3.self_attn.q_proj.weight`).

    `get` reads one tensor when asked (never the whole file) and returns it in
    its stored dtype: float32, float16 or `ml_dtypes.bfloat16` (quantized
    tensors come back dequantized to float32). Linear weights are (out, in) as
    in PyTorch.

    Readers of files may also offer `files()`, the paths they read (what
    identifies the checkpoint on disk, e.g. for cake/net/stream.py's digests).

    Readers of quantized files also offer `stored(name)`: the tensor as the
    file holds it, a float array or a `cake.weights.packed.Packed`, with no
    decoding. Backends read through `packed.stored_tensor(source, name)`, which
    falls back to `get` for sources that lack it.
    """

    def keys(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> np.ndarray: ...

    def __contains__(self, name: object) -> bool: ...
