"""A decoder layer's tensors by role, as stored: what every backend's blocks read.

`read_layer` hands out the tensors of `cake.weights.names.LayerNames` in their
stored form (float arrays in their dtype, quantized `Packed` blocks), never
widened: each backend turns them into its own weights. Stacked parts (q|k|v,
gate|up) stay as the checkpoint splits them: one fused tensor (Phi-3's
qkv_proj) or one per projection.

With partial rotary the q and k rows (and their biases and norms) come in the
layout cake.rope describes: within each head, [turned first half, kept first
half, turned second half, kept second half]. Only rows move: a copy of the
same dtype, quantized blocks whole.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from cake.config import ModelConfig
from cake.weights.names import layer_names
from cake.weights.packed import (
    Packed,
    Stored,
    as_float,
    release_pages,
    stored_tensor,
)
from cake.weights.source import TensorSource


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: Stored  # (D,)
    mlp_norm: Stored  # (D,)
    qkv: tuple[Stored, ...]  # rows stack as q|k|v: ((nh + 2 nkv) hd, D)
    o: Stored  # (D, nh hd)
    # the dense MLP (in a MoE layer the shared expert, or () and None)
    gate_up: tuple[Stored, ...]  # rows stack as gate|up: (2 I, D)
    down: Stored | None  # (D, I)
    qkv_bias: tuple[Stored, ...] = ()  # stack as ((nh + 2 nkv) hd,)
    q_norm: Stored | None = None  # (hd,) per head, or (nh hd,): see Family.qk_norm
    k_norm: Stored | None = None  # (hd,) or (nkv hd,)
    attn_post_norm: Stored | None = None  # (D,) on the attention's output
    mlp_post_norm: Stored | None = None  # (D,) on the MLP's output
    # a MoE layer (cake.config.Moe): the router (E, D); per expert its gate|up
    # parts ((I_e, D) each) and its down projection (D, I_e); the shared
    # expert's gate (1, D)
    router: Stored | None = None
    expert_gate_up: tuple[tuple[Stored, ...], ...] = ()
    expert_down: tuple[Stored, ...] = ()
    shared_gate: Stored | None = None


def norm_vector(config: ModelConfig, w: Stored) -> np.ndarray:
    """An RMSNorm weight as the blocks multiply by it: float32, plus the
    family's norm_offset (Gemma's 1 + w, in float32 as transformers computes it)."""
    v = np.asarray(as_float(w), np.float32)
    offset = config.family.norm_offset
    return v + np.float32(offset) if offset else v


def rotary_order(config: ModelConfig) -> np.ndarray | None:
    """(hd,) the HF dims of one head in cake's order, or None if all of them turn."""
    hd, r = config.head_dim, config.rotary_dim
    if r == hd:
        return None
    a, b = r // 2, (hd - r) // 2
    return np.concatenate(
        [np.arange(a), r + np.arange(b), a + np.arange(a), r + b + np.arange(b)]
    )


def read_layer(config: ModelConfig, tensors: TensorSource, i: int) -> LayerWeights:
    """Layer i's tensors as stored, by role (rows reordered for partial rotary)."""
    names = layer_names(config, i)

    def get(name: str | None) -> Stored | None:
        return None if name is None else stored_tensor(tensors, name)

    lw = LayerWeights(
        attn_norm=get(names.attn_norm),
        mlp_norm=get(names.mlp_norm),
        qkv=tuple(get(n) for n in names.qkv),
        o=get(names.o),
        gate_up=tuple(get(n) for n in names.gate_up),
        down=get(names.down),
        router=get(names.router),
        expert_gate_up=tuple(tuple(get(n) for n in e) for e in names.expert_gate_up),
        expert_down=tuple(get(n) for n in names.expert_down),
        shared_gate=get(names.shared_gate),
        qkv_bias=tuple(get(n) for n in names.qkv_bias),
        q_norm=get(names.q_norm),
        k_norm=get(names.k_norm),
        attn_post_norm=get(names.attn_post_norm),
        mlp_post_norm=get(names.mlp_post_norm),
    )
    order = rotary_order(config)
    return lw if order is None else _reorder(config, lw, order)


def _reorder(config: ModelConfig, lw: LayerWeights, order: np.ndarray) -> LayerWeights:
    hd, nh, nkv = (
        config.head_dim,
        config.num_attention_heads,
        config.num_key_value_heads,
    )

    def heads(n: int) -> np.ndarray:  # the order of n heads' rows
        return (np.arange(n)[:, None] * hd + order).reshape(-1)

    rows = np.concatenate(
        [heads(nh), nh * hd + heads(nkv), (nh + nkv) * hd + np.arange(nkv * hd)]
    )
    per_head = config.family.qk_norm == "head"
    norms = {}
    if lw.q_norm is not None:
        norms = {
            "q_norm": _take(lw.q_norm, order if per_head else heads(nh)),
            "k_norm": _take(lw.k_norm, order if per_head else heads(nkv)),
        }
    return replace(
        lw,
        qkv=_take_stacked(lw.qkv, rows),
        qkv_bias=_take_stacked(lw.qkv_bias, rows),
        **norms,
    )


def _take_stacked(parts: tuple[Stored, ...], rows: np.ndarray) -> tuple[Stored, ...]:
    """Parts whose stacked rows are `rows` of the parts' stack (each part's
    rows come from within it)."""
    out, start = [], 0
    for p in parts:
        n = p.shape[0]
        mine = rows[start : start + n] - start
        out.append(p if np.array_equal(mine, np.arange(n)) else _take(p, mine))
        start += n
    return tuple(out)


def _take(w: Stored, rows: np.ndarray) -> Stored:
    """Rows `rows` of w, a copy; the file's pages under w are dropped."""
    if isinstance(w, Packed):
        out: Stored = w.take_rows(rows)
        release_pages(w.data)
    else:
        out = np.ascontiguousarray(w[rows])
        release_pages(w)
    return out
