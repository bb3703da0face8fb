"""The JAX backend on a GPU: correctness against the NumPy backend, decode speed.

    python3 benchmarks/gpu_check.py check             # JAX (default device) vs NumPy
    python3 benchmarks/gpu_check.py check-packed      # the same, GGUF-quantized models
    python3 benchmarks/gpu_check.py speed --model llama-8b --weights Q8_0,Q4_0 [--json F]
    python3 benchmarks/gpu_check.py hf --model llama-1b [--json FILE]
    python3 benchmarks/gpu_check.py draw [--json FILE]  # the in-step draw: gpu_draw.py

`benchmarks/gpu_check.sh` runs them all on a CUDA machine in one go. `--smoke`
runs any of them with tiny shapes and few steps on whatever JAX device is
there (on the CPU with CAKE_CPU_KERNELS=0, so that packed weights take the
jnp decode path that GPUs take): a check of this script, not a measurement.

check: tiny random checkpoints of every architecture (tests/models.py, float32
and bfloat16; the MoE families' experts through backends/jax/moe.py's tiled
scan, the path GPUs take) and random SmolLM2-135M shapes in float32; the JAX stage on its
default device against the NumPy stage on the CPU: prefill logits and greedy
decode steps, largest difference, tokens equal.

check-packed: tiny llama GGUFs of random valid blocks (Q8_0 with tied
embeddings, Q4_0, Q4_K, Q6_K, a Q4_K_M-like mix), the same comparison: both
stages decode the same blocks exactly and multiply in float32 (HIGHEST on the
GPU), so the float32 limit holds.

speed: random weights of the named shapes, made on the host tensor by tensor
(no download), for each of --weights; decode tok/s after a 1-token prompt (so
one compiled step: positions stay in the first cache bucket), the same steps
dispatched as the engine's overlap queues them (step n+1 before step n's
token is read) and the jitted step alone. bfloat16: 128 greedy steps, best of 3, and 512-token prefill tok/s.
A GGUF type (every matrix in it, random valid blocks): 64 steps, best of 2, no
prefill, and whether XLA fused the decode of one matrix (the fused gate|up)
into its product, from the optimized HLO. Each row has the bound: bytes of
weights read per token as stored / the device's read bandwidth (a jitted sum
over 4 GiB, best of 10, once per process).

hf: the anchor: HF transformers (PyTorch) on the same shapes, bfloat16, on CUDA,
random init, eager `generate` with its default KV cache; decode tok/s is
(time for 129 new tokens - time for 1) / 128.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.append(str(Path(__file__).resolve().parent.parent))  # tests.models

from gpu_draw import draw_check  # noqa: E402
from gpu_models import MODELS, TINY, model_dict  # noqa: E402
from jax_decode_profile import (  # noqa: E402
    decode_run,
    dispatch_run,
    prefill_run,
)
from random_weights import RandomSource, write_random_gguf  # noqa: E402

from cake.weights.packed import gguf_block  # noqa: E402

_T0 = time.perf_counter()


def log(msg: str) -> None:
    """A progress line: wall clock and seconds since this process started."""
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - _T0:.0f}s] {msg}")


@dataclass(frozen=True)
class Sizes:
    """How much each part measures: the full run, or --smoke's quick pass."""

    steps: int = 128  # bfloat16 decode steps per run
    repeats: int = 3  # bfloat16 decode runs and prefill runs (best of)
    prefill: int = 512
    packed_steps: int = 64
    packed_repeats: int = 2
    device_calls: int = 50  # device_step_ms
    read_mib: int = 4096  # device_read_bandwidth
    pool_mib: int = 128  # random weights are cut from a pool of this size
    smollm2: bool = True  # check: the SmolLM2-135M-shape row


FULL = Sizes()
SMOKE = Sizes(8, 1, 32, 8, 1, 5, 64, 4, False)


