"""Rotary position embedding frequencies, shared by every backend (HF conventions).

Partial rotary (`partial_rotary_factor` < 1, Phi-4-mini): transformers turns the
first rotary_dim dims of each head, pairing i with i + rotary_dim/2. cake turns
every head in the full-width layout instead (pairs i, i + head_dim/2), with
the dims that do not turn moved into pairs whose inverse frequency is 0 (cos 1,
sin 0): cake.weights.layer reorders the q and k rows at load, the same way for
both, so q . k is unchanged, and every backend and kernel rotates as for a
full-width head.
"""

from __future__ import annotations

import math

import numpy as np

from cake.config import ModelConfig, RopeScaling


def rope_inv_freq(
    config: ModelConfig, context: int | None = None, local: bool = False
) -> np.ndarray:
    """(head_dim // 2,) float32 inverse frequencies, with llama3, longrope or
    linear scaling if configured; 0 for the pairs that do not turn (partial
    rotary).

    Computed in float32 like transformers, so positions rotate identically.
    context: the positions the stage caches. Longrope's long factors apply when
    it exceeds original_max_position_embeddings, for every position: chosen
    once per stage, as llama.cpp chooses by its context (transformers switches
    per forward call, by the call's last position).
    local: the frequencies of the layers that `config.local_rope` names
    (rope_local_base_freq, never scaled: Gemma 3's sliding layers).
    """
    d = config.rotary_dim
    exps = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    theta = config.rope_local_base_freq if local else config.rope_theta
    base = np.float32(theta) ** exps
    inv = (np.float32(1.0) / base).astype(np.float32)
    rs = None if local else config.rope_scaling
    if rs is not None and rs.rope_type == "linear":
        inv = (inv / np.float32(rs.factor)).astype(np.float32)
    elif rs is not None and rs.rope_type == "longrope":
        long = context is not None and context > rs.original_max_position_embeddings
        ext = np.asarray(rs.long_factor if long else rs.short_factor, np.float32)
        inv = (np.float32(1.0) / (ext * base)).astype(np.float32)
    elif rs is not None:
        inv = _llama3(inv, rs)
    return np.concatenate([inv, np.zeros((config.head_dim - d) // 2, np.float32)])


def _llama3(inv: np.ndarray, rs: RopeScaling) -> np.ndarray:
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    out = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * out / rs.factor + smooth * out
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, out).astype(np.float32)


def rope_attention_factor(config: ModelConfig, local: bool = False) -> float:
    """The factor transformers scales cos and sin by (longrope's; else 1)."""
    rs = config.rope_scaling
    return 1.0 if rs is None or local else rs.attention_factor


def rope_cos_sin(
    inv_freq: np.ndarray, positions: np.ndarray, attention_factor: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape positions.shape + (head_dim,), float32 (HF's rotate_half layout).

    attention_factor scales cos and sin of the pairs that turn; those that do
    not (inverse frequency 0) keep cos 1, sin 0, as transformers leaves them.
    """
    freqs = positions.astype(np.float32)[..., None] * inv_freq
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb), np.sin(emb)
    if attention_factor != 1.0:
        turn = np.concatenate([inv_freq, inv_freq]) > 0
        scale = np.where(turn, np.float32(attention_factor), np.float32(1.0))
        cos, sin = cos * scale, sin * scale
    return cos, sin
