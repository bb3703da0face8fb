"""The CPU kernels (cake.kernels.cpu) on SmolLM2-135M shapes next to XLA's float32 dot.

    .venv/bin/python benchmarks/bench_kernels.py [--formats Q4_0,Q8_0] [--ms 1,8,64,512]
        [--repeats 5] [--threads N]

One pass is the weight products of all 30 layers (q/k/v fused 576->960, o
576->576, gate/up fused 576->3072, down 1536->576: 106 M weights), each layer
with its own random weights, as one jitted function of 120 products: the
kernels as XLA FFI custom calls, the anchor as `jnp.dot` on float32 weights.
The repacked formats (Q8_0R8 ...) follow the format they are repacked from;
the float ones (BF16, F16, F32) are also timed through their dot kernels alone
("BF16 dot": the panel GEMM of gemm16.cc turned off) and through the panel GEMM
alone ("BF16 panel", at any M), the 16-bit ones widened to float32 for XLA's
dot as backends/jax/linear.py did for long prefills ("BF16 wide"). The anchor
multiplies (N, K) float32 weights as stored (F32's layout); "XLA f32 KN" the
(K, N) copy that the stage makes for XLA where the kernels are not built.
Every system and M is timed in interleaved rounds (order rotated each round);
a figure is the best of --repeats. Printed: ms per pass, weight GB/s read at
M = 1, the M=8 / M=1 ratio, M=512 against the anchor, and the machine's read
bandwidth (NumPy float32 sum over 1 GiB, best of 5, 1 thread and --threads
Python threads) in the same run.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

LAYERS = 30
# (name, N, K) of one layer's products
SHAPES = [
    ("qkv", 960, 576),
    ("o", 576, 576),
    ("gate_up", 3072, 576),
    ("down", 576, 1536),
]
ANCHOR = "XLA f32"
ANCHOR_KN = "XLA f32 KN"
# the 16-bit formats' other paths, as suffixes of their names (see the docstring)
DOT, PANEL, WIDE = " dot", " panel", " wide"


def base_format(system: str) -> str:
    return system.removesuffix(DOT).removesuffix(PANEL).removesuffix(WIDE)


def read_bandwidth(threads: int) -> tuple[float, float]:
    """GB/s of a NumPy float32 sum over 1 GiB, best of 5: 1 thread, `threads` threads."""
    arr = np.ones((1 << 30) // 4, dtype=np.float32)
    parts = np.array_split(arr, threads)
    pool = ThreadPoolExecutor(threads)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return arr.nbytes / min(times) / 1e9

    return best(arr.sum), best(lambda: list(pool.map(np.sum, parts)))


def random_weights(fmt: str, rng: np.random.Generator) -> list[np.ndarray]:
    """30 layers x 4 matrices in `fmt`; for block formats random bytes below 0x3c,
    so every float16 scale is finite (speed does not depend on the values)."""
    from cake.kernels.cpu import REPACKED, weight_spec

    plain = {r: f for f, r in REPACKED.items()}.get(fmt, fmt)
    out = []
    for _ in range(LAYERS):
        for _, n, k in SHAPES:
            if fmt == ANCHOR:
                out.append(rng.standard_normal((n, k), dtype=np.float32))
                continue
            if fmt == ANCHOR_KN:
                out.append(rng.standard_normal((k, n), dtype=np.float32))
                continue
            shape, dtype = weight_spec(fmt, n, k)
            if plain in ("F16", "BF16", "F32"):
                out.append(rng.standard_normal(shape, dtype=np.float32).astype(dtype))
            else:
                out.append(rng.integers(0, 0x3C, shape, dtype=np.uint8))
    return out


def pass_fn(fmt: str):
    """jit(xs, ws) -> the 120 products of one pass; xs = {K: x (M, K)}."""
    import jax
    import jax.numpy as jnp

    from cake.kernels import cpu

    def one(x, w, k):
        if fmt == ANCHOR:
            return jnp.dot(x, w.T)
        if fmt == ANCHOR_KN:
            return jnp.dot(x, w)
        if fmt.endswith(WIDE):
            full = cpu.dequantize(w, base_format(fmt), k)
            return jnp.dot(x, full.T, precision=jax.lax.Precision.HIGHEST)
        return cpu.matmul(x, w, base_format(fmt), k)

    def f(xs, ws):
        return [
            one(xs[k], w, k) for w, (_, _, k) in zip(ws, SHAPES * LAYERS, strict=True)
        ]

    return jax.jit(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--formats", default="", help="comma-separated; default: all compiled in"
    )
    ap.add_argument("--ms", default="1,8,64,512")
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
    formats = [f for f in args.formats.split(",") if f] or [
        f for f in cpu.FORMATS if f not in cpu.REPACKED.values()
    ]
    # each format's repacked form next to it, unless --formats names formats
    if not args.formats:
        formats = [
            g
            for f in formats
            for g in (f, cpu.REPACKED.get(f))
            if g is not None and g in cpu.FORMATS
        ]
    plain = {r: f for f, r in cpu.REPACKED.items()}
    # K = 576 is no multiple of 256: llama.cpp stores such tensors in a
    # 32-element format, and so do SmolLM2's K-quant GGUFs.
    misfits = [
        f
        for f in formats
        if 576 % GGML_QUANT_SIZES[GGMLQuantizationType[plain.get(f, f)]][0]
    ]
    if misfits:
        print(
            f"skipped (K = 576 is not a multiple of their block): {', '.join(misfits)}"
        )
    formats = [f for f in formats if f not in misfits]
    ms = [int(m) for m in args.ms.split(",")]
    threads = cpu.num_threads()
    rng = np.random.default_rng(0)
    systems = [ANCHOR, ANCHOR_KN, *formats]
    systems += [
        f + v
        for f in formats
        if f in ("BF16", "F16", "F32")
        for v in ((DOT, PANEL) if f == "F32" else (DOT, PANEL, WIDE))
    ]
    weights = {
        s: [jax.device_put(w) for w in random_weights(s, rng)]
        for s in systems
        if s == base_format(s)
    }
    weights |= {s: weights[base_format(s)] for s in systems}
    nbytes = {s: sum(w.nbytes for w in ws) for s, ws in weights.items()}
    fns = {s: pass_fn(s) for s in systems}
    xs = {
        m: {
            k: jax.device_put(rng.standard_normal((m, k), dtype=np.float32))
            for k in (576, 1536)
        }
        for m in ms
    }

    def run(s: str, m: int) -> float:
        # from how many rows the 16-bit formats take the panel GEMM (0: default)
        rows = {DOT: 1 << 40, PANEL: 1}.get(s[len(base_format(s)) :], 0)
        cpu._require().raw.cake_set_panel_rows(rows)
        t = time.perf_counter()
        jax.block_until_ready(fns[s](xs[m], weights[s]))
        return time.perf_counter() - t

    for s in systems:  # compile and warm up
        for m in ms:
            run(s, m)
    best = {(s, m): float("inf") for s in systems for m in ms}
    for r in range(args.repeats):
        order = systems[r % len(systems) :] + systems[: r % len(systems)]
        for m in ms:
            for s in order:
                best[s, m] = min(best[s, m], run(s, m))
    bw1, bwn = read_bandwidth(threads)

    print(
        f"SmolLM2-135M weight products, {LAYERS} layers per pass, {threads} kernel "
        f"threads, best of {args.repeats}; jax {jax.__version__}"
    )
    head = f"{'format':11} {'MB':>6} " + " ".join(
        f"{'M=' + str(m) + ' ms':>10}" for m in ms
    )
    head += f" {'GB/s M=1':>9} {'M8/M1':>6} {'vs f32 M=' + str(ms[-1]):>12}"
    print(head)
    for s in systems:
        row = f"{s:11} {nbytes[s] / 1e6:6.1f} "
        row += " ".join(f"{best[s, m] * 1e3:10.2f}" for m in ms)
        gbps = nbytes[s] / best[s, ms[0]] / 1e9 if ms[0] == 1 else float("nan")
        ratio = best[s, 8] / best[s, 1] if 1 in ms and 8 in ms else float("nan")
        row += (
            f" {gbps:9.1f} {ratio:6.2f} {best[s, ms[-1]] / best[ANCHOR, ms[-1]]:12.2f}"
        )
        print(row)
    print(
        f"read bandwidth (NumPy sum over 1 GiB): {bw1:.1f} GB/s 1 thread, {bwn:.1f} GB/s {threads} threads"
    )


if __name__ == "__main__":
    main()
