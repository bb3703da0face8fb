"""Rotary position embedding frequencies, shared by every backend (HF conventions)."""

from __future__ import annotations

import math

import numpy as np

from cake.config import ModelConfig


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """(head_dim // 2,) float32 inverse frequencies, with llama3 scaling if configured.

    Computed in float32 like transformers, so positions rotate identically.
    """
    d = config.head_dim
    exps = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    inv = (np.float32(1.0) / (np.float32(config.rope_theta) ** exps)).astype(np.float32)
    rs = config.rope_scaling
    if rs is None:
        return inv
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


def rope_cos_sin(
    inv_freq: np.ndarray, positions: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape positions.shape + (head_dim,), float32 (HF's rotate_half layout)."""
    freqs = positions.astype(np.float32)[..., None] * inv_freq
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb), np.sin(emb)
