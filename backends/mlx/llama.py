"""Llama family (llama, mistral, qwen2, qwen3) on MLX, in the model dtype.

Weights stay as compact as the checkpoint (see quant.py): float matrices in
their stored dtype, quantized ones as `mx.quantized_matmul` operands.

Each layer is two compiled functions around the attention: `_attn_in` (norm,
fused q/k/v projection, q/k norm, RoPE) and `_attn_out` (o projection and the
MLP). Attention itself runs per sequence on that sequence's own KV cache, so a
batch may mix sequences at any positions and lengths and still give exactly
what each would give alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import ml_dtypes
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from cake.backends.base import DeviceInfo, Step
from cake.backends.mlx.quant import (
    from_numpy,
    fuse,
    linear,
    linears,
    load_linear,
    take_rows,
)
from cake.config import ModelConfig
from cake.kv import check_step, dtype_of
from cake.rope import rope_inv_freq
from cake.sequence import StageSequences
from cake.shard import Shard
from cake.weights import TensorSource
from cake.weights.names import head_tensor_names
from cake.weights.packed import stored_tensor

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

        def vector(name: str) -> mx.array:  # norms and biases: small, model dtype
            return to_mx(tensors.get(name), dtype)

        def matrix(name: str) -> dict:
            return load_linear(stored_tensor(tensors, name), model_dtype)

        self.embed = matrix("model.embed_tokens.weight") if shard.embed else None
        self.layers = [self._load_layer(vector, matrix, i) for i in shard.layers]
        held = [self.embed, *self.layers]
        if shard.head:
            norm, head = head_tensor_names(config)
            self.norm = vector(norm)
            tied = head == "model.embed_tokens.weight" and self.embed is not None
            self.lm_head = self.embed if tied else matrix(head)
            held += [self.norm, self.lm_head]
        # bytes of every array the stage keeps (a tied head counted once)
        self.weight_bytes = sum(a.nbytes for a in _arrays(held))
        # mx.fast.rope takes periods (1 / inverse frequency), not frequencies.
        self.rope_periods = mx.array(1.0 / rope_inv_freq(config))
        self._attn_in = mx.compile(self._attn_in_fn)
        self._attn_out = mx.compile(self._attn_out_fn)
        mx.eval(held)
        self.caches: dict[int, _SeqCache] = {}
        self.seqs = StageSequences(max_sequences, max_context)

    def _load_layer(self, vector, matrix, i: int) -> dict:
        # q/k/v as one (q+2kv)*hd x D product and gate/up as one 2I x D product
        # where their layouts match (fuse); else a list of separate products.
        p = f"model.layers.{i}."
        w = {
            "ln1": vector(p + "input_layernorm.weight"),
            "ln2": vector(p + "post_attention_layernorm.weight"),
            "qkv": fuse([matrix(p + f"self_attn.{x}_proj.weight") for x in "qkv"]),
            "o": matrix(p + "self_attn.o_proj.weight"),
            "gate_up": fuse(
                [matrix(p + f"mlp.{x}_proj.weight") for x in ("gate", "up")]
            ),
            "down": matrix(p + "mlp.down_proj.weight"),
        }
        if self.config.attention_bias:
            w["qkv_bias"] = mx.concatenate(
                [vector(p + f"self_attn.{x}_proj.bias") for x in "qkv"]
            )
        if self.config.qk_norm:
            w["q_norm"] = vector(p + "self_attn.q_norm.weight")
            w["k_norm"] = vector(p + "self_attn.k_norm.weight")
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
        else:
            h = to_mx(x, self.dtype)  # (B, L, D)
        caches = [
            self.caches.get(s) or _SeqCache(len(self.shard), self.max_context)
            for s in step.seq_ids
        ]
        offsets = mx.array(np.asarray(step.positions, np.int32))
        for j, w in enumerate(self.layers):
            q, k, v = self._attn_in(h, w, offsets)  # (B, heads, L, hd)
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
        h = mx.fast.rms_norm(h, self.norm, cfg.rms_norm_eps)
        if not step.all_logits:
            h = h[mx.arange(step.batch), lengths - 1]  # (B, D)
        logits = linear(h, self.lm_head, mx.float32)
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
        scale = 1.0 / math.sqrt(self.config.head_dim)
        window = self.config.sliding_window
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
            o = mx.fast.scaled_dot_product_attention(
                q[b : b + 1, :, :n], keys, vals, scale=scale, mask=mask
            )
            if n < step.max_len:
                o = mx.pad(o, [(0, 0), (0, 0), (0, step.max_len - n), (0, 0)])
            outs.append(o)
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)

    def _attn_in_fn(
        self, h: mx.array, w: dict[str, mx.array], offsets: mx.array
    ) -> tuple[mx.array, mx.array, mx.array]:
        cfg = self.config
        B, L, _ = h.shape
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        a = mx.fast.rms_norm(h, w["ln1"], cfg.rms_norm_eps)
        qkv = linears(a, w["qkv"])  # (B, L, (nh + 2 nkv) hd)
        if "qkv_bias" in w:
            qkv = qkv + w["qkv_bias"]
        q, k, v = mx.split(qkv, [nh * hd, (nh + nkv) * hd], axis=-1)
        q = q.reshape(B, L, nh, hd)
        k = k.reshape(B, L, nkv, hd)
        v = v.reshape(B, L, nkv, hd).transpose(0, 2, 1, 3)
        if "q_norm" in w:
            q = mx.fast.rms_norm(q, w["q_norm"], cfg.rms_norm_eps)
            k = mx.fast.rms_norm(k, w["k_norm"], cfg.rms_norm_eps)
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)  # (B, heads, L, hd)
        rope = dict(
            traditional=False,  # HF's rotate_half layout
            base=None,
            scale=1.0,
            offset=offsets,  # (B,) each sequence's first position
            freqs=self.rope_periods,
        )
        return mx.fast.rope(q, hd, **rope), mx.fast.rope(k, hd, **rope), v

    def _attn_out_fn(
        self, h: mx.array, attn: mx.array, w: dict[str, mx.array]
    ) -> mx.array:
        cfg = self.config
        B, L, _ = h.shape
        attn = attn.transpose(0, 2, 1, 3).reshape(B, L, -1)
        h = h + linear(attn, w["o"])
        m = mx.fast.rms_norm(h, w["ln2"], cfg.rms_norm_eps)
        gate, up = mx.split(linears(m, w["gate_up"]), 2, axis=-1)
        return h + linear(gate * mx.sigmoid(gate) * up, w["down"])
