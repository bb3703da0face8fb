"""The NumPy stage, and the llama block (llama, mistral, qwen2, qwen3, phi3, gemma).

The stage runs every family: its decoder block is `attn_in` and `attn_out` of
the module `config.family.block` names (this one, or e.g. olmo2.py) around the
shared attention. The reference: written for reading, not speed. Hidden states leave the stage in
the model dtype; inside, everything is float32. Weights stay as the checkpoint
stores them (bfloat16 arrays, quantized `Packed` blocks, memory-mapped where the
reader allows); each matrix is widened to float32 only while it is multiplied,
one at a time, so the stage never holds a float32 copy of the model.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from cake import heap
from cake.backends.base import DeviceInfo, Step
from cake.backends.numpy import moe
from cake.config import ModelConfig
from cake.embedding import embed_scale
from cake.kv import check_step, dtype_of
from cake.rope import rope_attention_factor, rope_cos_sin, rope_inv_freq
from cake.sequence import StageSequences
from cake.shard import Shard
from cake.weights import TensorSource
from cake.weights.layer import norm_vector, read_layer
from cake.weights.names import head_tensor_names
from cake.weights.packed import Stored, as_float, lookup_rows, stored_tensor

Weights = dict[str, Any]  # one layer's: role -> float32 vector, Stored or parts


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x * x, axis=-1, keepdims=True)
    return w * (x / np.sqrt(var + eps))


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    # x (L, H, hd); cos/sin (L, hd); HF's rotate_half layout
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None] + rot * sin[:, None]


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU's tanh approximation (transformers' gelu_pytorch_tanh)."""
    inner = np.float32(np.sqrt(2 / np.pi)) * (x + np.float32(0.044715) * x**3)
    return 0.5 * x * (1.0 + np.tanh(inner))


ACTS = {"silu": silu, "gelu_pytorch_tanh": gelu_tanh}


def softcap(x: np.ndarray, cap: float | None) -> np.ndarray:
    """tanh(x / cap) * cap (Gemma's soft-capping), or x as it is without a cap."""
    return x if cap is None else np.tanh(x / np.float32(cap)) * np.float32(cap)


def linear(x: np.ndarray, w: Stored) -> np.ndarray:
    """x (..., in) float32 @ w.T, w (out, in) widened to float32 for this product only."""
    return x @ np.asarray(as_float(w), np.float32).T


def linears(x: np.ndarray, parts: tuple[Stored, ...]) -> np.ndarray:
    """x @ the stacked rows of `parts`: (..., sum of their rows)."""
    return np.concatenate([linear(x, w) for w in parts], axis=-1)


def split_qkv(cfg: ModelConfig, qkv: np.ndarray) -> list[np.ndarray]:
    """(n, (nh + 2 nkv) hd) -> q (n, nh hd), k and v (n, nkv hd)."""
    q, kv = (
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
    )
    return np.split(qkv, [q, q + kv], axis=-1)


def ffn(cfg: ModelConfig, gate_up: tuple, down: Stored, x: np.ndarray) -> np.ndarray:
    """A gated MLP: act(x @ gate) * (x @ up) @ down."""
    gate, up = np.split(linears(x, gate_up), 2, axis=-1)
    return linear(ACTS[cfg.hidden_act](gate) * up, down)


def mlp(cfg: ModelConfig, w: Weights, x: np.ndarray) -> np.ndarray:
    """The layer's MLP on x (n, D), normed: dense, or its experts (moe.py)."""
    if "router" in w:
        return moe.mlp(cfg, w, x, ffn, linear)
    return ffn(cfg, w["gate_up"], w["down"], x)


