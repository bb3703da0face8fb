"""A JAX stage's weights: read from a TensorSource as stored, placed on the device.

Layer entries (cake.weights.layer's roles; see llama.layer): ln1, ln2 (D,)
float32 RMSNorm weights (the attention's and the MLP's; Gemma's 1 + w, see
layer.norm_vector), with post-norms (Gemma 2/3) ln1_post, ln2_post on their
outputs; wqkv, wgu: tuples of
weights whose outputs concatenate to the q|k|v and gate|up projections (one
fused weight when the parts share a format, else one per part); wo, wd: single
weights; a MoE layer (cake.config.Moe) adds router, experts (wgu and wd, each
a stack of every expert's matrices: _Loader.stacked) and, with its shared expert in wgu/wd, shared_gate; with attention_bias bqkv ((nh + 2 nkv) hd,); with a q/k norm q_norm,
k_norm ((hd,) per head, or the projection's width: see Family.qk_norm). A weight is a float (K, N) matrix for XLA
(`x @ W`) or a linear.QMat in the checkpoint's format (see linear.py).

Nothing is widened: quantized matrices keep their blocks, 16-bit floats stay
16-bit (on the CPU the kernels read them as they are), float32 matrices stay
(N, K) as stored where the CPU kernels multiply them (format "F32"; without
the kernels, or off the CPU, XLA's (K, N) copy), and a read-only
memory-mapped tensor goes onto the CPU device without a copy. The one change:
layer matrices and the head that the CPU kernels multiply are repacked at load
into their tiled forms (cake.kernels.cpu.repack_np, same size): the block
formats into tiles of 8 rows, F16 / BF16 / F32 (with AVX-512) into tiles of 32
rows, which batches of sequences multiply at a fraction of the per-row cost;
CAKE_CPU_REPACK=0 keeps the file's layout (to measure the difference). A tied
head doubles as the embedding table: linear.take_rows reads rows out of the
tiles.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cake.backends.jax.linear import QMat, Weight
from cake.config import ModelConfig
from cake.errors import ModelError
from cake.kernels.cpu import ALIGN, empty_aligned
from cake.rope import rope_attention_factor, rope_cos_sin, rope_inv_freq
from cake.shard import Shard
from cake.weights import TensorSource
from cake.weights.layer import norm_vector, read_layer
from cake.weights.packed import Packed, Stored, release_pages, stored_tensor

Params = dict[str, Any]  # pytree of arrays
_F32 = jnp.float32
_FLOAT_FORMATS = {np.dtype(jnp.float16): "F16", np.dtype(jnp.bfloat16): "BF16"}


@partial(jax.jit, static_argnames="store")
def _transpose(w: jax.Array, *, store: np.dtype) -> jax.Array:
    return w.astype(_F32).T.astype(store)


def _aligned_copy(a: np.ndarray) -> np.ndarray:
    """A read-only copy of `a` starting on an ALIGN-byte boundary."""
    out = empty_aligned(a.shape, a.dtype)
    out[...] = a
    out.setflags(write=False)
    return out


class _Loader:
    """Turns stored tensors into device weights, one matrix at a time.

    kernels: the formats the CPU kernels multiply on this device (empty off the
    CPU). model_dtype: float matrices wider than it are rounded to it, as the
    model runs at that precision; narrower ones stay as stored.
    """

    def __init__(
        self, model_dtype: np.dtype, device: jax.Device, kernels: frozenset[str]
    ) -> None:
        self.model_dtype, self.device = model_dtype, device
        self.kernels = kernels
        self.on_cpu = device.platform == "cpu"
        self.repack = os.environ.get("CAKE_CPU_REPACK", "1") != "0"

    def put(self, a: np.ndarray) -> jax.Array:
        """`a` on the device. On the CPU a read-only, 64-byte aligned host array
        is aliased (no copy), so each weight is held once: a file view that
        qualifies stays the file's pages; anything else (the loader's own
        copies, GGUF tensors aligned to 32 only) is first copied into an aligned
        read-only buffer, and the file pages it came from are dropped."""
        if a.flags.writeable or a.ctypes.data % ALIGN:
            src, a = a, _aligned_copy(a)
            release_pages(src)
        return jax.device_put(a, self.device, may_alias=True)

    def vector(self, w: Stored) -> jax.Array:
        return jax.device_put(np.asarray(w, np.float32), self.device)

    def _float(self, w: np.ndarray) -> np.ndarray:
        if w.dtype.itemsize > self.model_dtype.itemsize or (
            w.dtype.itemsize == self.model_dtype.itemsize
            and w.dtype != self.model_dtype
        ):
            return w.astype(self.model_dtype)
        return w

    def matrices(
        self, parts: tuple[Stored, ...], rows: bool = False, repack: bool = False
    ) -> tuple[Weight, ...]:
        """The stored (out, in) tensors `parts` as weights whose outputs concatenate.

        rows: for a table looked up by rows, a float matrix stays (out, in).
        repack: a matrix only multiplied (never looked up by rows, which
        cake.kernels.jax decodes in the file's layout) may be repacked for the
        CPU kernels.
        """
        return tuple(self._weight(g, rows, repack) for g in self._groups(parts))

    def _groups(self, parts: tuple[Stored, ...]) -> list[list]:
        """Consecutive parts of one kind (format and width): each one product."""
        parts = [p if isinstance(p, Packed) else self._float(p) for p in parts]
        groups: list[list] = []
        for p in parts:
            if groups and _kind(groups[-1][0]) == _kind(p):
                groups[-1].append(p)
            else:
                groups.append([p])
        return groups

    def _float_format(self, dtype: np.dtype, rows: bool) -> str | None:
        """The QMat format of a float (N, K) matrix on the CPU: F16 / BF16
        always; F32 where the CPU kernels multiply it (a table only looked up
        by rows stays a plain array)."""
        fmt = _FLOAT_FORMATS.get(np.dtype(dtype))
        if fmt is None and np.dtype(dtype) == np.float32 and not rows:
            return "F32" if "F32" in self.kernels else None
        return fmt

    def _repackable(self, fmt: str) -> bool:
        """Whether the CPU kernels here multiply fmt's repacked form."""
        from cake.kernels import cpu

        return cpu.REPACKED.get(fmt) in self.kernels

    def _weight(self, group: list, rows: bool, repack: bool) -> Weight:
        first = group[0]
        if isinstance(first, Packed):
            cat = [
                np.concatenate([getattr(p, a) for p in group])
                if len(group) > 1
                else getattr(first, a)
                for a in ("data", "scales", "biases")
                if getattr(first, a) is not None
            ]
            data, *sb = cat
            scales, biases = (sb + [None, None])[:2]
            if len(group) > 1:
                for p in group:  # copied: the file's pages need not stay resident
                    release_pages(p.data)
            on = self.on_cpu and first.format in self.kernels and first.scales is None
            fmt = first.format
            if on and repack and self.repack:
                from cake.kernels import cpu

                if self._repackable(fmt):
                    fmt, repacked = cpu.repack_np(data, fmt)
                    if repacked is not data:
                        # a new array, aliased by put; the file's pages go
                        release_pages(data)
                        data = repacked
                        data.setflags(write=False)
            return QMat(
                self.put(data),
                None if scales is None else self.put(scales),
                None if biases is None else self.put(biases),
                fmt=fmt,
                cols=first.shape[1],
                kernel=on,
            )
        w = np.concatenate(group) if len(group) > 1 else first  # (N, K)
        if w is not first:
            for p in group:
                release_pages(p)
        fmt = self._float_format(w.dtype, rows)
        if self.on_cpu and fmt is not None:
            # XLA on the CPU widens a 16-bit matrix on every product (~250 ms
            # for SmolLM2's products vs 25 in float32): the kernels read it as
            # it is. Without them it stays 16-bit all the same (slow, compact).
            # Float32 goes to the kernels as stored (no transposed copy) only
            # where they are built.
            w = np.ascontiguousarray(w)
            if repack and self.repack and self._repackable(fmt):
                from cake.kernels import cpu

                fmt, tiled = cpu.repack_np(w, fmt)
                if tiled is not w:
                    release_pages(w)
                    w = tiled
                    w.setflags(write=False)
            return QMat(
                self.put(w), fmt=fmt, cols=w.shape[1], kernel=fmt in self.kernels
            )
        if rows:
            return self.put(np.ascontiguousarray(w))
        return _transpose(self.put(np.ascontiguousarray(w)), store=w.dtype)

    def stacked(
        self, experts: tuple[tuple[Stored, ...], ...], repack: bool = True
    ) -> tuple[Weight, ...]:
        """Each expert's parts (rows stacking as in `matrices`) as weights of
        E stacked matrices, for linear.mm_expert: a QMat whose data is (E, N,
        ...) blocks (each expert's matrix repacked on its own, N a multiple of
        8 as the repack requires), or a
        float (E, K, N). The stack is one copy; the file's pages go."""
        per = [[_cat(g) for g in self._groups(parts)] for parts in experts]
        kinds = {tuple(_kind(w) for w in ws) for ws in per}
        if len(kinds) != 1:
            raise ModelError(
                "the experts of a layer are stored in different formats; cake "
                "needs each of their matrices in one format across experts"
            )
        return tuple(
            self._stack([ws[j] for ws in per], repack) for j in range(len(per[0]))
        )

    def _stack(self, mats: list, repack: bool) -> Weight:
        first = mats[0]
        if isinstance(first, np.ndarray):  # float (N, K) each
            w = np.stack(mats)  # (E, N, K), already in the model's dtype (_groups)
            for m in mats:
                release_pages(m)
            fmt = self._float_format(w.dtype, rows=False)
            if self.on_cpu and fmt is not None:
                return QMat(
                    self.put(w), fmt=fmt, cols=w.shape[2], kernel=fmt in self.kernels
                )
            return _transpose_stack(self.put(w), store=w.dtype)
        data = np.stack([m.data for m in mats])  # (E, N, row)
        sb = [
            None
            if getattr(first, a) is None
            else np.stack([getattr(m, a) for m in mats])
            for a in ("scales", "biases")
        ]
        for m in mats:
            release_pages(m.data)
        on = self.on_cpu and first.format in self.kernels and first.scales is None
        fmt = first.format
        if on and repack and self.repack:
            from cake.kernels import cpu

            if self._repackable(fmt):
                # expert by expert: each matrix's tiles pair up within it
                # (cpu.interleave), whatever the parity of its tile count
                out, to = cpu.empty_aligned(data.shape, data.dtype), fmt
                for i in range(data.shape[0]):
                    to, out[i] = cpu.repack_np(data[i], fmt)
                fmt, data = to, out
        data.setflags(write=False)
        return QMat(
            self.put(data),
            *(None if a is None else self.put(a) for a in sb),
            fmt=fmt,
            cols=first.shape[1],
            kernel=on,
        )


@partial(jax.jit, static_argnames="store")
def _transpose_stack(w: jax.Array, *, store: np.dtype) -> jax.Array:
    return jnp.swapaxes(w.astype(_F32), 1, 2).astype(store)


def _cat(group: list) -> Stored:
    """A group's parts as one stored matrix of their rows (the part itself if one)."""
    if len(group) == 1:
        return group[0]
    first = group[0]
    if isinstance(first, Packed):
        rows = sum(p.shape[0] for p in group)
        arrays = {
            a: None
            if getattr(first, a) is None
            else np.concatenate([getattr(p, a) for p in group])
            for a in ("data", "scales", "biases")
        }
        out: Stored = Packed(first.format, (rows, first.shape[1]), **arrays)
        for p in group:
            release_pages(p.data)
        return out
    out = np.concatenate(group)
    for p in group:
        release_pages(p)
    return out


def _kind(p) -> tuple:
    if isinstance(p, Packed):
        return ("packed", p.format, p.shape[1])
    return ("float", p.dtype, p.shape[1])


def load_params(
    config: ModelConfig,
    shard: Shard,
    tensors: TensorSource,
    model_dtype: np.dtype,
    max_context: int,
    device: jax.Device,
    kernels: frozenset[str] = frozenset(),
) -> Params:
    """The stage's weights on `device`, as stored (see the module docstring)."""
    load = _Loader(np.dtype(model_dtype), device, kernels)
    mats = partial(load.matrices, repack=True)  # layer matrices: products only
    params: Params = {"layers": []}
    for i in shard.layers:
        lw = read_layer(config, tensors, i)
        layer = {
            "ln1": load.vector(norm_vector(config, lw.attn_norm)),
            "ln2": load.vector(norm_vector(config, lw.mlp_norm)),
            "wqkv": mats(lw.qkv),
            "wo": mats((lw.o,))[0],
        }
        if lw.down is not None:  # the dense MLP, or a MoE layer's shared expert
            layer["wgu"] = mats(lw.gate_up)
            layer["wd"] = mats((lw.down,))[0]
        if lw.router is not None:
            layer["router"] = mats((lw.router,))[0]
            # each role's experts stacked (E, ...): one program for every expert
            layer["experts"] = {
                "wgu": load.stacked(lw.expert_gate_up),
                "wd": load.stacked(tuple((d,) for d in lw.expert_down))[0],
            }
            if lw.shared_gate is not None:
                layer["shared_gate"] = mats((lw.shared_gate,))[0]
        if lw.qkv_bias:
            layer["bqkv"] = jnp.concatenate([load.vector(b) for b in lw.qkv_bias])
        if lw.q_norm is not None:
            layer["q_norm"] = load.vector(norm_vector(config, lw.q_norm))
            layer["k_norm"] = load.vector(norm_vector(config, lw.k_norm))
        if lw.attn_post_norm is not None:
            layer["ln1_post"] = load.vector(norm_vector(config, lw.attn_post_norm))
            layer["ln2_post"] = load.vector(norm_vector(config, lw.mlp_post_norm))
        params["layers"].append(layer)
    tied = config.tie_word_embeddings
    embed = "model.embed_tokens.weight"
    if shard.head:
        norm = stored_tensor(tensors, "model.norm.weight")
        params["norm"] = load.vector(norm_vector(config, norm))
        head = embed if tied else "lm_head.weight"
        # (D, V) float or QMat (V, ...); repacked too: linear.take_rows reads
        # the tiles when the tied head doubles as the embedding
        params["head"] = mats((stored_tensor(tensors, head),))[0]
    if shard.embed and not (tied and shard.head):
        # (V, D) float, or QMat (V, ...)
        table = stored_tensor(tensors, embed)
        params["embed"] = load.matrices((table,), rows=True)[0]
    # RoPE tables for every position of the context: (max_context, hd/2) each;
    # "_local" ones for the layers with a RoPE base of their own (Gemma 3)
    half = config.head_dim // 2
    for local in {config.local_rope(i) for i in shard.layers} | {False}:
        cos, sin = rope_cos_sin(
            rope_inv_freq(config, max_context, local),
            np.arange(max_context),
            rope_attention_factor(config, local),
        )
        suffix = "_local" if local else ""
        params["rope_cos" + suffix] = jax.device_put(cos[:, :half], device)
        params["rope_sin" + suffix] = jax.device_put(sin[:, :half], device)
    return params


FLOAT_FORMATS = frozenset({"F32", "F16", "BF16", "F32P", "F16P", "BF16P"})


def rounded_activations(params: Params) -> bool:
    """Whether some layer matrix is a GGUF integer format (its blocks or their
    repacked tiles) that the CPU kernels multiply: their products round the
    activations to 8 bits per block, as llama.cpp's do (MLX groups and float
    matrices are multiplied in float32 on the activations as they are)."""
    leaves = jax.tree_util.tree_leaves(
        params["layers"], is_leaf=lambda a: isinstance(a, QMat)
    )
    return any(
        isinstance(a, QMat) and a.kernel and a.fmt not in FLOAT_FORMATS for a in leaves
    )


def weight_bytes(params: Params) -> int:
    """Bytes of the weights the params hold (the RoPE tables excluded)."""
    leaves = jax.tree_util.tree_leaves(
        {k: v for k, v in params.items() if not k.startswith("rope_")}
    )
    return sum(int(a.nbytes) for a in leaves)
