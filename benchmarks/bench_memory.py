"""Resident memory a worker adds for its layers, against those layers' bytes in the file.

Each checkpoint is measured in a fresh process per backend: RSS after the
backend is imported and has run one jitted op (the baseline); after the stage
holding every transformer layer (no embedding, no head: a worker's share) has
loaded ("at load"); and after it has run a prefill and a decode step ("after 2
steps": every weight page it reads is resident, and the steps are compiled).
The KV cache the JAX stage allocates (zeroed at load, so resident) is
subtracted: its arrays' bytes, in the cache's own dtype. Until 2026-12-06 the
subtraction took the layer count from a variable the prefill loop reused
(its last chunk's width), 4-8x the cache, so the JAX ratios of earlier runs
read 0.2-0.45 low.
The anchor is the layers' tensor bytes in the file, summed from the reader.
A NumPy stage reads its memory-mapped weights only when it computes, so its
figure at load is small. Each step a JAX stage compiles adds what XLA keeps
of it (HLO, buffer assignment, thunks) and JAX's handles to it: 5.5-7 MB for
all 30 SmolLM2 layers with a custom call per product, 2.6 MB with one per
layer, less again since the kernels hold the layers' weights and a step takes
none as parameters (2026-12-03), so the figure after 2 steps holds two of
those besides the layers. CAKE_CPU_LAYER_HELD=0 passes the weights as
parameters again, to measure the difference.

    .venv/bin/python benchmarks/bench_memory.py FILE.gguf [FILE ...] [--backends jax,numpy]
    .venv/bin/python benchmarks/bench_memory.py --synthetic-1b DIR   # writes a 1B-shaped Q4_0 GGUF
    ... --compile-cache empty   # each process with an empty JAX compile cache

Target (issue 12): added RSS <= 1.15x the layers' file bytes.
Each figure: the median of --repeats processes (RSS moves by 2-3 MB between
them), its range in brackets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAX_CONTEXT, MAX_SEQUENCES = 256, 1
PREFILL = 240  # tokens of the longer prompt whose peak RSS is reported


def rss_bytes(field: str = "VmRSS") -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Start VmHWM over from the RSS now (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(path: str, backend: str) -> dict:
    """Runs in the child process: load a worker's share, report bytes."""
    import numpy as np

    from cake.backends.base import Step
    from cake.pipeline import load_local_stage
    from cake.shard import Shard
    from cake.weights.checkpoint import open_checkpoint
    from cake.weights.names import layer_tensor_names

    if backend == "jax":
        import jax.numpy as jnp

        jnp.ones(4).sum().block_until_ready()
    config, tensors = open_checkpoint(path)
    n = config.num_hidden_layers
    names = [t for i in range(n) for t in layer_tensor_names(config, i)]
    file_bytes = sum(tensors.nbytes(t) for t in names)
    formats = sorted({tensors.format(t) for t in names})
    base = rss_bytes()
    shard = Shard(0, n, n, embed=False, head=False)
    stage = load_local_stage(
        config,
        shard,
        tensors,
        backend,
        "float32",
        max_context=MAX_CONTEXT,
        max_sequences=MAX_SEQUENCES,
    )
    loaded = rss_bytes()
    x = np.zeros((1, 8, config.hidden_size), np.float32)
    stage.forward(x, Step((0,), (0,), (8,)))
    stage.forward(x[:, :1], Step((0,), (8,), (1,)))
    after = rss_bytes()
    # the peak of a longer prompt, fed in the stage's own chunks: a step that
    # widens matrices (past the kernels' rows) shows its scratch here
    reset_peak()
    chunk, pos = getattr(stage, "prefill_chunk", PREFILL), 0
    stage.release([0])
    while pos < PREFILL:
        width = min(chunk, PREFILL - pos)
        stage.forward(
            np.zeros((1, width, config.hidden_size), np.float32),
            Step((0,), (pos,), (width,)),
        )
        pos += width
    peak = rss_bytes("VmHWM")
    kv = 0
    if backend == "jax":  # allocated (zeroed: resident) at load, in its own dtype
        import jax

        kv = sum(int(a.nbytes) for a in jax.tree_util.tree_leaves(stage._cache))
    added = after - base - kv
    at_load = loaded - base - kv
    return {
        "file": Path(path).name,
        "backend": backend,
        "formats": formats,
        "layers": n,
        "layer_file_bytes": file_bytes,
        "stage_weight_bytes": getattr(stage, "weight_bytes", None),
        "kv_bytes": kv,
        "rss_added_bytes": added,
        "rss_added_at_load_bytes": at_load,
        "ratio": added / file_bytes,
        "ratio_at_load": at_load / file_bytes,
        "prefill_peak_added_bytes": peak - base - kv,
        "prefill_peak_ratio": (peak - base - kv) / file_bytes,
    }