def device_read_bandwidth(mib: int = 4096) -> float:
    """Bytes/s of a jitted sum over `mib` MiB of bfloat16 on JAX's default device."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mib * 2**20 // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    del x
    return mib * 2**20 / best


def device_step_ms(stage, pos: int, n: int = 50) -> float:
    """Milliseconds per decode step of the jitted stage alone: inputs already on
    the device, `n` calls queued back to back, one wait at the end. The gap to a
    whole step is host work (padding, copies in and out, dispatch)."""
    import jax

    from cake.backends.jax import cache as kv
    from cake.backends.jax import draw

    args = jax.device_put(
        [
            np.zeros((1, 1), np.int32),
            np.zeros(1, np.int32),  # slot 0: decode_run's sequence holds it
            np.array([pos], np.int32),
            np.ones(1, np.int32),
            # a greedy draw in the step, as decode_run's (and the engine's)
            draw.host_inputs(draw.Draw((0.0,), (0.0,), (0.0,)), 1),
        ],
        stage._jax_device,
    )
    from cake.backends.jax.programs import Shape

    t_len = kv.bucket(pos + 1, cap=stage.max_context, floor=kv.MIN_CACHE_BUCKET)
    # the program the stage's own decode steps run (compiled by decode_run)
    program = stage.programs.get(Shape(1, 1, t_len, False, None, False))

    def one():
        (_, ids), stage._cache = program(stage._params, stage._cache, *args)
        return ids

    one().block_until_ready()
    t = time.perf_counter()
    for _ in range(n):
        out = one()
    out.block_until_ready()
    return 1e3 * (time.perf_counter() - t) / n


_FLOAT_SHAPE = re.compile(r"\b(?:f32|bf16|f16)\[([\d,]+)\]")
_PLUMBING = {"parameter", "bitcast", "get-tuple-element", "tuple", "constant"}


def decode_fusion(fmt: str, n: int, k: int, hlo_out: str | None = None) -> str:
    """One line: does the optimized HLO of a jitted `cake.kernels.jax.matmul`
    of x f32 (1, K) by a packed (N, K) matrix hold the decoded matrix as a
    buffer of its own (a fusion writing f32/bf16 [N, K] for a separate dot)?

    Only the entry computation's instructions are buffers: shapes inside a
    fused computation live in registers.
    """
    import jax
    import jax.numpy as jnp

    from cake.kernels import jax as jk

    elems, nbytes = gguf_block(fmt)
    x = jax.ShapeDtypeStruct((1, k), jnp.float32)
    data = jax.ShapeDtypeStruct((n, k // elems * nbytes), jnp.uint8)
    f = jax.jit(lambda x, d: jk.matmul(x, d, fmt, k))
    text = f.lower(x, data).compile().as_text()
    if hlo_out:
        with open(hlo_out, "a") as fh:
            fh.write(f"# {fmt} x f32[1,{k}] @ W({n},{k}).T\n{text}\n")
    lines = iter(text.splitlines())
    any(s.startswith("ENTRY") for s in lines)  # skip to the entry computation
    big, ops = [], []
    for s in itertools.takewhile(lambda s: not s.startswith("}"), lines):
        if " = " not in s:
            continue
        name, rhs = s.strip().removeprefix("ROOT ").split(" = ", 1)
        m = re.search(r"(?:^|\s)([a-z][\w-]*)\(", rhs)  # the opcode ends the type
        op, result = (m[1], rhs[: m.start()]) if m else ("?", rhs)
        if op in _PLUMBING:
            continue
        dims = [[int(d) for d in t.split(",")] for t in _FLOAT_SHAPE.findall(result)]
        if any(int(np.prod(d)) == n * k for d in dims):
            big.append(f"{name} {op}")
        extra = re.search(r'kind=(\w+)|custom_call_target="([^"]+)"', rhs)
        ops.append(op + (f"[{extra[1] or extra[2]}]" if extra else ""))
    verdict = (
        f"NOT fused: a float [{n},{k}] temporary ({', '.join(big)}) feeds the product"
        if big
        else "fused: no float [N,K] temporary"
    )
    return f"decode fusion {fmt} W({n},{k}): {verdict}; entry ops: {' '.join(ops)}"


# --- check ---------------------------------------------------------------------


def compare(jax_stage, np_stage, prompt: list[int], steps: int) -> tuple[float, bool]:
    """Largest |JAX - NumPy| logit (relative to NumPy's largest) and tokens equal
    (each decode step's also drawn greedily in the JAX step first, as the
    engine has it: then the step again, rewinding its cache, for its logits)."""
    from cake.backends import Step
    from cake.backends.base import Draw

    n = len(prompt)
    x = np.array([prompt], np.int32)
    step = Step((0,), (0,), (n,), all_logits=True)
    a, b = jax_stage.forward(x, step), np_stage.forward(x, step)
    worst = float(np.abs(a - b).max() / np.abs(b).max())
    same = True
    tok_a, tok_b = int(a[0, -1].argmax()), int(b[0, -1].argmax())
    for pos in range(n, n + steps):
        same &= tok_a == tok_b
        step = Step((0,), (pos,), (1,))
        drawn = jax_stage.forward(
            np.array([[tok_b]], np.int32),
            Step((0,), (pos,), (1,), draw=Draw((0.0,), (0.0,), (0.0,))),
        )
        a = jax_stage.forward(np.array([[tok_b]], np.int32), step)
        same &= drawn.tolist() == [int(a[0].argmax())]
        b = np_stage.forward(np.array([[tok_b]], np.int32), step)
        worst = max(worst, float(np.abs(a - b).max() / np.abs(b).max()))
        tok_a, tok_b = int(a[0].argmax()), int(b[0].argmax())
    return worst, bool(same and tok_a == tok_b)


def load(backend: str, config, tensors, dtype: str):
    from cake.pipeline import load_local_stage
    from cake.shard import Shard

    whole = Shard.whole(config.num_hidden_layers)
    return load_local_stage(
        config, whole, tensors, backend, dtype, max_context=256, max_sequences=1
    )


PROMPT = [1, 5, 17, 99, 3, 42, 7, 64, 12, 33, 8]
# float32 must agree to rounding; bfloat16 differs by where each side rounds
LIMITS = {"float32": 1e-4, "bfloat16": 5e-2}


def check(sizes: Sizes) -> bool:
    import jax
    from jax_decode_profile import random_model

    from cake.config import ModelConfig
    from cake.weights.checkpoint import open_checkpoint
    from tests.models import ARCHS, make_checkpoint

    log(f"jax {jax.__version__}, default device {jax.devices()[0]}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for arch in sorted(ARCHS):
            for dtype, limit in LIMITS.items():
                folder = make_checkpoint(
                    arch, Path(tmp) / f"{arch}-{dtype}", dtype=dtype
                )
                config, tensors = open_checkpoint(folder)
                worst, same = compare(
                    load("jax", config, tensors, dtype),
                    load("numpy", config, tensors, dtype),
                    PROMPT,
                    8,
                )
                good = worst <= limit and (same or dtype != "float32")
                ok &= good
                log(
                    f"{'ok  ' if good else 'FAIL'} {arch:8} {dtype:9} max rel diff "
                    f"{worst:.2e} (limit {limit:.0e}), greedy tokens "
                    f"{'equal' if same else 'differ'}"
                )
    if not sizes.smollm2:
        return ok
    config, tensors = random_model()
    assert isinstance(config, ModelConfig)
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, 49152, 24)]
    worst, same = compare(
        load("jax", config, tensors, "float32"),
        load("numpy", config, tensors, "float32"),
        prompt,
        32,
    )
    good = worst <= LIMITS["float32"] and same
    ok &= good
    log(
        f"{'ok  ' if good else 'FAIL'} SmolLM2-135M shapes float32, 24-token prompt + "
        f"32 steps: max rel diff {worst:.2e}, greedy tokens {'equal' if same else 'differ'}"
    )
    return ok


def q4_k_m(name: str) -> str:
    """A Q4_K_M-like mix: v and down projections and the head Q6_K, rest Q4_K."""
    return (
        "Q6_K" if any(p in name for p in ("v_proj", "down_proj", "lm_head")) else "Q4_K"
    )


# name: (format of each matrix by its HF name, tied embeddings)
PACKED_MODELS: dict[str, tuple[Callable[[str], str], bool]] = {
    "Q8_0 (tied)": (lambda _: "Q8_0", True),
    "Q4_0": (lambda _: "Q4_0", False),
    "Q4_K": (lambda _: "Q4_K", False),
    "Q6_K": (lambda _: "Q6_K", False),
    "Q4_K_M-like": (q4_k_m, False),
}


def check_packed() -> bool:
    """Tiny GGUFs of random blocks: the JAX stage (blocks decoded in the jitted
    step) against the NumPy one (the same blocks, gguf-py's decode), float32."""
    import jax

    from cake.weights.checkpoint import open_checkpoint

    log(f"jax {jax.__version__}, default device {jax.devices()[0]}")
    base = MODELS["llama-8b"] | TINY | dict(vocab_size=512)
    ok, limit = True, LIMITS["float32"]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (fmt, tied)) in enumerate(PACKED_MODELS.items()):
            model = base | dict(tie_word_embeddings=tied)
            path = write_random_gguf(Path(tmp) / f"m{i}.gguf", model, fmt, seed=i)
            config, tensors = open_checkpoint(path)
            worst, same = compare(
                load("jax", config, tensors, "float32"),
                load("numpy", config, tensors, "float32"),
                PROMPT,
                8,
            )
            good = worst <= limit and same
            ok &= good
            log(
                f"{'ok  ' if good else 'FAIL'} llama GGUF {name:12} float32 max rel "
                f"diff {worst:.2e} (limit {limit:.0e}), greedy tokens "
                f"{'equal' if same else 'differ'}"
            )
    return ok


# --- speed ---------------------------------------------------------------------


def speed(
    model: str,
    weights: list[str],
    sizes: Sizes,
    smoke: bool,
    json_out: str | None,
    hlo_out: str | None,
) -> list[dict]:
    """One row per entry of `weights`, against one bandwidth measurement."""
    import jax

    from cake.config import ModelConfig

    cfg = ModelConfig.from_dict(model_dict(model, smoke))
    shapes = " (smoke shapes)" if smoke else ""
    log(f"{model}{shapes} on {jax.devices()[0]}: read bandwidth")
    bw = device_read_bandwidth(sizes.read_mib)
    log(f"read bandwidth {bw / 1e9:.0f} GB/s")
    rows = []
    for w in weights:
        rows.append(speed_row(model, cfg, w, bw, sizes, hlo_out))
        emit(rows[-1], json_out)  # at once: a later row may run out of time
    return rows


def speed_row(
    model: str, cfg, weights: str, bw: float, sizes: Sizes, hlo_out: str | None
) -> dict:
    import jax

    from cake.backends.jax import JaxBackend
    from cake.shard import Shard

    log(f"{model} {weights}: making and loading random weights")
    src = RandomSource(cfg, weights, sizes.pool_mib)
    wbytes = src.weight_bytes_per_token()
    t = time.perf_counter()
    stage = JaxBackend().load(
        cfg,
        Shard.whole(cfg.num_hidden_layers),
        src,
        # packed: the dtype "auto" gives a quantized GGUF (only the KV cache's)
        "bfloat16" if weights == "bfloat16" else "float32",
        max_context=1024,
        max_sequences=1,
    )
    load_s = time.perf_counter() - t
    del src
    bound = bw / wbytes
    rng = np.random.default_rng(0)
    packed = weights != "bfloat16"
    # a 1-token prompt: prefill and decode are one compiled step (positions
    # stay in the first cache bucket, 256)
    prompt = rng.integers(0, cfg.vocab_size, (1, 1)).astype(np.int32)
    steps = sizes.packed_steps if packed else sizes.steps
    log(f"{model} {weights}: loaded in {load_s:.1f} s; compiling and warming up")
    t = time.perf_counter()
    decode_run(stage, prompt, 4)
    warm_s = time.perf_counter() - t
    log(f"{model} {weights}: warm-up {warm_s:.1f} s; decoding {steps} steps")
    repeats = sizes.packed_repeats if packed else sizes.repeats
    runs = [decode_run(stage, prompt, steps) for _ in range(repeats)]
    decode = max(steps / r.sum() for r in runs)
    # the engine's overlap (on by default on a GPU): step n+1 queued before
    # step n's token is read, so the host's work per step hides behind it
    overlap = max(steps / dispatch_run(stage, prompt, steps) for _ in range(repeats))
    dev_ms = device_step_ms(stage, 1 + steps // 2, sizes.device_calls)
    out = dict(
        system="cake jax",
        model=model,
        weights=weights,
        device=str(jax.devices()[0]),
        load_s=round(load_s, 1),
        warmup_s=round(warm_s, 1),
        weight_gb=round(wbytes / 1e9, 2),
        read_gb_s=round(bw / 1e9, 0),
        bound_tok_s=round(bound, 1),
        decode_tok_s=round(decode, 1),
        decode_of_bound=round(decode / bound, 3),
        overlap_tok_s=round(overlap, 1),
        overlap_of_bound=round(overlap / bound, 3),
        step_ms_median=round(1e3 * float(np.median(np.concatenate(runs))), 3),
        device_step_ms=round(dev_ms, 3),
        device_of_bound=round(1e3 / dev_ms / bound, 3),
    )
    if packed:
        # one matrix: the fused gate|up projection, (2 * ffn, hidden)
        n, k = 2 * cfg.intermediate_size, cfg.hidden_size
        line = decode_fusion(weights, n, k, hlo_out)
        out["decode_fused"] = line.split(": ", 1)[1].startswith("fused")
        log(line)
    else:
        log(f"{model} {weights}: {sizes.prefill}-token prefill")
        long = rng.integers(0, cfg.vocab_size, (1, sizes.prefill)).astype(np.int32)
        prefill_run(stage, long)
        out["prefill_tok_s"] = round(
            max(prefill_run(stage, long) for _ in range(sizes.repeats)), 0
        )
    del stage  # frees the device memory for the next row
    # the target: an 8B model in int8 / int4 blocks at >= 70 % of the bound
    target = packed and model == "llama-8b"
    met = "met" if decode / bound >= 0.7 else "missed"
    log(
        f"{model} {weights}: {decode:.1f} tok/s decode, {wbytes / 1e9:.2f} GB/token, "
        f"{decode / bound:.1%} of the {bound:.0f} tok/s bound "
        f"(jitted step alone {1e3 / dev_ms / bound:.1%}; steps overlapped "
        f"{overlap:.1f} tok/s, {overlap / bound:.1%})"
        + (f"; target >= 70 %: {met}" if target else "")
    )
    return out


def hf(model: str, sizes: Sizes, smoke: bool) -> dict:
    import torch
    import transformers

    kw = model_dict(model, smoke)
    kw.pop("model_type")
    cfg = transformers.LlamaConfig(**kw)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    log(f"HF {model} on {dev}")
    with torch.device(dev):
        m = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    rng = np.random.default_rng(0)
    ids = torch.tensor(rng.integers(0, cfg.vocab_size, (1, 16)), device=dev)

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    def gen(n: int) -> float:
        sync()
        t = time.perf_counter()
        m.generate(
            ids,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        sync()
        return time.perf_counter() - t

    n = sizes.steps
    with torch.inference_mode():
        gen(8)
        decode = max(n / (gen(n + 1) - gen(1)) for _ in range(sizes.repeats))
        long = torch.tensor(
            rng.integers(0, cfg.vocab_size, (1, sizes.prefill)), device=dev
        )
        m(long, logits_to_keep=1)

        def pre() -> float:
            sync()
            t = time.perf_counter()
            m(long, logits_to_keep=1)
            sync()
            return sizes.prefill / (time.perf_counter() - t)

        prefill = max(pre() for _ in range(sizes.repeats))
    out = dict(
        system=f"HF transformers {transformers.__version__} (torch {torch.__version__})",
        model=model,
        device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        decode_tok_s=round(decode, 1),
        prefill_tok_s=round(prefill, 0),
    )
    return out


def emit(row: dict, json_out: str | None) -> None:
    """Print a result as one JSON line, and append it to `json_out`."""
    print(json.dumps(row), flush=True)
    if json_out:
        with open(json_out, "a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["check", "check-packed", "speed", "hf", "draw"])
    ap.add_argument("--model", default="llama-1b", choices=sorted(MODELS))
    ap.add_argument(
        "--weights",
        default="bfloat16",
        help="speed: comma-separated, bfloat16 and/or GGUF types (Q8_0,Q4_0,Q4_K...)",
    )
    ap.add_argument("--json", help="append each result as one JSON line to this file")
    ap.add_argument("--hlo", help="speed: append the optimized HLO of the decode here")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, few steps")
    args = ap.parse_args()
    sizes = SMOKE if args.smoke else FULL
    if args.smoke and args.what != "hf":
        import jax

        if jax.default_backend() == "cpu":
            # the jnp decode path of packed weights, which GPUs take
            os.environ["CAKE_CPU_KERNELS"] = "0"
            log("smoke on the CPU: CAKE_CPU_KERNELS=0")
    if args.what == "check":
        return 0 if check(sizes) else 1
    if args.what == "check-packed":
        return 0 if check_packed() else 1
    if args.what == "draw":
        emit(row := draw_check(args.smoke, log), args.json)
        return 0 if row["ok"] else 1
    if args.what == "speed":
        speed(
            args.model, args.weights.split(","), sizes, args.smoke, args.json, args.hlo
        )
    else:
        emit(hf(args.model, sizes, args.smoke), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
