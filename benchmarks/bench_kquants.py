"""The K-quant CPU kernels (Q2_K ... Q6_K) next to XLA's float32 dot, same run.

    .venv/bin/python benchmarks/bench_kquants.py [--formats Q4_K,Q6_K] [--ms 1,8]
        [--copies 8] [--repeats 5] [--threads N]

y (M, N) = x (M, K) @ W^T for three weight shapes N x K. One pass is --copies
products of one shape, each with its own random weights (so they are read
from memory, as a model's layers are), as one jitted function: the kernels as
XLA FFI custom calls (cake.kernels.cpu.matmul), the anchor as `jnp.dot(x, w)`
on float32 weights stored K x N, as the JAX backend stores them (`x @ w.T` on
N x K was up to 8x slower at M = 1 in XLA 0.10). Systems and M are timed in interleaved rounds; a figure is the
best of --repeats. Printed per shape and system: microseconds per product at
each M, GB/s of weight bytes at M = 1, and the M=8 / M=1 time ratio.

K must be a multiple of 256 for the K-quants: 1536 x 768 stands in for
SmolLM2's 1536 x 576 (a Q4_K_M file stores those K = 576 matrices in other
formats).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

FORMATS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
ANCHOR = "XLA f32"
# (N, K) of W
SHAPES = [(576, 1536), (1536, 768), (1536, 4096)]


def random_weights(fmt: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """W in `fmt`: random bytes below 0x3c, so every float16 field is finite (the
    kernels' speed does not depend on the values); float32 W^T (K, N) for the anchor."""
    from cake.kernels.cpu import weight_spec

    if fmt == ANCHOR:
        return rng.standard_normal((k, n), dtype=np.float32)
    shape, dtype = weight_spec(fmt, n, k)
    return rng.integers(0, 0x3C, shape, dtype=np.uint8)


def pass_fn(fmt: str, k: int):
    """jit(x, ws) -> the products x @ W^T for every W in ws."""
    import jax
    import jax.numpy as jnp

    from cake.kernels import cpu

    def one(x, w):
        return jnp.dot(x, w) if fmt == ANCHOR else cpu.matmul(x, w, fmt, k)

    return jax.jit(lambda x, ws: [one(x, w) for w in ws])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--ms", default="1,8")
    ap.add_argument("--copies", type=int, default=8, help="products per pass")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--threads", type=int, default=0, help="CAKE_NUM_THREADS (default: all)"
    )
    args = ap.parse_args()
    if args.threads:
        os.environ["CAKE_NUM_THREADS"] = str(args.threads)

    import jax

    from cake.kernels import cpu

    if not cpu.available():
        raise SystemExit("the CPU kernels are not available here")
    formats = [f for f in args.formats.split(",") if f]
    missing = [f for f in formats if f not in cpu.FORMATS]
    if missing:
        raise SystemExit(f"not compiled into the CPU kernels: {', '.join(missing)}")
    ms = [int(m) for m in args.ms.split(",")]
    systems = [ANCHOR, *formats]
    rng = np.random.default_rng(0)
    threads = cpu._load().raw.cake_num_threads()
    print(
        f"y = x @ W^T, {args.copies} products per pass, {threads} kernel threads, "
        f"best of {args.repeats}; jax {jax.__version__}"
    )
    head = f"{'N x K':11} {'format':8} {'MB/W':>6} "
    head += " ".join(f"{'M=' + str(m) + ' us':>9}" for m in ms)
    print(head + f" {'GB/s M=1':>9} {'M8/M1':>6}")
    for n, k in SHAPES:
        ws = {
            s: [
                jax.device_put(random_weights(s, n, k, rng)) for _ in range(args.copies)
            ]
            for s in systems
        }
        fns = {s: pass_fn(s, k) for s in systems}
        xs = {
            m: jax.device_put(rng.standard_normal((m, k), dtype=np.float32)) for m in ms
        }

        def run(s: str, m: int, ws=ws, fns=fns, xs=xs) -> float:
            t = time.perf_counter()
            jax.block_until_ready(fns[s](xs[m], ws[s]))
            return (time.perf_counter() - t) / args.copies

        for s in systems:  # compile and warm up
            for m in ms:
                run(s, m)
        best = {(s, m): float("inf") for s in systems for m in ms}
        for r in range(args.repeats):
            order = systems[r % len(systems) :] + systems[: r % len(systems)]
            for m in ms:
                for s in order:
                    best[s, m] = min(best[s, m], run(s, m))
        for s in systems:
            nbytes = ws[s][0].nbytes
            row = f"{f'{n} x {k}':11} {s:8} {nbytes / 1e6:6.2f} "
            row += " ".join(f"{best[s, m] * 1e6:9.1f}" for m in ms)
            gbps = nbytes / best[s, 1] / 1e9 if 1 in ms else float("nan")
            ratio = best[s, 8] / best[s, 1] if 1 in ms and 8 in ms else float("nan")
            print(row + f" {gbps:9.1f} {ratio:6.2f}")


if __name__ == "__main__":
    main()