def write_synthetic_1b(folder: Path) -> Path:
    """A Llama-3.2-1B-shaped GGUF (16 layers, hidden 2048, ffn 8192, 32/8 heads),
    matrices Q4_0 quantized by gguf-py from random normals, one tensor at a time."""
    import gguf
    import numpy as np
    from gguf.quants import quantize

    path = folder / "synthetic-1b.Q4_0.gguf"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    d, f, h, kv, hd, vocab, layers = 2048, 8192, 32, 8, 64, 32768, 16
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(layers)
    w.add_context_length(4096)
    w.add_embedding_length(d)
    w.add_feed_forward_length(f)
    w.add_head_count(h)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    rng = np.random.default_rng(0)

    def q4(shape):
        a = (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float32)
        return quantize(a, gguf.GGMLQuantizationType.Q4_0)

    q4_0 = gguf.GGMLQuantizationType.Q4_0
    w.add_tensor("token_embd.weight", q4((vocab, d)), raw_dtype=q4_0)
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(d, np.float32))
        for name, shape in [
            ("attn_q", (h * hd, d)),
            ("attn_k", (kv * hd, d)),
            ("attn_v", (kv * hd, d)),
            ("attn_output", (d, h * hd)),
            ("ffn_gate", (f, d)),
            ("ffn_up", (f, d)),
            ("ffn_down", (d, f)),
        ]:
            w.add_tensor(p + name + ".weight", q4(shape), raw_dtype=q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _child(path: str, backend: str, compile_cache: str) -> dict | None:
    """One measurement in a fresh process (None, with a line, if it failed)."""
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as empty:
        if compile_cache == "empty":
            env["JAX_COMPILATION_CACHE_DIR"] = empty
        out = subprocess.run(
            [sys.executable, __file__, "--child", path, backend],
            capture_output=True,
            text=True,
            env=env,
        )
    if out.returncode:
        print(f"{path} {backend}: failed: {out.stderr.strip().splitlines()[-1:]}")
        return None
    return {
        **json.loads(out.stdout.strip().splitlines()[-1]),
        "compile_cache": compile_cache,
    }


def _median(runs: list[dict]) -> dict:
    """The run whose ratio after 2 steps is the median (the lower one of two)."""
    return sorted(runs, key=lambda r: r["ratio"])[(len(runs) - 1) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*")
    ap.add_argument("--backends", default="jax,numpy")
    ap.add_argument("--synthetic-1b", type=Path, help="folder for the 1B Q4_0 GGUF")
    ap.add_argument(
        "--compile-cache",
        choices=("as-is", "empty"),
        default="as-is",
        help="as-is: JAX's persistent cache as it is (a worker's every start "
        "after its first); empty: a new empty one per process (a first start: "
        "every step compiled, which leaves more of XLA's heap behind)",
    )
    ap.add_argument(
        "--repeats", type=int, default=3, help="processes per file; the median"
    )
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(*a.child)))
        return
    files = list(a.files)
    if a.synthetic_1b:
        files.append(str(write_synthetic_1b(a.synthetic_1b)))
    rows = []
    for f in files:
        for be in a.backends.split(","):
            runs = [_child(f, be, a.compile_cache) for _ in range(a.repeats)]
            runs = [r for r in runs if r is not None]
            if runs:
                rows.append({**_median(runs), "runs": runs})
    print(
        "| file | backend | formats | layers' bytes in file (MB) | stage holds (MB) "
        "| RSS added at load (MB) | ratio | after 2 steps (MB) | ratio [min-max] "
        f"| peak in a {PREFILL}-token prefill (MB) | ratio |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        held = r["stage_weight_bytes"]
        lo, hi = min(x["ratio"] for x in r["runs"]), max(x["ratio"] for x in r["runs"])
        print(
            f"| {r['file']} | {r['backend']} | {' '.join(r['formats'])} "
            f"| {r['layer_file_bytes'] / 1e6:.1f} "
            f"| {'' if held is None else f'{held / 1e6:.1f}'} "
            f"| {r['rss_added_at_load_bytes'] / 1e6:.1f} | {r['ratio_at_load']:.2f}x "
            f"| {r['rss_added_bytes'] / 1e6:.1f} | {r['ratio']:.2f}x [{lo:.2f}-{hi:.2f}] "
            f"| {r['prefill_peak_added_bytes'] / 1e6:.1f} | {r['prefill_peak_ratio']:.2f}x |"
        )
    if a.json_out:
        a.json_out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