def attn_in(cfg: ModelConfig, w: Weights, x: np.ndarray) -> np.ndarray:
    """x (n, D) -> q|k|v (n, (nh + 2 nkv) hd) as attention takes it (before RoPE)."""
    qkv = linears(rms_norm(x, w["attn_norm"], cfg.rms_norm_eps), w["qkv"])
    if "qkv_bias" in w:
        qkv = qkv + w["qkv_bias"]
    if "q_norm" in w:  # per head (Qwen3)
        n, hd = x.shape[0], cfg.head_dim
        q, k, v = split_qkv(cfg, qkv)
        q = rms_norm(q.reshape(n, -1, hd), w["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k.reshape(n, -1, hd), w["k_norm"], cfg.rms_norm_eps)
        qkv = np.concatenate([q.reshape(n, -1), k.reshape(n, -1), v], axis=-1)
    return qkv


def attn_out(cfg: ModelConfig, w: Weights, x: np.ndarray, attn: np.ndarray):
    """The residual block around attention's output attn (n, nh hd): x (n, D) out."""
    h = x + linear(attn, w["o"])
    return h + mlp(cfg, w, rms_norm(h, w["mlp_norm"], cfg.rms_norm_eps))


def load_layer(config: ModelConfig, tensors: TensorSource, i: int) -> Weights:
    """Layer i by role: vectors (norms, biases) float32 once, matrices as stored."""
    lw = read_layer(config, tensors, i)

    def vec(v: Stored) -> np.ndarray:
        return np.asarray(as_float(v), np.float32)

    def norm(v: Stored) -> np.ndarray:
        return norm_vector(config, v)

    w: Weights = {
        "attn_norm": norm(lw.attn_norm),
        "mlp_norm": norm(lw.mlp_norm),
        "qkv": lw.qkv,
        "o": lw.o,
        "gate_up": lw.gate_up,
        "down": lw.down,
    }
    if lw.qkv_bias:
        w["qkv_bias"] = np.concatenate([vec(b) for b in lw.qkv_bias])
    if lw.q_norm is not None:
        w["q_norm"], w["k_norm"] = norm(lw.q_norm), norm(lw.k_norm)
    if lw.attn_post_norm is not None:
        w["attn_post_norm"] = norm(lw.attn_post_norm)
        w["mlp_post_norm"] = norm(lw.mlp_post_norm)
    if lw.router is not None:  # matrices as stored, the router too
        w["router"] = lw.router
        w["expert_gate_up"] = lw.expert_gate_up
        w["expert_down"] = lw.expert_down
        if lw.shared_gate is not None:
            w["shared_gate"] = lw.shared_gate
    return w


def _flat(v) -> list:
    """The arrays of a weight entry: one, a tuple, or tuples of tuples (experts)."""
    if isinstance(v, tuple):
        return [a for p in v for a in _flat(p)]
    return [] if v is None else [v]


class _SeqCache:
    """One sequence's K and V for each layer of the stage: (n_layers, T, n_kv, hd)."""

    def __init__(self, n_layers: int, n_kv: int, hd: int) -> None:
        self.k = np.zeros((n_layers, 0, n_kv, hd), np.float32)
        self.v = np.zeros_like(self.k)

    def write(self, layer: int, pos: int, k: np.ndarray, v: np.ndarray) -> None:
        end = pos + k.shape[0]
        if end > self.k.shape[1]:
            grow = max(end, 2 * self.k.shape[1])
            pad = ((0, 0), (0, grow - self.k.shape[1]), (0, 0), (0, 0))
            self.k, self.v = np.pad(self.k, pad), np.pad(self.v, pad)
        self.k[layer, pos:end] = k
        self.v[layer, pos:end] = v


class NumpyLlamaStage:
    def __init__(
        self,
        config: ModelConfig,
        shard: Shard,
        tensors: TensorSource,
        dtype: str,
        max_context: int,
        max_sequences: int,
        device: DeviceInfo,
    ) -> None:
        self.config, self.shard, self.dtype, self.device = config, shard, dtype, device
        self.max_context, self.max_sequences = max_context, max_sequences

        def get(name: str) -> Stored:
            w = stored_tensor(tensors, name)
            # vectors (norms, biases) are small: float32 once
            return as_float(w).astype(np.float32) if w.ndim == 1 else w

        self.block = importlib.import_module(
            f"cake.backends.numpy.{config.family.block}"
        )
        self.embed = get("model.embed_tokens.weight") if shard.embed else None
        self.layers = [load_layer(config, tensors, i) for i in shard.layers]
        if shard.head:
            norm, head = head_tensor_names(config)
            self.norm = norm_vector(config, stored_tensor(tensors, norm))
            same = shard.embed and head == "model.embed_tokens.weight"
            self.lm_head = self.embed if same else get(head)
        held = [w for layer in self.layers for v in layer.values() for w in _flat(v)]
        if shard.embed:
            held.append(self.embed)
        if shard.head:
            held += [self.norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        self.weight_bytes = sum(int(w.nbytes) for w in held)
        # one RoPE table per kind of layer the stage holds (global, local)
        self.rope_kinds = [config.local_rope(i) for i in shard.layers]
        self.inv_freq = {
            local: rope_inv_freq(config, max_context, local)
            for local in set(self.rope_kinds)
        }
        self.rope_factor = {
            local: rope_attention_factor(config, local) for local in self.inv_freq
        }
        self.embed_scale = embed_scale(config, dtype)
        self.caches: dict[int, _SeqCache] = {}
        self.seqs = StageSequences(max_sequences, max_context)

    def release(self, seq_ids: Sequence[int]) -> None:
        self.seqs.release(seq_ids)
        for s in seq_ids:
            self.caches.pop(s, None)

    def forward(self, x: np.ndarray, step: Step) -> np.ndarray:
        try:
            return self._forward(x, step)
        finally:
            # Every product widens its matrix into float32 scratch, and glibc
            # keeps such freed blocks (its mmap threshold grows after large
            # frees): SmolLM2 Q4_K_M's layers held 1.16x their file bytes
            # after two steps, 1.07x with the scratch given back. 7.5 ms of a
            # 700 ms decode step (2026-12-06).
            heap.trim()

    def _forward(self, x: np.ndarray, step: Step) -> np.ndarray:
        cfg = self.config
        check_step(step, x, self.shard, cfg)
        self.seqs.admit(step)
        if self.shard.embed:
            h = lookup_rows(self.embed, x).astype(np.float32)  # (B, L, D)
            if self.embed_scale is not None:  # in the model dtype, as transformers
                h = (h * np.float32(self.embed_scale)).astype(dtype_of(self.dtype))
                h = h.astype(np.float32)
        else:
            h = np.array(x, dtype=np.float32)  # a copy: the rows are written below
        for b, (sid, pos, n) in enumerate(
            zip(step.seq_ids, step.positions, step.lengths, strict=True)
        ):
            cache = self.caches.setdefault(
                sid, _SeqCache(len(self.shard), cfg.num_key_value_heads, cfg.head_dim)
            )
            positions = np.arange(pos, pos + n)
            rope = {
                k: rope_cos_sin(inv, positions, self.rope_factor[k])
                for k, inv in self.inv_freq.items()
            }
            hb = h[b, :n]
            for j, w in enumerate(self.layers):
                cos, sin = rope[self.rope_kinds[j]]
                hb = self._layer(hb, w, j, cache, pos, cos, sin)
            h[b, :n] = hb
            h[b, n:] = 0
        self.seqs.advance(step)
        if not self.shard.head:
            return h.astype(dtype_of(self.dtype))
        h = rms_norm(h, self.norm, cfg.rms_norm_eps)
        if not step.all_logits:
            h = h[np.arange(step.batch), np.asarray(step.lengths) - 1]  # (B, D)
        logits = linear(h, self.lm_head).astype(np.float32)
        return softcap(logits, cfg.final_logit_softcapping)

    def _layer(self, x, w, j, cache, pos, cos, sin):
        qkv = self.block.attn_in(self.config, w, x)
        return self.block.attn_out(
            self.config, w, x, self._attend(qkv, j, cache, pos, cos, sin)
        )

    def _attend(self, qkv, j, cache, pos, cos, sin):
        """RoPE, the cache write and causal attention: q|k|v (n, (nh + 2 nkv) hd)
        -> (n, nh hd)."""
        cfg = self.config
        n, hd = qkv.shape[0], cfg.head_dim
        nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        q, k, v = split_qkv(cfg, qkv)
        q, k, v = q.reshape(n, nh, hd), k.reshape(n, nkv, hd), v.reshape(n, nkv, hd)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        cache.write(j, pos, k, v)
        keys = cache.k[j, : pos + n]  # (T, nkv, hd)
        vals = cache.v[j, : pos + n]
        rep = nh // nkv
        keys, vals = np.repeat(keys, rep, axis=1), np.repeat(vals, rep, axis=1)
        # a float32 scale: a NumPy float64 scalar would promote everything after it
        scale = np.float32(cfg.attn_scale)
        scores = np.einsum("qhd,khd->hqk", q, keys) * scale  # (nh, n, T)
        scores = softcap(scores, cfg.attn_logit_softcapping)
        qpos = np.arange(pos, pos + n)[:, None]
        kpos = np.arange(pos + n)[None, :]
        allowed = kpos <= qpos
        window = cfg.window(self.shard.start + j)
        if window:
            allowed &= kpos > qpos - window
        scores = np.where(allowed[None], scores, -np.inf)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        return np.einsum("hqk,khd->qhd", probs, vals).reshape(n, nh * hd)
