"""Benchmark worker processes, started by run_all.py (one per system, never imported).

    python benchmarks/workers.py '{"kind": "bw" | "hf" | "cake" | "export", ...}'

A worker sets itself up (loads its models, warms them up), writes one JSON line
{"ready": info} to its protocol pipe, then answers one JSON request per line:
    {"cmd": "bandwidth"}                          -> 1- and 2-thread read GB/s
    {"cmd": "decode", "fmt": F, "prompt": ids, "n": N}
        -> seconds of N greedy single-token steps after the prompt, and the tokens
    {"cmd": "prefill", "fmt": F, "prompt": ids}  -> seconds of one forward pass
    {"cmd": "quit"}
Anything a library prints to stdout goes to stderr, so the protocol stays clean.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bandwidth_worker(spec: dict):
    import numpy as np

    n_threads = int(spec["threads"])
    # float32 sum over ~1 GiB: far larger than any cache, so it streams from DRAM.
    arr = np.ones(int(spec.get("gib", 1.0) * (1 << 30)) // 4, dtype=np.float32)
    parts = np.array_split(arr, n_threads)
    pool = ThreadPoolExecutor(n_threads)

    def best_gbps(fn, reps: int = 5) -> float:
        fn()  # warm-up
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return arr.nbytes / min(times) / 1e9

    def handle(req: dict) -> dict:
        # Two Python threads each summing half; NumPy releases the GIL in sum.
        return {
            "gbps_1t": best_gbps(arr.sum),
            "gbps_nt": best_gbps(lambda: list(pool.map(np.sum, parts))),
            "threads": n_threads,
            "bytes": arr.nbytes,
        }

    return handle, {"numpy": np.__version__}


def _hf_load(gguf_path: str):
    """HF's float32 model of the GGUF (transformers' own GGUF conversion)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    p = Path(gguf_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(p.parent), gguf_file=p.name, dtype=torch.float32
        )
    except (ImportError, ValueError) as e:
        if "accelerate" not in str(e):
            raise
        # from_pretrained wants `accelerate` for GGUF; the same conversion without it.
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        cfg = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        ckpt = load_gguf_checkpoint(str(p), return_tensors=True, model_to_load=model)
        model.load_state_dict(ckpt["tensors"], strict=False)
        if cfg.tie_word_embeddings:
            model.tie_weights()
    return model.eval()


def export_worker(spec: dict):
    """Write the GGUF's HF model as float32 and bfloat16 safetensors folders (tied head)."""
    import torch
    from safetensors.torch import save_file

    model = _hf_load(spec["gguf"])
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)  # the GGUF's; the export is plain floats
    cfg["architectures"] = ["LlamaForCausalLM"]
    for name, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        out = Path(spec["folders"][name])
        if (out / "config.json").exists():
            continue
        out.mkdir(parents=True, exist_ok=True)
        # A tied head is the embedding: stored once, as HF's save_pretrained does.
        tensors = {
            k: v.to(torch_dtype).contiguous()
            for k, v in model.state_dict().items()
            if not (k == "lm_head.weight" and model.config.tie_word_embeddings)
        }
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        # config.json last: its presence marks a complete export.
        (out / "config.json").write_text(json.dumps(cfg | {"dtype": name}, indent=1))
    return None, {}


