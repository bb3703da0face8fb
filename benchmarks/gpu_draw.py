"""gpu_check.py's draw part (`gpu_check.py draw [--smoke] [--json FILE]`).

draw: the head stage's draw through XLA (backends/jax/draw.py, the GPUs'):
8 rows of random logits of Llama 3's vocabulary (128256) per setting
(greedy, temperature, top-k 40, top-p 0.9, both), 64 numbers each, against
the host's draw from the same logits (cake.sampling.draw_rows): the share of
equal tokens (a draw may differ where r or the top-p cut falls within
float32 rounding of a boundary) and whether every token is one the host's
rules keep; and the jitted draw's time per call next to the greedy one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def draw_check(smoke: bool, log: Callable[[str], None]) -> dict:
    """See the module."""
    import jax

    from cake.backends.base import Draw
    from cake.backends.jax import draw as jdraw
    from cake.sampling import draw_rows

    b, v, reps = 8, 1000 if smoke else 128256, 8
    rng = np.random.default_rng(0)
    f = jax.jit(lambda *a: jdraw.draw_tokens(*a, kernel=False))
    settings = {
        "greedy": (0.0, 0, 1.0),
        "temperature": (0.8, 0, 1.0),
        "top-k 40": (0.8, 40, 1.0),
        "top-p 0.9": (0.8, 0, 0.9),
        "top-k 40, top-p 0.95": (0.8, 40, 0.95),
    }
    row: dict = {
        "what": "draw",
        "batch": b,
        "vocab": v,
        "device": str(jax.devices()[0]),
    }
    ok = True
    for name, (t, k, p) in settings.items():
        logits = (rng.standard_normal((b, v)) * 3).astype(np.float32)
        dev = jax.device_put(logits)
        same = total = 0
        for _ in range(reps):
            d = Draw((t,) * b, (0.0,) * b, tuple(rng.random(b)), (k,) * b, (p,) * b)
            inputs = jax.device_put(jdraw.host_inputs(d, b))
            got = np.asarray(f(dev, *inputs))
            want = draw_rows(logits, d)
            same += int((got == want).sum())
            total += b
            for i, tok in enumerate(got.tolist()):  # one the host's rules keep
                z = logits[i] / np.float32(t) if t else logits[i]
                if k and z[tok] < np.sort(z)[-k]:
                    ok = False
        f(dev, *inputs).block_until_ready()
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            f(dev, *inputs).block_until_ready()
            times.append(time.perf_counter() - t0)
        row[name] = {"equal": same / total, "ms": 1e3 * min(times)}
        log(f"draw {name}: {same}/{total} tokens equal, {1e3 * min(times):.3f} ms")
        ok = ok and same >= 0.95 * total
    row["ok"] = ok
    return row
