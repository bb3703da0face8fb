"""The NumPy reference of the fused attention kernel (kernels/cpu/src/attention.cc)
and the cases the kernel tests share.

The reference is written from the definition in float64: rope k and v into the
cache for every real token, then each query head attends with softmax to its
slot's positions [lo, t] (scores scaled, and soft-capped where asked: Gemma).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Case:
    name: str
    nh: int
    nkv: int
    hd: int
    slots: tuple[int, ...]
    positions: tuple[int, ...]
    lengths: tuple[int, ...]
    L: int = 1
    T: int = 64
    S: int = 4
    n_layers: int = 2
    layer: int = 1
    window: int = 0
    scale: float | None = None  # None: 1 / sqrt(hd)
    softcap: float = 0.0


GQA = (9, 3, 64)  # SmolLM2-135M
MHA = (4, 4, 32)


def rope_ref(x: np.ndarray, c: np.ndarray, s: np.ndarray) -> np.ndarray:
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def attention_ref(
    qkv,
    cos,
    sin,
    cache,
    slots,
    positions,
    lengths,
    *,
    n_heads,
    layer,
    window=0,
    scale=None,
    softcap=0.0,
    attend_over=None,
):
    """(out float64, cache float64 after the writes, mask of the entries written).

    attend_over: a cache whose written entries are used instead of the
    reference's own for the attention (a 16-bit kernel's rounded k and v)."""
    qkv, cos, sin = (np.asarray(a, np.float64) for a in (qkv, cos, sin))
    cache = np.array(cache, np.float64)
    written = np.zeros(cache.shape, bool)
    b_, n_, _ = qkv.shape
    nkv, hd = cache.shape[3], cache.shape[5]
    nh, rep = n_heads, n_heads // nkv
    out = np.zeros((b_, n_, nh * hd))
    tokens = [(b, i) for b in range(b_) for i in range(lengths[b])]
    for b, i in tokens:
        t, x = positions[b] + i, qkv[b, i]
        k = x[nh * hd : (nh + nkv) * hd].reshape(nkv, hd)
        v = x[(nh + nkv) * hd :].reshape(nkv, hd)
        cache[layer, 0, slots[b], :, t] = rope_ref(k, cos[b, i], sin[b, i])
        cache[layer, 1, slots[b], :, t] = v
        written[layer, :, slots[b], :, t] = True
    seen = cache
    if attend_over is not None:
        seen = cache.copy()
        seen[written] = np.asarray(attend_over, np.float64)[written]
    for b, i in tokens:
        t = positions[b] + i
        lo = max(0, t - window + 1) if window > 0 else 0
        q = rope_ref(qkv[b, i, : nh * hd].reshape(nh, hd), cos[b, i], sin[b, i])
        q *= 1 / np.sqrt(hd) if scale is None else scale
        for j in range(nh):
            keys = seen[layer, 0, slots[b], j // rep, lo : t + 1]
            vals = seen[layer, 1, slots[b], j // rep, lo : t + 1]
            scores = keys @ q[j]
            if softcap:
                scores = softcap * np.tanh(scores / softcap)
            p = np.exp(scores - scores.max())
            out[b, i, j * hd : (j + 1) * hd] = p @ vals / p.sum()
    return out, cache, written


def make_inputs(c: Case, seed: int = 0):
    rng = np.random.default_rng(seed)
    b = len(c.slots)
    qkv = rng.standard_normal((b, c.L, (c.nh + 2 * c.nkv) * c.hd)).astype(np.float32)
    tpos = np.asarray(c.positions)[:, None] + np.arange(c.L)  # (B, L)
    inv_freq = 10000.0 ** (-np.arange(c.hd // 2) / (c.hd // 2))
    angles = tpos[..., None] * inv_freq
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    cache = rng.standard_normal((c.n_layers, 2, c.S, c.nkv, c.T, c.hd)).astype(
        np.float32
    )
    ints = [np.asarray(a, np.int32) for a in (c.slots, c.positions, c.lengths)]
    return qkv, cos, sin, cache, *ints


def kwargs(c: Case) -> dict[str, float]:
    return {
        "n_heads": c.nh,
        "layer": c.layer,
        "window": c.window,
        "scale": c.scale,
        "softcap": c.softcap,
    }


def check(c: Case, out, cache, before, ref) -> None:
    want, want_cache, written = ref
    out, cache = np.asarray(out), np.asarray(cache)
    assert out.shape == want.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5, err_msg=c.name)
    for b, n in enumerate(c.lengths):
        assert not out[b, n:].any(), f"{c.name}: padding rows must be zero"
    # the writes (rope of k in float32: within rounding), and nothing else touched
    np.testing.assert_allclose(
        cache[written], want_cache[written], rtol=1e-6, atol=1e-6
    )
    np.testing.assert_array_equal(cache[~written], before[~written])
