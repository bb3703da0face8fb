"""The JAX backend on a GPU: correctness against the NumPy backend, decode speed.

    python3 benchmarks/gpu_check.py check             # JAX (default device) vs NumPy
    python3 benchmarks/gpu_check.py speed --model llama-1b [--json FILE]
    python3 benchmarks/gpu_check.py hf --model llama-1b [--json FILE]

`benchmarks/gpu_check.sh` runs all three on a CUDA machine in one go.

check: tiny random checkpoints of every architecture (tests/models.py, float32
and bfloat16) and random SmolLM2-135M shapes in float32; the JAX stage on its
default device against the NumPy stage on the CPU: prefill logits and greedy
decode steps, largest difference, tokens equal.

speed: random weights of the named shapes, generated on the host (no download),
bfloat16; decode tok/s (16-token prompt, 128 greedy steps, best of 3), 512-token
prefill tok/s, and the decode bound: bytes of weights read per token / the
device's read bandwidth (a jitted sum over 4 GiB, best of 10).

hf: the anchor: HF transformers (PyTorch) on the same shapes, bfloat16, on CUDA,
random init, eager `generate` with its default KV cache; decode tok/s is
(time for 129 new tokens - time for 1) / 128.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.append(str(Path(__file__).resolve().parent.parent))  # tests.models

from jax_decode_profile import SMOLLM2, decode_run, prefill_run  # noqa: E402

_LLAMA3 = dict(
    model_type="llama",
    vocab_size=128256,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=8192,
)
MODELS: dict[str, dict] = {
    "smollm2-135m": SMOLLM2,
    "llama-1b": _LLAMA3
    | dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    "llama-8b": _LLAMA3
    | dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        head_dim=128,
        tie_word_embeddings=False,
    ),
}


class RandomSource:
    """A TensorSource of random bfloat16 weights made on demand (no full copy held).

    Matrix entries are +-[2**-7, 2**-6) with random mantissas (activations stay
    finite), cut at a random offset from a 128 MiB pool of random bits: making
    fresh bits for 8 billion entries took longer than loading them.
    """

    def __init__(self, config) -> None:
        from cake.pipeline import expected_shape
        from cake.shard import Shard
        from cake.weights.names import shard_tensor_names

        names = shard_tensor_names(config, Shard.whole(config.num_hidden_layers))
        self.shapes = {n: expected_shape(config, n) for n in names}
        self.rng = np.random.default_rng(0)
        bits = np.frombuffer(self.rng.bytes(2 * 2**26), np.uint16)
        self.pool = (bits & np.uint16(0x807F)) | np.uint16(0x3C00)  # sign, mantissa

    def keys(self) -> list[str]:
        return list(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def __contains__(self, name: object) -> bool:
        return name in self.shapes

    def get(self, name: str) -> np.ndarray:
        shape = self.shapes[name]
        if len(shape) == 1:
            return np.ones(shape, ml_dtypes.bfloat16)
        n, k = int(np.prod(shape)), len(self.pool)
        off = int(self.rng.integers(k))
        bits = np.tile(self.pool, -(-(n + off) // k))[off : off + n]
        return bits.view(ml_dtypes.bfloat16).reshape(shape)

    def weight_bytes_per_token(self) -> int:
        """Bytes decode reads per token: every matrix, the head, one embedding row."""
        total = sum(2 * int(np.prod(s)) for s in self.shapes.values())
        if "lm_head.weight" in self.shapes:  # untied: the embedding is only indexed
            total -= 2 * int(np.prod(self.shapes["model.embed_tokens.weight"]))
        return total


def device_read_bandwidth(gib: int = 4) -> float:
    """Bytes/s of a jitted sum over `gib` GiB of bfloat16 on JAX's default device."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((gib * 2**30 // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    del x
    return gib * 2**30 / best


def device_step_ms(stage, pos: int, n: int = 50) -> float:
    """Milliseconds per decode step of the jitted stage alone: inputs already on
    the device, `n` calls queued back to back, one wait at the end. The gap to a
    whole step is host work (padding, copies in and out, dispatch)."""
    import jax

    from cake.backends.jax import cache as kv

    args = jax.device_put(
        [
            np.zeros((1, 1), np.int32),
            np.zeros(1, np.int32),  # slot 0: decode_run's sequence holds it
            np.array([pos], np.int32),
            np.ones(1, np.int32),
        ],
        stage._jax_device,
    )
    t_len = kv.bucket(pos + 1, cap=stage.max_context, floor=kv.MIN_CACHE_BUCKET)

    def one():
        out, stage._cache = stage._step(
            stage._params,
            stage._cache,
            *args,
            t_len=t_len,
            all_logits=False,
            causal_chunk=None,
        )
        return out

    one().block_until_ready()
    t = time.perf_counter()
    for _ in range(n):
        out = one()
    out.block_until_ready()
    return 1e3 * (time.perf_counter() - t) / n


# --- check ---------------------------------------------------------------------


def compare(jax_stage, np_stage, prompt: list[int], steps: int) -> tuple[float, bool]:
    """Largest |JAX - NumPy| logit (relative to NumPy's largest) and tokens equal."""
    from cake.backends import Step

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
        a = jax_stage.forward(np.array([[tok_b]], np.int32), step)
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


