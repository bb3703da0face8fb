"""`--topology auto`: bench the master and every worker, plan, and say the plan.

`auto_plan` connects to each worker (it must run the master's model and wait
for layers: started without --layers), probes the master here and each worker
there (its own backend, this model's layers), plans with `cake.plan.plan`, and
returns the plan with the topology that runs it (None when every layer stays
on the master). The caller then connects to the planned workers as for any
topology: each is sent a `load` of its layers (cake/net/handshake.py); a worker
the plan leaves out is not touched. See docs/bench.md.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cake.backends.base import Step
from cake.bench import DeviceProfile, profile_local
from cake.config import ModelConfig
from cake.errors import NetworkError, TopologyError
from cake.kv import dtype_of
from cake.net.bench import open_clients, probe_client, worker_specs
from cake.net.protocol import fingerprint, format_ranges
from cake.net.worker_ops import layers_that_fit
from cake.pipeline import load_local_stage
from cake.plan import Plan, hop_seconds, layer_seconds, plan
from cake.shard import Shard
from cake.sizes import ModelSizes, checkpoint_sizes, experts_line
from cake.split import hf_config_dict
from cake.topology import Topology, WorkerSpec
from cake.weights.source import TensorSource

MASTER = "master"  # the master's name in the profiles and the plan


def _say(message: str) -> None:
    print(f"cake: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class AutoPlan:
    """A plan made from fresh probes, and the topology that runs it."""

    plan: Plan
    profiles: tuple[DeviceProfile, ...]  # the master's first
    sizes: ModelSizes
    topology: Topology | None  # None: every layer runs on the master
    head_seconds: float = 0.0  # the master's final norm and head, per token

    @property
    def tokens_per_second(self) -> float:
        """The plan's prediction with the master's head added."""
        return 1.0 / (self.plan.seconds_per_token + self.head_seconds)

    def predict_seconds(self, context: int) -> float:
        """Predicted seconds per token with `context` positions cached (the plan
        itself is made for its planning context), the master's head included."""
        by_name = {p.name: p for p in self.profiles}
        s = self.sizes
        total = self.head_seconds
        for a in self.plan.assignments:
            p = by_name[a.name]
            read = s.active_range_bytes(a.start, a.end) / a.layers
            t = layer_seconds(p, context, read, s.kv_bytes_per_token)
            total += a.layers * t + hop_seconds(p, s.activation_bytes)
        return total


