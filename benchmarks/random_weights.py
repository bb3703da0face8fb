"""Random models for the device benchmarks, made on demand: valid GGUF blocks of
any type, a tiny GGUF file of given shapes, and a TensorSource of a big model's
shapes that never holds the model on the host.

As tests/blocks.py makes blocks; written again here so that benchmarks need
nothing from tests/ for packed weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np

from cake.weights.packed import F16_FIELDS, Packed, as_float, gguf_block

# A Llama-3.2-1B-shaped model (a smaller vocabulary), for the files the
# benchmarks write.
SHAPE_1B = dict(
    model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=8192,
    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    head_dim=64, max_position_embeddings=2048, rms_norm_eps=1e-5,
    rope_theta=500000.0, tie_word_embeddings=True,
)  # fmt: skip


def random_blocks(
    fmt: str, n_blocks: int, std: float, rng: np.random.Generator
) -> np.ndarray:
    """uint8 (n_blocks, block_bytes): random valid `fmt` blocks that decode to
    mean ~0 and spread ~`std`.

    Random bytes with each float16 field set finite. Decoding is linear in those
    fields: the second (a min) is scaled to cancel the mean the first one's
    codes give, then both by one factor for the spread (fitted on a sample).
    """
    elems, nbytes = gguf_block(fmt)
    raw = rng.integers(0, 256, (n_blocks, nbytes), dtype=np.uint8)
    fields = F16_FIELDS[fmt]
    h = rng.uniform(0.25, 1.0, (len(fields), n_blocks)).astype(np.float32)

    def scaled(k: list[float], n: int) -> np.ndarray:
        b = raw[:n].copy()
        for off, hf, kf in zip(fields, h[:, :n], k, strict=True):
            b[:, off : off + 2] = (
                (hf * kf).astype(np.float16).view(np.uint8).reshape(-1, 2)
            )
        return b

    def decoded(k: list[float]) -> np.ndarray:
        n = min(n_blocks, 4096)
        return Packed(fmt, (n, elems), scaled(k, n)).dequantize()

    k = [1.0] * len(fields)
    if len(fields) == 2:
        k[1] = -decoded([1.0, 0.0]).mean() / decoded([0.0, 1.0]).mean()
    unit = decoded(k).std()
    return scaled([kf * std / unit for kf in k], n_blocks)


def random_packed(fmt: str, rows: int, cols: int, rng: np.random.Generator) -> Packed:
    """A random (rows, cols) `fmt` matrix of spread 1/sqrt(cols), as trained ones."""
    elems, _ = gguf_block(fmt)
    data = random_blocks(fmt, rows * cols // elems, cols**-0.5, rng)
    return Packed(fmt, (rows, cols), data.reshape(rows, -1))


def write_random_gguf(
    path: Path, model: dict, fmt: Callable[[str], str], seed: int = 0
) -> Path:
    """A llama GGUF of `model`'s shapes: matrices random valid blocks of
    `fmt(hf_name)`, norms float32 near 1. Rows are not permuted as llama.cpp's
    converter does: they are random, and both stages read them the same way."""
    import gguf

    from cake.config import ModelConfig
    from cake.pipeline import expected_shape
    from cake.weights.gguf import hf_name

    cfg = ModelConfig.from_dict(model)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    parts = (
        "attn_q attn_k attn_v attn_output ffn_gate ffn_up ffn_down attn_norm ffn_norm"
    )
    names = ["token_embd", "output_norm"] + ["output"] * (not cfg.tie_word_embeddings)
    names += [
        f"blk.{i}.{p}" for i in range(cfg.num_hidden_layers) for p in parts.split()
    ]
    rng = np.random.default_rng(seed)
    for name in names:
        hf = hf_name(name + ".weight")
        shape = expected_shape(cfg, hf)
        if len(shape) == 1:
            w.add_tensor(
                name + ".weight",
                (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32),
            )
        else:
            kind = fmt(hf)
            m = random_packed(kind, *shape, rng)
            w.add_tensor(
                name + ".weight", m.data, raw_dtype=gguf.GGMLQuantizationType[kind]
            )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


class RandomSource:
    """A TensorSource of random weights of `config`'s shapes, each tensor made
    when asked (the loader puts it on the device and drops it: the model is
    never held on the host).

    weights="bfloat16": matrix entries are +-[2**-7, 2**-6) with random
    mantissas (activations stay finite). A GGUF type ("Q8_0", ...): every
    matrix as `Packed` random valid blocks of that type, of spread
    1/sqrt(hidden). Either way a tensor is cut at a random offset from a pool
    of `pool_mib` MiB made once: fresh random bits for 8 billion entries took
    longer than loading them. Vectors are ones.
    """

    def __init__(self, config, weights: str = "bfloat16", pool_mib: int = 128) -> None:
        from cake.pipeline import expected_shape
        from cake.shard import Shard
        from cake.weights.names import shard_tensor_names

        names = shard_tensor_names(config, Shard.whole(config.num_hidden_layers))
        self.shapes = {n: expected_shape(config, n) for n in names}
        self.weights = weights
        self.rng = np.random.default_rng(0)
        if weights == "bfloat16":
            bits = np.frombuffer(self.rng.bytes(pool_mib * 2**20), np.uint16)
            self.pool = (bits & np.uint16(0x807F)) | np.uint16(0x3C00)  # sign, mantissa
        else:
            _, nbytes = gguf_block(weights)
            n = pool_mib * 2**20 // nbytes
            self.pool = random_blocks(weights, n, config.hidden_size**-0.5, self.rng)

    def keys(self) -> list[str]:
        return list(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def __contains__(self, name: object) -> bool:
        return name in self.shapes

    def _cut(self, n: int) -> np.ndarray:
        """n consecutive entries (bf16 bits or blocks) of the pool, wrapping, read-only."""
        k = len(self.pool)
        off = int(self.rng.integers(k))
        reps = (-(-(n + off) // k),) + (1,) * (self.pool.ndim - 1)
        out = np.tile(self.pool, reps)[off : off + n]
        out.setflags(write=False)  # the loader aliases read-only arrays, no copy
        return out

    def stored(self, name: str) -> np.ndarray | Packed:
        shape = self.shapes[name]
        if len(shape) == 1:
            return np.ones(shape, np.float32)
        if self.weights == "bfloat16":
            return (
                self._cut(int(np.prod(shape))).view(ml_dtypes.bfloat16).reshape(shape)
            )
        elems, _ = gguf_block(self.weights)
        data = self._cut(shape[0] * shape[1] // elems).reshape(shape[0], -1)
        return Packed(self.weights, shape, data)

    def get(self, name: str) -> np.ndarray:
        return as_float(self.stored(name))

    def nbytes(self, name: str) -> int:
        """Bytes the tensor takes on the device (vectors are float32 there)."""
        shape = self.shapes[name]
        n = int(np.prod(shape))
        if len(shape) == 1:
            return 4 * n
        if self.weights == "bfloat16":
            return 2 * n
        elems, nbytes = gguf_block(self.weights)
        return n // elems * nbytes

    def weight_bytes_per_token(self) -> int:
        """Bytes decode reads per token: every matrix, the head, one embedding row."""
        total = sum(self.nbytes(n) for n in self.shapes)
        if "lm_head.weight" in self.shapes:  # untied: the embedding is only indexed
            total -= self.nbytes("model.embed_tokens.weight")
        return total
