"""The MLX stage, and the llama block (llama, mistral, qwen2, qwen3, phi3, gemma).

Every family runs the stage: its decoder block is `attn_in` and `attn_out` of
the module `config.family.block` names (this one, or e.g. olmo2.py), in the
model dtype.

Weights stay as compact as the checkpoint (see quant.py): float matrices in
their stored dtype, quantized ones as `mx.quantized_matmul` operands; a MoE
layer's experts stacked per role, for `mx.gather_mm` / `mx.gather_qmm`
(moe.py).

Each layer is two compiled functions around the attention: `_attn_in` (the
block's `attn_in`: norm, fused q/k/v projection, q/k norm; then RoPE) and
`_attn_out` (the block's `attn_out`: o projection and the MLP). Attention
itself runs per sequence on that sequence's own KV cache, so a batch may mix
sequences at any positions and lengths and still give exactly what each would
give alone.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from cake.backends.base import DeviceInfo, Step
from cake.backends.mlx import moe
from cake.backends.mlx.quant import (
    Linear,
    from_numpy,
    fuse,
    linear,
    linears,
    load_linear,
    take_rows,
)
from cake.config import ModelConfig
from cake.embedding import embed_scale
from cake.kv import check_step, dtype_of
from cake.rope import rope_attention_factor, rope_inv_freq
from cake.sequence import StageSequences
from cake.shard import Shard
from cake.weights import TensorSource
from cake.weights.layer import LayerWeights, norm_vector, read_layer
from cake.weights.names import head_tensor_names
from cake.weights.packed import Stored, as_float, stored_tensor

Weights = dict[str, Any]  # one layer's: role -> vector (mx.array) or Linear(s)
MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def to_mx(a: np.ndarray, dtype: str) -> mx.array:
    """A NumPy array as an MLX array of `dtype`; bfloat16 goes over as its bits."""
    return from_numpy(np.asarray(a).astype(dtype_of(dtype), copy=False))


def to_numpy(a: mx.array) -> np.ndarray:
    """An MLX array as NumPy; bfloat16 comes back as `ml_dtypes.bfloat16`."""
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16)).view(ml_dtypes.bfloat16)
    return np.array(a)


def _arrays(tree) -> list[mx.array]:
    """The distinct MLX arrays among the leaves of nested lists and dicts."""
    leaves = (v for _, v in tree_flatten(tree) if isinstance(v, mx.array))
    return list({id(a): a for a in leaves}.values())


def split_qkv(cfg: ModelConfig, qkv: mx.array) -> list[mx.array]:
    """(..., (nh + 2 nkv) hd) -> q (..., nh hd), k and v (..., nkv hd)."""
    q, kv = (
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
    )
    return mx.split(qkv, [q, q + kv], axis=-1)


def rms_norm(x: mx.array, w: mx.array, eps: float) -> mx.array:
    """RMSNorm of x by w; a float32 w (Gemma's 1 + w) normalizes in float32 and
    casts back, as transformers' Gemma RMSNorm does."""
    if w.dtype == x.dtype:
        return mx.fast.rms_norm(x, w, eps)
    return mx.fast.rms_norm(x.astype(w.dtype), w, eps).astype(x.dtype)


def gelu_tanh(x: mx.array) -> mx.array:
    """GELU's tanh approximation (transformers' gelu_pytorch_tanh)."""
    return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


ACTS = {"silu": lambda x: x * mx.sigmoid(x), "gelu_pytorch_tanh": gelu_tanh}


def softcap(x: mx.array, cap: float | None) -> mx.array:
    """tanh(x / cap) * cap (Gemma's soft-capping), or x as it is without a cap."""
    return x if cap is None else mx.tanh(x / cap) * cap


def ffn(cfg: ModelConfig, gate_up: list[Linear], down: Linear, x: mx.array) -> mx.array:
    """A gated MLP: act(x @ gate) * (x @ up) @ down."""
    gate, up = mx.split(linears(x, gate_up), 2, axis=-1)
    return linear(ACTS[cfg.hidden_act](gate) * up, down)


def mlp(cfg: ModelConfig, w: Weights, x: mx.array) -> mx.array:
    """The layer's MLP on x (B, L, D), normed: dense, or its experts (moe.py)."""
    if "router" in w:
        return moe.mlp(cfg, w, x, ffn, ACTS[cfg.hidden_act])
    return ffn(cfg, w["gate_up"], w["down"], x)


def attn_in(cfg: ModelConfig, w: Weights, h: mx.array) -> mx.array:
    """h (B, L, D) -> q|k|v (B, L, (nh + 2 nkv) hd) as attention takes it (before RoPE)."""
    a = rms_norm(h, w["attn_norm"], cfg.rms_norm_eps)
    qkv = linears(a, w["qkv"])
    if "qkv_bias" in w:
        qkv = qkv + w["qkv_bias"]
    if "q_norm" in w:  # per head (Qwen3, Gemma 3)
        B, L, _ = h.shape
        hd, eps = cfg.head_dim, cfg.rms_norm_eps
        q, k, v = split_qkv(cfg, qkv)
        q = rms_norm(q.reshape(B, L, -1, hd), w["q_norm"], eps)
        k = rms_norm(k.reshape(B, L, -1, hd), w["k_norm"], eps)
        qkv = mx.concatenate([q.reshape(B, L, -1), k.reshape(B, L, -1), v], axis=-1)
    return qkv


def attn_out(cfg: ModelConfig, w: Weights, h: mx.array, attn: mx.array) -> mx.array:
    """The residual block around attention's output attn (B, L, nh hd): h out."""
    h = h + linear(attn, w["o"])
    return h + mlp(cfg, w, rms_norm(h, w["mlp_norm"], cfg.rms_norm_eps))


class _SeqCache:
    """One sequence's K and V per layer: buffers (1, n_kv, T_alloc, hd).

    Buffers grow in steps of STEP positions (at most max_context) and are
    written by slice, like mlx-lm's KVCache.
    """

    STEP = 256

    def __init__(self, n_layers: int, max_context: int) -> None:
        self.k: list[mx.array | None] = [None] * n_layers
        self.v: list[mx.array | None] = [None] * n_layers
        self.max_context = max_context

    def update(
        self, j: int, pos: int, k: mx.array, v: mx.array
    ) -> tuple[mx.array, mx.array]:
        """Write k, v (1, n_kv, n, hd) at `pos` of layer j; return keys/values [0, pos+n)."""
        end = pos + k.shape[2]
        buf_k, buf_v = self.k[j], self.v[j]
        have = 0 if buf_k is None else buf_k.shape[2]
        if end > have:
            alloc = min(math.ceil(end / self.STEP) * self.STEP, self.max_context)
            shape = (1, k.shape[1], alloc - have, k.shape[3])
            # Two distinct arrays: __setitem__ below rebinds the Python object.
            zk, zv = mx.zeros(shape, k.dtype), mx.zeros(shape, v.dtype)
            if buf_k is None:
                buf_k, buf_v = zk, zv
            else:
                buf_k = mx.concatenate([buf_k, zk], axis=2)
                buf_v = mx.concatenate([buf_v, zv], axis=2)
        buf_k[:, :, pos:end, :] = k
        buf_v[:, :, pos:end, :] = v
        self.k[j], self.v[j] = buf_k, buf_v
        return buf_k[:, :, :end, :], buf_v[:, :, :end, :]

    def arrays(self) -> list[mx.array]:
        return [a for a in self.k + self.v if a is not None]


class MlxLlamaStage:
    """Layers [shard.start, shard.end) of a llama-family model on MLX's default device."""

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
        model_dtype = dtype_of(dtype)
        self.mx_dtype = MX_DTYPES[model_dtype.name]

        def vector(v: Stored) -> mx.array:  # biases: small, model dtype
            return to_mx(as_float(v), dtype)

        # norms in the model dtype; Gemma's (1 + w) in float32 (see rms_norm)
        norm_dtype = "float32" if config.family.norm_offset else dtype

        def norm(v: Stored) -> mx.array:
            return to_mx(norm_vector(config, v), norm_dtype)

        def matrix(w: Stored) -> dict:
            return load_linear(w, model_dtype)

        def named(name: str) -> Stored:
            return stored_tensor(tensors, name)

        self.block = importlib.import_module(f"cake.backends.mlx.{config.family.block}")
        self.embed = matrix(named("model.embed_tokens.weight")) if shard.embed else None
        self.layers = [
            self._load_layer(vector, norm, matrix, read_layer(config, tensors, i))
            for i in shard.layers
        ]
        held = [self.embed, *self.layers]
        if shard.head:
            norm_name, head = head_tensor_names(config)
            self.norm = norm(named(norm_name))
            tied = head == "model.embed_tokens.weight" and self.embed is not None
            self.lm_head = self.embed if tied else matrix(named(head))
            held += [self.norm, self.lm_head]
        # bytes of every array the stage keeps (a tied head counted once)
        self.weight_bytes = sum(a.nbytes for a in _arrays(held))
        # mx.fast.rope takes periods (1 / inverse frequency), not frequencies;
        # the pairs that do not turn (partial rotary) get an infinite period.
        # One set per kind of layer the stage holds (config.local_rope).
        self.rope_kinds = [config.local_rope(i) for i in shard.layers]
        self.rope_periods, self.rope_scale = {}, {}
        for local in set(self.rope_kinds):
            inv = rope_inv_freq(config, max_context, local)
            with np.errstate(divide="ignore"):
                self.rope_periods[local] = mx.array(1.0 / inv)
            # longrope's attention factor on the pairs that turn (cake.rope)
            factor = rope_attention_factor(config, local)
            turn = np.concatenate([inv, inv]) > 0
            self.rope_scale[local] = (
                None if factor == 1.0 else to_mx(np.where(turn, factor, 1.0), dtype)
            )
        self.embed_scale = embed_scale(config, dtype)
        self._attn_in = mx.compile(self._attn_in_fn)
        self._attn_out = mx.compile(self._attn_out_fn)
        mx.eval(held)
        self.caches: dict[int, _SeqCache] = {}
        self.seqs = StageSequences(max_sequences, max_context)

    def _load_layer(self, vector, norm, matrix, lw: LayerWeights) -> Weights:
        # q/k/v as one (q+2kv)*hd x D product and gate/up as one 2I x D product
        # where their layouts match (fuse); else a list of separate products.
        w = {
            "attn_norm": norm(lw.attn_norm),
            "mlp_norm": norm(lw.mlp_norm),
            "qkv": fuse([matrix(p) for p in lw.qkv]),
            "o": matrix(lw.o),
        }
        if lw.down is not None:  # the dense MLP, or a MoE layer's shared expert
            w["gate_up"] = fuse([matrix(p) for p in lw.gate_up])
            w["down"] = matrix(lw.down)
        if lw.qkv_bias:
            w["qkv_bias"] = mx.concatenate([vector(b) for b in lw.qkv_bias])
        if lw.q_norm is not None:
            w["q_norm"], w["k_norm"] = norm(lw.q_norm), norm(lw.k_norm)
        if lw.attn_post_norm is not None:
            w["attn_post_norm"] = norm(lw.attn_post_norm)
            w["mlp_post_norm"] = norm(lw.mlp_post_norm)
        if lw.router is not None:
            w.update(moe.load_experts(lw, matrix))
        return w

    def release(self, seq_ids: Sequence[int]) -> None:
        self.seqs.release(seq_ids)
        for s in seq_ids:
            self.caches.pop(s, None)

    def forward(self, x: np.ndarray, step: Step) -> np.ndarray:
        cfg = self.config
        check_step(step, x, self.shard, cfg)
        self.seqs.admit(step)
        if self.shard.embed:
            x = np.asarray(x, np.int32)
            h = take_rows(self.embed, mx.array(x), self.mx_dtype)  # (B, L, D)
            if self.embed_scale is not None:
                h = h * mx.array(self.embed_scale, self.mx_dtype)
        else:
            h = to_mx(x, self.dtype)  # (B, L, D)
        caches = [
            self.caches.get(s) or _SeqCache(len(self.shard), self.max_context)
            for s in step.seq_ids
        ]
        offsets = mx.array(np.asarray(step.positions, np.int32))
        for j, w in enumerate(self.layers):
            local = self.rope_kinds[j]
            rope = (self.rope_periods[local], self.rope_scale[local])
            q, k, v = self._attn_in(h, w, offsets, *rope)  # (B, heads, L, hd)
            attn = self._attend(q, k, v, j, caches, step)  # (B, nh, L, hd)
            h = self._attn_out(h, attn, w)
        for sid, c in zip(step.seq_ids, caches, strict=True):
            self.caches[sid] = c
        self.seqs.advance(step)
        lengths = mx.array(np.asarray(step.lengths, np.int32))
        if not self.shard.head:
            valid = mx.arange(step.max_len)[None, :, None] < lengths[:, None, None]
            h = mx.where(valid, h, mx.zeros((), h.dtype))  # padding leaves as 0
            return self._finish(h, caches)
        h = rms_norm(h, self.norm, cfg.rms_norm_eps)
        if not step.all_logits:
            h = h[mx.arange(step.batch), lengths - 1]  # (B, D)
        logits = softcap(
            linear(h, self.lm_head, mx.float32), cfg.final_logit_softcapping
        )
        return self._finish(logits, caches)

    def _finish(self, out: mx.array, caches: list[_SeqCache]) -> np.ndarray:
        # Evaluate the caches too, so that no step's graph outlives the step.
        mx.eval(out, *(a for c in caches for a in c.arrays()))
        return to_numpy(out)

    def _attend(
        self,
        q: mx.array,
        k: mx.array,
        v: mx.array,
        j: int,
        caches: list[_SeqCache],
        step: Step,
    ) -> mx.array:
        """Each sequence's new queries over its own cache; (B, nh, L, hd), pad rows 0."""
        cfg = self.config
        scale = cfg.attn_scale
        window = cfg.window(self.shard.start + j)
        outs = []
        for b, (c, pos, n) in enumerate(
            zip(caches, step.positions, step.lengths, strict=True)
        ):
            keys, vals = c.update(j, pos, k[b : b + 1, :, :n], v[b : b + 1, :, :n])
            mask: mx.array | str | None = None
            if window is not None and pos + n > window:
                # Keys before the first query's window are never seen: skip them.
                first = max(0, pos + 1 - window)
                keys, vals = keys[:, :, first:], vals[:, :, first:]
                qpos = mx.arange(pos, pos + n)[:, None]
                kpos = mx.arange(first, pos + n)[None, :]
                mask = (kpos <= qpos) & (kpos > qpos - window)  # (n, T - first)
            elif n > 1:
                mask = "causal"  # lower-right aligned: query i sees keys <= pos + i
            if cfg.attn_logit_softcapping is None:
                o = mx.fast.scaled_dot_product_attention(
                    q[b : b + 1, :, :n], keys, vals, scale=scale, mask=mask
                )
            else:  # the fused kernel has no soft-cap (Gemma 2)
                o = _capped_attention(
                    q[b : b + 1, :, :n],
                    keys,
                    vals,
                    scale,
                    cfg.attn_logit_softcapping,
                    mask,
                )
            if n < step.max_len:
                o = mx.pad(o, [(0, 0), (0, 0), (0, step.max_len - n), (0, 0)])
            outs.append(o)
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)

    def _attn_in_fn(
        self,
        h: mx.array,
        w: Weights,
        offsets: mx.array,
        periods: mx.array,
        rope_scale: mx.array | None,
    ) -> tuple[mx.array, mx.array, mx.array]:
        cfg = self.config
        B, L, _ = h.shape
        hd = cfg.head_dim
        q, k, v = split_qkv(cfg, self.block.attn_in(cfg, w, h))
        # (B, heads, L, hd)
        q, k, v = (a.reshape(B, L, -1, hd).transpose(0, 2, 1, 3) for a in (q, k, v))
        rope = dict(
            traditional=False,  # HF's rotate_half layout
            base=None,
            scale=1.0,
            offset=offsets,  # (B,) each sequence's first position
            freqs=periods,
        )
        q, k = mx.fast.rope(q, hd, **rope), mx.fast.rope(k, hd, **rope)
        if rope_scale is not None:
            q, k = q * rope_scale, k * rope_scale
        return q, k, v

    def _attn_out_fn(self, h: mx.array, attn: mx.array, w: Weights) -> mx.array:
        B, L, _ = h.shape
        attn = attn.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.block.attn_out(self.config, w, h, attn)


def _capped_attention(
    q: mx.array,
    keys: mx.array,
    vals: mx.array,
    scale: float,
    cap: float,
    mask: mx.array | str | None,
) -> mx.array:
    """Attention with soft-capped scores: q (1, nh, n, hd), keys/vals (1, nkv,
    T, hd) -> (1, nh, n, hd); scores and softmax in float32, as transformers."""
    nh, n, hd = q.shape[1], q.shape[2], q.shape[3]
    nkv, t = keys.shape[1], keys.shape[2]
    qg = q.reshape(1, nkv, nh // nkv, n, hd).astype(mx.float32) * scale
    scores = qg @ keys.astype(mx.float32)[:, :, None].swapaxes(-1, -2)
    scores = mx.tanh(scores / cap) * cap  # (1, nkv, rep, n, T)
    if mask == "causal":  # lower-right aligned, as the fused kernel's
        mask = mx.arange(t - n, t)[:, None] >= mx.arange(t)[None, :]
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf)
    probs = mx.softmax(scores, axis=-1)
    out = probs @ vals.astype(mx.float32)[:, :, None]
    return out.reshape(1, nh, n, hd).astype(q.dtype)
