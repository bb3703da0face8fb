"""A decoder layer's tensors by role, as stored: what every backend's blocks read.

`read_layer` hands out the tensors of `cake.weights.names.LayerNames` in their
stored form (float arrays in their dtype, quantized `Packed` blocks), never
widened: each backend turns them into its own weights. Stacked parts (q|k|v,
gate|up) stay as the checkpoint splits them: one fused tensor (Phi-3's
qkv_proj) or one per projection.
"""

from __future__ import annotations

from dataclasses import dataclass

from cake.config import ModelConfig
from cake.weights.names import layer_names
from cake.weights.packed import Stored, stored_tensor
from cake.weights.source import TensorSource


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: Stored  # (D,)
    mlp_norm: Stored  # (D,)
    qkv: tuple[Stored, ...]  # rows stack as q|k|v: ((nh + 2 nkv) hd, D)
    o: Stored  # (D, nh hd)
    gate_up: tuple[Stored, ...]  # rows stack as gate|up: (2 I, D)
    down: Stored  # (D, I)
    qkv_bias: tuple[Stored, ...] = ()  # stack as ((nh + 2 nkv) hd,)
    q_norm: Stored | None = None  # (hd,) per head, or (nh hd,): see Family.qk_norm
    k_norm: Stored | None = None  # (hd,) or (nkv hd,)


def read_layer(config: ModelConfig, tensors: TensorSource, i: int) -> LayerWeights:
    """Layer i's tensors as stored, by role."""
    names = layer_names(config, i)

    def get(name: str | None) -> Stored | None:
        return None if name is None else stored_tensor(tensors, name)

    return LayerWeights(
        attn_norm=get(names.attn_norm),
        mlp_norm=get(names.mlp_norm),
        qkv=tuple(get(n) for n in names.qkv),
        o=get(names.o),
        gate_up=tuple(get(n) for n in names.gate_up),
        down=get(names.down),
        qkv_bias=tuple(get(n) for n in names.qkv_bias),
        q_norm=get(names.q_norm),
        k_norm=get(names.k_norm),
    )