def check() -> bool:
    import jax
    from jax_decode_profile import random_model

    from cake.config import ModelConfig
    from cake.weights.checkpoint import open_checkpoint
    from tests.models import ARCHS, make_checkpoint

    print(f"jax {jax.__version__}, default device {jax.devices()[0]}")
    ok = True
    # float32 must agree to rounding; bfloat16 differs by where each side rounds
    limits = {"float32": 1e-4, "bfloat16": 5e-2}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in sorted(ARCHS):
            for dtype, limit in limits.items():
                folder = make_checkpoint(
                    arch, Path(tmp) / f"{arch}-{dtype}", dtype=dtype
                )
                config, tensors = open_checkpoint(folder)
                worst, same = compare(
                    load("jax", config, tensors, dtype),
                    load("numpy", config, tensors, dtype),
                    [1, 5, 17, 99, 3, 42, 7, 64, 12, 33, 8],
                    8,
                )
                good = worst <= limit and (same or dtype != "float32")
                ok &= good
                print(
                    f"{'ok  ' if good else 'FAIL'} {arch:8} {dtype:9} max rel diff "
                    f"{worst:.2e} (limit {limit:.0e}), greedy tokens "
                    f"{'equal' if same else 'differ'}"
                )
    config, tensors = random_model()
    assert isinstance(config, ModelConfig)
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, 49152, 24)]
    worst, same = compare(
        load("jax", config, tensors, "float32"),
        load("numpy", config, tensors, "float32"),
        prompt,
        32,
    )
    good = worst <= 1e-4 and same
    ok &= good
    print(
        f"{'ok  ' if good else 'FAIL'} SmolLM2-135M shapes float32, 24-token prompt + "
        f"32 steps: max rel diff {worst:.2e}, greedy tokens {'equal' if same else 'differ'}"
    )
    return ok


# --- speed ---------------------------------------------------------------------


def speed(model: str) -> dict:
    import jax

    from cake.backends.jax import JaxBackend
    from cake.config import ModelConfig
    from cake.shard import Shard

    cfg = ModelConfig.from_dict(MODELS[model])
    src = RandomSource(cfg)
    t = time.perf_counter()
    stage = JaxBackend().load(
        cfg,
        Shard.whole(cfg.num_hidden_layers),
        src,
        "bfloat16",
        max_context=1024,
        max_sequences=1,
    )
    load_s = time.perf_counter() - t
    bw = device_read_bandwidth()
    wbytes = src.weight_bytes_per_token()
    bound = bw / wbytes
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, (1, 16)).astype(np.int32)
    t = time.perf_counter()
    decode_run(stage, prompt, 128)
    warm_s = time.perf_counter() - t
    runs = [decode_run(stage, prompt, 128) for _ in range(3)]
    decode = max(128 / r.sum() for r in runs)
    dev_ms = device_step_ms(stage, 16 + 64)
    long = rng.integers(0, cfg.vocab_size, (1, 512)).astype(np.int32)
    prefill_run(stage, long)
    prefill = max(prefill_run(stage, long) for _ in range(3))
    out = dict(
        system="cake jax",
        model=model,
        device=str(jax.devices()[0]),
        load_s=round(load_s, 1),
        warmup_s=round(warm_s, 1),
        weight_gb=round(wbytes / 1e9, 2),
        read_gb_s=round(bw / 1e9, 0),
        bound_tok_s=round(bound, 1),
        decode_tok_s=round(decode, 1),
        decode_of_bound=round(decode / bound, 3),
        step_ms_median=round(1e3 * float(np.median(np.concatenate(runs))), 3),
        device_step_ms=round(dev_ms, 3),
        prefill_tok_s=round(prefill, 0),
    )
    print(json.dumps(out))
    return out


def hf(model: str) -> dict:
    import torch
    import transformers

    kw = dict(MODELS[model])
    kw.pop("model_type")
    cfg = transformers.LlamaConfig(**kw)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        m = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    rng = np.random.default_rng(0)
    ids = torch.tensor(rng.integers(0, cfg.vocab_size, (1, 16)), device=dev)

    def gen(n: int) -> float:
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        m.generate(
            ids,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    with torch.inference_mode():
        gen(8)
        decode = max(128 / (gen(129) - gen(1)) for _ in range(3))
        long = torch.tensor(rng.integers(0, cfg.vocab_size, (1, 512)), device=dev)
        m(long, logits_to_keep=1)

        def pre() -> float:
            if dev == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            m(long, logits_to_keep=1)
            if dev == "cuda":
                torch.cuda.synchronize()
            return 512 / (time.perf_counter() - t)

        prefill = max(pre() for _ in range(3))
    out = dict(
        system=f"HF transformers {transformers.__version__} (torch {torch.__version__})",
        model=model,
        device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        decode_tok_s=round(decode, 1),
        prefill_tok_s=round(prefill, 0),
    )
    print(json.dumps(out))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["check", "speed", "hf"])
    ap.add_argument("--model", default="llama-1b", choices=sorted(MODELS))
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    args = ap.parse_args()
    if args.what == "check":
        return 0 if check() else 1
    out = speed(args.model) if args.what == "speed" else hf(args.model)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