def probe_shape(context: int) -> tuple[int, int]:
    """(short, chunk) for a probe whose long context is `context`: the defaults
    where they fit, smaller for a short context."""
    if context > 1024:
        return 128, 512
    if context < 8:
        raise TopologyError(
            f"a context of {context} is too short to probe and plan: use --context 8+"
        )
    return max(1, context // 8), max(1, context // 4)


def head_seconds(
    config: ModelConfig, tensors: TensorSource, backend: str, dtype: str, n: int = 9
) -> float:
    """Median seconds of the master's final norm and head for one token: a cost
    every plan pays, which the planner's per-layer model leaves out."""
    L = config.num_hidden_layers
    stage = load_local_stage(
        config, Shard(L, L, L, head=True), tensors, backend, dtype,
        max_context=1, max_sequences=1,
    )  # fmt: skip
    x = np.ones((1, 1, config.hidden_size), dtype_of(dtype))
    step = Step((0,), (0,), (1,))
    times = []
    for _ in range(n + 1):  # the first call compiles
        t0 = time.perf_counter()
        stage.forward(x, step)
        times.append(time.perf_counter() - t0)
    del stage
    gc.collect()
    return statistics.median(times[1:])


def plan_lines(p: Plan, head: float = 0.0) -> list[str]:
    """The plan for people: one line per device, then what is left out."""
    total = p.seconds_per_token + head
    lines = [
        f"plan ({p.method}) at {p.context} positions: predicted "
        f"{1 / total:.1f} tokens/s ({total * 1e3:.1f} ms per token, one stream: "
        f"layers and hops {p.seconds_per_token * 1e3:.1f}, the master's head "
        f"{head * 1e3:.1f})"
    ]
    for a in p.assignments:
        hop = f" incl. {a.hop_seconds * 1e3:.2f} ms hop" if a.hop_seconds else ""
        lines.append(
            f"  {a.name}: layers {format_ranges([(a.start, a.end)])} ({a.layers}) "
            f"on {a.backend} ({a.device}): {a.seconds * 1e3:.2f} ms per token{hop}; "
            f"memory {a.memory_bytes / 1e9:.2f} of {a.memory_available / 1e9:.2f} GB"
        )
    for name, why in p.dropped:
        what = "runs no layers" if name == p.master else "left out"
        lines.append(f"  {name}: {what}, {why}")
    return lines


def _check_workers(clients, model_fp: str, context: int, explicit: bool) -> int:
    """Each worker waits for layers of this model; the context they all allow."""
    for c in clients:
        h = c.info
        if h.get("model_fingerprint") and h["model_fingerprint"] != model_fp:
            raise NetworkError(
                f"{c.who} runs a different model than the master "
                f"({h.get('model_type')}, {h.get('n_layers')} layers, hidden "
                f"{h.get('hidden_size')}): start it with the same --model"
            )
        if h.get("fixed", True):
            held = format_ranges(h.get("layers") or [])
            raise TopologyError(
                f"{c.who} was started with fixed layers ({held}): with --topology "
                "auto the master assigns every worker's layers; restart it without "
                "--layers and --name"
            )
        limit = int(h.get("context_limit") or h.get("context") or 0)
        if limit < context:
            if explicit:
                raise NetworkError(
                    f"{c.who} holds at most {limit} positions but the master was "
                    f"asked for {context}: start the worker with --context "
                    f"{context} or lower --context"
                )
            context = limit
    return context


def auto_plan(
    config: ModelConfig,
    tensors: TensorSource,
    workers: Sequence[WorkerSpec | str] | str | Topology,
    backend: str,
    dtype: str,
    context: int,
    *,
    explicit: bool = False,
    label: str = "model",
    client_key: str | os.PathLike[str] | None = None,
    retry_timeout: float = 30.0,
    bench_timeout: float = 300.0,
    layers: int = 8,
    repeats: int = 9,
    say: Callable[[str], None] = _say,
) -> tuple[AutoPlan, int]:
    """Probe the master (`backend` here) and every worker, and plan for `context`
    positions (lowered to what the workers allow unless `explicit`).

    Each device probes `layers` layers (fewer if they would take over half its
    memory), each figure the median of `repeats` calls: more layers share a
    stage call's fixed cost as a longer stage does.
    Returns the plan and the context. Raises NetworkError for a worker that
    cannot be reached or runs another model, TopologyError for one started with
    fixed layers, PlanError when the devices cannot hold the model.
    """
    specs = worker_specs(workers)
    clients = open_clients(
        specs,
        client_key=client_key,
        connect_timeout=retry_timeout,
        bench_timeout=bench_timeout,
    )
    try:
        ctx = _check_workers(
            clients, fingerprint(config, [], tensors), context, explicit
        )
        short, chunk = probe_shape(ctx)
        k = min(layers, config.num_hidden_layers)
        k = layers_that_fit(config, dtype, ctx, 1, backend, k)
        probe = dict(
            context=ctx, layers=k, dtype=dtype, short=short, chunk=chunk,
            repeats=repeats,
        )  # fmt: skip
        # batch 1: the plan is for one stream; no batched caches to fill
        say(f"probing {MASTER} ({backend}, {k} layers at {ctx} positions)")
        profiles = [
            profile_local(
                backend, config, tensors, name=MASTER, label=label, batch=1, **probe
            )
        ]
        head = head_seconds(config, tensors, backend, dtype)
        shape = hf_config_dict(config)  # what a worker with no model probes
        for c in clients:
            say(f"probing {c.who}")
            profiles.append(
                probe_client(c, synthetic=None, batch=1, model_config=shape, **probe)
            )
    finally:
        for c in clients:
            c.close()
    for p in profiles:
        net = ""
        if p.rtt_s is not None:
            bw = p.bandwidth_bytes_s
            net = f", round trip {p.rtt_s * 1e3:.2f} ms" + (
                f", {bw / 1e6:.0f} MB/s" if bw else ""
            )
        say(
            f"  {p.name}: {p.backend} on {p.device_kind}, decode "
            f"{p.decode_s[0] * 1e3:.2f} / {p.decode_s[1] * 1e3:.2f} ms per layer at "
            f"{p.short_context} / {p.long_context} positions{net}"
        )
    sizes = checkpoint_sizes(config, tensors, dtype)
    best = plan(
        profiles,
        sizes.n_layers,
        sizes.per_layer,
        sizes.kv_bytes_per_token,
        ctx,
        MASTER,
        activation_bytes=sizes.activation_bytes,
        master_bytes=sizes.master_bytes,
        active_bytes=sizes.active_per_layer,
    )
    if (experts := experts_line(config, sizes)) is not None:
        say(experts)
    for line in plan_lines(best, head):
        say(line)
    by_name = {s.name: s for s in specs}
    planned = tuple(
        dataclasses.replace(
            by_name[a.name], ranges=((a.start, a.end),), backend=a.backend
        )
        for a in best.assignments
        if a.name != MASTER
    )
    topo = Topology(planned, source="<auto plan>") if planned else None
    return AutoPlan(best, tuple(profiles), sizes, topo, head), ctx
