"""A JAX stage's weights: read from a TensorSource, then fused and laid out on the device.

Layer entries (see llama.stage_step): wqkv (D, (nh + 2 nkv) hd); wo (nh hd, D);
wgu (D, 2 I); wd (I, D); with attention_bias bqkv ((nh + 2 nkv) hd,); with
qk_norm q_norm, k_norm (hd,). The RMSNorm weight before a projection is folded
into its rows: (x * r * g) @ W == (x * r) @ (g[:, None] * W).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cake.config import ModelConfig
from cake.rope import rope_cos_sin, rope_inv_freq
from cake.shard import Shard
from cake.weights import TensorSource

Params = dict[str, Any]  # pytree of arrays
_F32 = jnp.float32


# Each runs jitted on the device that holds its inputs, compiled once per shape
# (every layer of a model shares them). The math is float32 on values already
# rounded to the model dtype; only the result is rounded to the stored dtype.
@partial(jax.jit, static_argnames="store")
def _fold(norm: jax.Array, *ws: jax.Array, store: np.dtype) -> jax.Array:
    """norm[:, None] * concat(ws).T: projections fused for `x @ W`, norm folded in."""
    w = jnp.concatenate(ws).astype(_F32)
    return (norm.astype(_F32)[:, None] * w.T).astype(store)


@partial(jax.jit, static_argnames="store")
def _transpose(w: jax.Array, *, store: np.dtype) -> jax.Array:
    return w.astype(_F32).T.astype(store)


@partial(jax.jit, static_argnames="store")
def _cast(w: jax.Array, *, store: np.dtype) -> jax.Array:
    return w.astype(_F32).astype(store)


def load_params(
    config: ModelConfig,
    shard: Shard,
    tensors: TensorSource,
    model_dtype: np.dtype,
    store_dtype: np.dtype,
    max_context: int,
    device: jax.Device,
) -> Params:
    """The stage's weights on `device`, fused and pre-transposed for `x @ W`.

    Each tensor is rounded to `model_dtype` (the precision the model runs at) on
    the host and copied to the device as it is, one at a time; fusing, norm
    folding and transposes run there. Matrices are stored as `store_dtype`
    (float32 on the CPU, see stage.py), vectors as float32. Doing that work in
    NumPy instead took 37 of the 47 seconds of loading a 1B model on 2 cores.
    """

    def get(name: str) -> jax.Array:
        host = np.asarray(tensors.get(name)).astype(model_dtype, copy=False)
        return jax.device_put(host, device)

    def vec(name: str) -> jax.Array:
        return get(name).astype(_F32)

    store = np.dtype(store_dtype)
    params: Params = {"layers": []}
    for i in shard.layers:
        p = f"model.layers.{i}."
        at, mlp = p + "self_attn.", p + "mlp."
        qkv = [get(at + f"{x}_proj.weight") for x in "qkv"]
        gu = [get(mlp + f"{x}_proj.weight") for x in ("gate", "up")]
        layer = {
            "wqkv": _fold(get(p + "input_layernorm.weight"), *qkv, store=store),
            "wo": _transpose(get(at + "o_proj.weight"), store=store),
            "wgu": _fold(get(p + "post_attention_layernorm.weight"), *gu, store=store),
            "wd": _transpose(get(mlp + "down_proj.weight"), store=store),
        }
        del qkv, gu  # the unfused copies leave the device before the next layer
        if config.attention_bias:
            layer["bqkv"] = jnp.concatenate([vec(at + f"{x}_proj.bias") for x in "qkv"])
        if config.qk_norm:
            layer["q_norm"] = vec(at + "q_norm.weight")
            layer["k_norm"] = vec(at + "k_norm.weight")
        params["layers"].append(layer)
    tied = config.tie_word_embeddings
    if shard.head:
        params["norm"] = vec("model.norm.weight")
        head = "model.embed_tokens.weight" if tied else "lm_head.weight"
        params["head"] = _transpose(get(head), store=store)  # (D, V)
    if shard.embed and not (tied and shard.head):
        params["embed"] = _cast(get("model.embed_tokens.weight"), store=store)  # (V, D)
    # RoPE tables for every position of the context: (max_context, hd/2) each
    cos, sin = rope_cos_sin(rope_inv_freq(config), np.arange(max_context))
    half = config.head_dim // 2
    params["rope_cos"] = jax.device_put(cos[:, :half], device)
    params["rope_sin"] = jax.device_put(sin[:, :half], device)
    return params