def hf_worker(spec: dict):
    import torch
    import transformers

    torch.set_num_threads(int(spec["threads"]))
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    models, info = (
        {},
        {"torch": torch.__version__, "transformers": transformers.__version__},
    )
    t0 = time.perf_counter()
    base = _hf_load(spec["gguf"])
    info["load_s"] = time.perf_counter() - t0
    for fmt in spec["dtypes"]:
        models[fmt] = base if fmt == "float32" else copy.deepcopy(base).to(dtypes[fmt])
    info["formats"] = {
        fmt: {
            # Parameters are unique (the tied head is the embedding): every one of them
            # is read per token except the embedding rows, which is what we want.
            "weights_bytes": sum(p.numel() * p.element_size() for p in m.parameters()),
            "label": {"float32": "fp32", "bfloat16": "bf16"}[fmt],
        }
        for fmt, m in models.items()
    }
    info["threads"] = torch.get_num_threads()

    # transformers 5 renamed the forward argument past_key_values to cache.
    params = inspect.signature(base.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"

    def cache_of(out):
        c = getattr(out, "cache", None)
        return c if c is not None else out.past_key_values

    @torch.inference_mode()
    def handle(req: dict) -> dict:
        model = models[req["fmt"]]
        ids = torch.tensor([req["prompt"]], dtype=torch.long)
        if req["cmd"] == "prefill":
            t = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            out.logits[0, -1, 0].item()
            return {"seconds": time.perf_counter() - t}
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        past = cache_of(out)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        toks = [int(nxt)]
        t = time.perf_counter()
        for _ in range(req["n"]):
            out = model(input_ids=nxt, use_cache=True, **{cache_kw: past})
            past = cache_of(out)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(int(nxt))
        return {"seconds": time.perf_counter() - t, "tokens": toks}

    short, long = spec["decode_prompt"], spec["prefill_prompt"]
    for fmt, fi in info["formats"].items():  # warm-up: first calls pick kernels
        req = {"fmt": fmt, "n": 1}
        fi["first_prefill_short_s"] = handle(req | {"cmd": "prefill", "prompt": short})
        fi["first_decode_step_s"] = handle(req | {"cmd": "decode", "prompt": short})
        handle(req | {"cmd": "decode", "prompt": short, "n": 4})
        fi["first_prefill_s"] = handle(req | {"cmd": "prefill", "prompt": long})
        for k in ("first_prefill_short_s", "first_decode_step_s", "first_prefill_s"):
            fi[k] = fi[k]["seconds"]
    return handle, info


def cake_worker(spec: dict):
    import numpy as np

    from cake.backends.base import Step
    from cake.pipeline import load_local_stage
    from cake.shard import Shard
    from cake.weights.checkpoint import open_checkpoint

    backend, stages, info = spec["backend"], {}, {"formats": {}, "skipped": {}}

    def run_decode(stage, prompt: list[int], n: int) -> tuple[float, list[int], float]:
        ids = np.asarray([prompt], dtype=np.int32)  # (1, L)
        logits = stage.forward(ids, Step((0,), (0,), (len(prompt),)))  # (1, V)
        nxt, pos, toks = int(logits[0].argmax()), len(prompt), []
        toks.append(nxt)
        t = first = time.perf_counter()
        for i in range(n):
            logits = stage.forward(
                np.asarray([[nxt]], dtype=np.int32), Step((0,), (pos,), (1,))
            )
            nxt, pos = int(logits[0].argmax()), pos + 1
            toks.append(nxt)
            if i == 0:
                first = time.perf_counter() - t
        return time.perf_counter() - t, toks, first

    def run_prefill(stage, prompt: list[int]) -> float:
        ids = np.asarray([prompt], dtype=np.int32)
        t = time.perf_counter()
        stage.forward(ids, Step((0,), (0,), (len(prompt),)))
        return time.perf_counter() - t

    for fmt, entry in spec["formats"].items():
        try:
            t0 = time.perf_counter()
            config, tensors = open_checkpoint(entry["path"])
            stage = load_local_stage(
                config,
                Shard.whole(config.num_hidden_layers),
                tensors,
                backend,
                entry["dtype"],
                max_context=1024,
                max_sequences=1,
            )
            fi = {"load_s": time.perf_counter() - t0, "label": entry["label"]}
            fi["weights_bytes"] = weights_bytes(config, entry["dtype"])
            # First calls compile (JAX, MLX); time them apart from the samples.
            t = time.perf_counter()
            run_prefill(stage, spec["decode_prompt"])
            fi["first_prefill_short_s"] = time.perf_counter() - t
            dt, _, first = run_decode(stage, spec["decode_prompt"], 8)
            fi["first_decode_step_s"] = first
            warm_rate = 7 / max(dt - first, 1e-9)
            fi["warmup_decode_tok_s"] = warm_rate
            limit, n_dec = spec["max_sample_s"], spec["decode_tokens"]
            if n_dec / warm_rate > limit:
                info["skipped"][fmt] = (
                    f"too slow here: ~{warm_rate:.1f} tok/s decode in warm-up, a "
                    f"{n_dec}-token sample would take over {limit:.0f} s"
                )
                continue
            fi["first_prefill_s"] = run_prefill(stage, spec["prefill_prompt"])
            if fi["first_prefill_s"] > limit:
                info["skipped"][fmt] = (
                    f"too slow here: first {len(spec['prefill_prompt'])}-token "
                    f"prefill took {fi['first_prefill_s']:.0f} s"
                )
                continue
            run_prefill(stage, spec["prefill_prompt"])
            stages[fmt] = stage
            info["formats"][fmt] = fi
        except Exception as e:  # one failing format must not stop the others
            traceback.print_exc()
            info["skipped"][fmt] = _one_line(e)

    def handle(req: dict) -> dict:
        stage = stages[req["fmt"]]
        if req["cmd"] == "prefill":
            return {"seconds": run_prefill(stage, req["prompt"])}
        dt, toks, _ = run_decode(stage, req["prompt"], req["n"])
        return {"seconds": dt, "tokens": toks}

    info["versions"] = _versions(backend)
    return handle, info


def weights_bytes(config, dtype: str) -> int:
    """Bytes of weights one decode step reads: every layer, the final norm, the head."""
    c, itemsize = config, {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    d, hd = c.hidden_size, c.head_dim
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    layer = 2 * q * d + 2 * kv * d + 3 * c.intermediate_size * d + 2 * d
    if c.attention_bias:
        layer += q + 2 * kv
    if c.qk_norm:
        layer += 2 * hd
    n = c.num_hidden_layers * layer + d + c.vocab_size * d
    return n * itemsize


def _versions(backend: str) -> dict:
    import importlib.metadata as md

    pkg = {"jax": "jax", "mlx": "mlx", "numpy": "numpy"}.get(backend, backend)
    try:
        return {pkg: md.version(pkg)}
    except md.PackageNotFoundError:
        return {}


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


WORKERS = {
    "bw": bandwidth_worker,
    "hf": hf_worker,
    "cake": cake_worker,
    "export": export_worker,
}


def main() -> int:
    # Keep a private copy of stdout for the protocol; library prints go to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")

    spec = json.loads(sys.argv[1])
    try:
        handle, info = WORKERS[spec["kind"]](spec)
    except Exception as e:
        traceback.print_exc()
        send({"error": _one_line(e)})
        return 1
    send({"ready": info})
    if handle is None:
        return 0
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "quit":
            break
        try:
            send({"ok": handle(req)})
        except Exception as e:
            traceback.print_exc()
            send({"error": _one_line(e)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
