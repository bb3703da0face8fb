"""Summary statistics and the Markdown report of run_all.py's results."""

from __future__ import annotations

import statistics

NOISE_MARK = "*"


def summarize(
    samples: list[dict], key: str, quiet_cores: float, noise_key: str = "foreign_cores"
) -> dict | None:
    """Median [min-max] of `key` over the clean samples, or over all if none is clean.

    A sample is clean when other processes used at most `quiet_cores` cores while
    it ran; `noisy` says the figure had to use noisy samples.
    """
    vals = [(s[key], s.get(noise_key)) for s in samples if s.get(key) is not None]
    if not vals:
        return None
    clean = [v for v, f in vals if f is None or f <= quiet_cores]
    use = clean or [v for v, _ in vals]
    return {
        "median": statistics.median(use),
        "min": min(use),
        "max": max(use),
        "n": len(use),
        "n_noisy": len(vals) - len(clean),
        "noisy": not clean,
    }


def matching_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy runs share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _fmt(st: dict | None) -> str:
    if st is None:
        return "n/a"
    mark = NOISE_MARK if st["noisy"] else ""
    if st["n"] == 1:
        return f"{st['median']:.1f}{mark}"
    return f"{st['median']:.1f} [{st['min']:.1f}-{st['max']:.1f}]{mark}"


def _ratio(a: dict | None, b: dict | None) -> str:
    if a is None or b is None or not b["median"]:
        return "n/a"
    return f"{a['median'] / b['median']:.2f}x"


def finish(res: dict) -> dict:
    """Add to the raw results: per-row summaries, bandwidth, load and greedy agreement."""
    quiet, rows = res["args"]["quiet_cores"], res["rows"]
    loads = [
        s[k] for r in rows for s in r["samples"] for k in s if k.endswith("_foreign")
    ] + [s["foreign_cores"] for s in res["bw_samples"]]
    res["load"] = {
        "n": len(loads),
        "median": statistics.median(loads) if loads else 0,
        "max": max(loads, default=0),
        "n_noisy": sum(x > quiet for x in loads),
    }
    res["bandwidth"] = {
        k: summarize(res["bw_samples"], f"gbps_{k}", quiet) for k in ("1t", "nt")
    }
    hf = {r["fmt"]: r for r in rows if r["worker"] == "hf" and r.get("tokens")}
    res["agreement"] = []
    for r in rows:
        for key in ("decode", "prefill"):
            r[key] = summarize(r["samples"], key, quiet, f"{key}_foreign")
        same = "bfloat16" if r["fmt"] == "bfloat16" else "float32"
        refs = {id(x): x for x in (hf.get("float32"), hf.get(same)) if x}
        parts = [
            f"vs HF {x['format']} {matching_prefix(r['tokens'], x['tokens'])}/"
            f"{len(x['tokens'])}"
            for x in refs.values()
            if x is not r and r.get("tokens")
        ]
        if parts:
            res["agreement"].append(f"{r['system']} {r['format']}: " + ", ".join(parts))
    return res


def build_markdown(res: dict) -> str:
    """The report: setup, bandwidth, the throughput table, first-call times, notes."""
    m, a = res["machine"], res["args"]
    bw = res["bandwidth"]
    bw2 = bw["nt"]["median"] if bw.get("nt") else None
    out = [
        "# cake benchmark: SmolLM2-135M-Instruct on the CPU",
        "",
        f"- date (UTC): {res['date']}",
        f"- machine: {m.get('cpu_model', '?')}, {m.get('cpus')} logical CPUs, "
        f"{m.get('mem_GiB', '?')} GiB",
        f"- threads: {a['threads']}; decode: {a['decode_tokens']} greedy single-token "
        f"steps after a {a['prompt_tokens']}-token prompt; prefill: one "
        f"{a['prefill_tokens']}-token pass; rounds: {res['rounds_done']} "
        "(interleaved, order rotated)",
        f"- figures: median [min-max] over rounds of the clean samples (other "
        f"processes used at most {a['quiet_cores']} cores); {NOISE_MARK} = only noisy "
        "samples were available",
        f"- versions: {', '.join(f'{k} {v}' for k, v in sorted(res['versions'].items()))}",
    ]
    if bw2:
        out.append(
            f"- memory read bandwidth (NumPy float32 sum over 1 GiB, best of 5, median "
            f"of rounds): 1 thread {bw['1t']['median']:.1f} GB/s, "
            f"{a['threads']} threads {bw2:.1f} GB/s; decode bound = {a['threads']}-"
            "thread bandwidth / weights read per token"
            + (
                f" ({NOISE_MARK} measured while other processes were busy: the "
                "bound is too low, % of bound too high)"
                if bw["nt"]["noisy"]
                else ""
            )
        )
    load = res["load"]
    if load["n"]:
        out.append(
            f"- CPU used by other processes during samples: median "
            f"{load['median']:.2f}, max {load['max']:.2f} cores; "
            f"{load['n_noisy']} of {load['n']} samples noisy"
        )
    out += [
        "",
        "| system | format | weights MB/token | decode tok/s | % of bound "
        "| vs HF fp32 decode | prefill tok/s | vs HF fp32 prefill |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = res["rows"]
    ref = next((r for r in rows if r["task"] == "hf:float32"), None)
    ref_d = ref["decode"] if ref else None
    ref_p = ref["prefill"] if ref else None
    for r in rows:
        wb = r["weights_bytes"]
        bound = bw2 * 1e9 / wb if bw2 and wb else None
        pct = (
            f"{100 * r['decode']['median'] / bound:.0f}%"
            if bound and r["decode"]
            else "n/a"
        )
        out.append(
            f"| {r['system']} | {r['format']} | {wb / 1e6:.1f} | {_fmt(r['decode'])} "
            f"| {pct} | {_ratio(r['decode'], ref_d)} | {_fmt(r['prefill'])} "
            f"| {_ratio(r['prefill'], ref_p)} |"
        )
    out += [
        "",
        "## Load and first-call times (seconds; first calls include compilation)",
        "",
        f"| system | format | load | first {a['prompt_tokens']}-token prefill "
        f"| first decode step | first {a['prefill_tokens']}-token prefill |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        f = r.get("first", {})

        def s(k: str, f: dict = f) -> str:
            return f"{f[k]:.2f}" if f.get(k) is not None else "n/a"

        out.append(
            f"| {r['system']} | {r['format']} | {s('load_s')} "
            f"| {s('first_prefill_short_s')} | {s('first_decode_step_s')} "
            f"| {s('first_prefill_s')} |"
        )
    if res["agreement"]:
        out += ["", "## Greedy decode tokens vs HF fp32 (same prompt ids)", ""]
        out += [f"- {line}" for line in res["agreement"]]
    if res["notes"]:
        out += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(out) + "\n"
