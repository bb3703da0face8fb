"""Placement: which device runs which contiguous range of layers.

Pure functions over `DeviceProfile`s (see cake/bench.py). The cost model is that
of one stream decoding one token at the planning context:

    time per token = sum over used devices of  layers x seconds per layer
                   + sum over used remote devices of  hop seconds

A device's seconds per layer come from its probe, rescaled to this model (the
weights part by the bytes a token reads of a layer, the attention part by KV
bytes per token); a remote device's hop is its round trip plus the activation
sent and returned. Since the time is additive, the optimum is found exactly:
for every subset of devices, fill the fastest first up to memory, and keep the
cheapest. See docs/bench.md.

Layers are counted by the bytes the checkpoint stores (`cake.sizes.checkpoint_sizes`), so
a quantized model is placed by its real size. A mixed file (llama.cpp's Q4_K_M
gives some layers Q6_K tensors) has layers of different sizes; the search
reserves the largest for every layer. That keeps it exact: a device's room is a
number of layers wherever its range falls, so "fill the fastest first" over
layer counts still finds the optimum, and any range of k layers fits in k times
the largest. Counting each range's real bytes instead would make room depend on
the order of the devices and the position of their ranges (a search over orders
and cut points, not counts). Time is predicted from the mean layer, and the
plan reports each device's memory and time from the bytes of its actual range.

A mixture-of-experts layer keeps every expert in memory but one token's decode
step reads only the `top_k` experts its router picks, beside the attention,
the router and the shared expert. So memory counts a layer's stored bytes and
time its active bytes (`ModelSizes.each_active`): the non-expert tensors and
top_k / num_experts of the experts' stored bytes. For a dense model they are
the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import yaml

from cake.errors import PlanError
from cake.sizes import ModelSizes
from cake.topology import Topology, parse_topology

if TYPE_CHECKING:
    from cake.bench import DeviceProfile

MEMORY_FRACTION = 0.9  # of each device's available memory the plan may use
EXACT_MAX_DEVICES = 12  # 2^12 subsets; beyond, a greedy search


def _sizes(n_layers, layer_bytes, kv_bytes_per_token, activation, master, active):
    """ModelSizes from plan()'s arguments: layer_bytes an int or one per layer,
    active (what a token reads) None, an int or one per layer."""
    each = _per_layer(n_layers, layer_bytes, "layer sizes")
    reads = each if active is None else _per_layer(n_layers, active, "active sizes")
    return ModelSizes(
        n_layers, max(each, default=0), kv_bytes_per_token, activation, master,
        each if len(set(each)) > 1 else (), reads if reads != each else (),
    )  # fmt: skip


def _per_layer(n_layers: int, b: int | Sequence[int], what: str) -> tuple[int, ...]:
    if not isinstance(b, Sequence):
        return (int(b),) * n_layers
    each = tuple(int(x) for x in b)
    if len(each) != n_layers:
        raise PlanError(f"{len(each)} {what} given for {n_layers} layers")
    return each


@dataclass(frozen=True)
class Assignment:
    """Layers [start, end) on one device, with the plan's predictions for it."""

    name: str
    backend: str
    device: str  # "kind: name", for people
    address: str | None
    start: int
    end: int
    layer_seconds: float  # per layer per token at the planning context
    hop_seconds: float  # per token; 0 for the master and local devices
    memory_bytes: int  # weights and KV cache it will hold (plus embedding/head)
    memory_available: int

    @property
    def layers(self) -> int:
        return self.end - self.start

    @property
    def seconds(self) -> float:
        return self.layers * self.layer_seconds + self.hop_seconds


@dataclass(frozen=True)
class Plan:
    method: str  # "exact", "greedy", "even split", "memory share"
    master: str  # the name of the master's profile
    n_layers: int
    context: int
    assignments: tuple[Assignment, ...]  # in pipeline order, covering [0, n_layers)
    dropped: tuple[tuple[str, str], ...]  # (device name, why it holds no layers)

    @property
    def seconds_per_token(self) -> float:
        return sum(a.seconds for a in self.assignments)

    @property
    def tokens_per_second(self) -> float:
        s = self.seconds_per_token
        return 1.0 / s if s > 0 else math.inf


# --- the cost model --------------------------------------------------------------


def layer_seconds(
    p: DeviceProfile, context: int, active_bytes: float, kv_bytes_per_token: int
) -> float:
    """Predicted decode seconds per layer on `p` for this model at `context`,
    for a layer of which one token reads `active_bytes` (`ModelSizes.
    mean_active_bytes`: all its weights, or a MoE layer's top_k experts and the
    rest).

    The probe gives decode (batch 1) at a short and a long context; the line
    through them splits into a fixed part (reading the weights) and a part per
    cached position (attention). Each is scaled from the probed layer to this one
    by bytes: a decode step reads every weight it uses once, so its time goes
    with the bytes stored of the weights read (float or quantized blocks alike),
    this layer's active bytes over the probed layer's (`DeviceProfile.
    active_layer_bytes`, which is `layer_bytes` for a dense probe).
    """
    (t_short, t_long), c0, c1 = p.decode_s, p.short_context, p.long_context
    slope = max(t_long - t_short, 0.0) / max(c1 - c0, 1)  # seconds per position
    fixed = max(t_short - slope * c0, 0.0)
    probed = p.active_layer_bytes or p.layer_bytes
    w_scale = active_bytes / probed if probed else 1.0
    probe_kv = p.kv_bytes_per_1k / 1000
    kv_scale = kv_bytes_per_token / probe_kv if probe_kv else 1.0
    return fixed * w_scale + slope * kv_scale * context


def held_factor(p: DeviceProfile) -> float:
    """Bytes the device's backend holds per byte stored, from its probe (a backend
    that widens bfloat16 to float32 holds 2); 1 when the probe did not say."""
    if p.held_layer_bytes and p.layer_bytes:
        return p.held_layer_bytes / p.layer_bytes
    return 1.0


def hop_seconds(p: DeviceProfile, activation_bytes: int) -> float:
    """Per token: a round trip to the device, the activation there and back."""
    if p.rtt_s is None:
        return 0.0  # in the master's process
    transfer = 2 * activation_bytes / p.bandwidth_bytes_s if p.bandwidth_bytes_s else 0
    return p.rtt_s + transfer


@dataclass(frozen=True)
class _Dev:
    index: int  # in the input order
    profile: DeviceProfile
    t: float  # seconds per layer
    hop: float
    cap: int  # layers it can hold
    per_layer: float  # bytes one (largest) layer stores here with its KV cache

    @property
    def name(self) -> str:
        return self.profile.name


def _devices(profiles, sizes: ModelSizes, context, master, fraction) -> list[_Dev]:
    names = [p.name for p in profiles]
    if not profiles:
        raise PlanError("no device profiles to plan with: run `cake bench` first")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise PlanError(f"two device profiles are named {dup!r}: names must differ")
    out = []
    for i, p in enumerate(profiles):
        per_layer = held_factor(p) * sizes.layer_bytes
        per_layer += sizes.kv_bytes_per_token * context
        reserved = sizes.master_bytes if p.name == master else 0
        usable = fraction * p.memory_bytes - reserved
        if p.name == master and usable < 0:
            raise PlanError(
                f"the master {p.name!r} needs {_gb(reserved)} for the embedding and "
                f"head but has {_gb(fraction * p.memory_bytes)} usable: plan with a "
                "larger master or a smaller dtype"
            )
        cap = min(sizes.n_layers, max(0, int(usable // per_layer)))
        kv = sizes.kv_bytes_per_token
        t = layer_seconds(p, context, sizes.mean_active_bytes, kv)  # time: read
        hop = hop_seconds(p, sizes.activation_bytes)
        out.append(_Dev(i, p, t, hop, cap, per_layer))
    return out


def _fill(devs: Sequence[_Dev], n: int) -> tuple[float, dict[int, int]] | None:
    """Fastest first up to memory: (predicted seconds, index -> layers) or None."""
    left, counts, cost = n, {}, 0.0
    for d in sorted(devs, key=lambda d: (d.t, d.index)):
        if left == 0:
            break
        k = min(d.cap, left)
        if k:
            counts[d.index] = k
            cost += k * d.t + d.hop
            left -= k
    return None if left else (cost, counts)


def _search(devs: list[_Dev], n: int) -> tuple[str, dict[int, int]] | None:
    useful = [d for d in devs if d.cap > 0]
    best: tuple[float, int, dict[int, int]] | None = None
    if len(useful) <= EXACT_MAX_DEVICES:
        for mask in range(1, 1 << len(useful)):
            subset = [d for j, d in enumerate(useful) if mask >> j & 1]
            got = _fill(subset, n)
            if got and (best is None or (got[0], len(got[1])) < best[:2]):
                best = (got[0], len(got[1]), got[1])
        return None if best is None else ("exact", best[2])
    # Greedy: start from every device, drop the one whose loss helps most, repeat.
    current = useful
    got = _fill(current, n)
    if got is None:
        return None
    while True:
        trials = [(_fill([d for d in current if d is not x], n), x) for x in current]
        better = [(g, x) for g, x in trials if g and g[0] < got[0]]
        if not better:
            return "greedy", got[1]
        got, drop = min(better, key=lambda t: t[0][0])
        current = [d for d in current if d is not drop]


def _order(devs: list[_Dev], counts: Mapping[int, int], master: str) -> list[_Dev]:
    """Master first (it embeds), then fastest first, ties in input order."""
    used = [d for d in devs if counts.get(d.index)]
    return sorted(used, key=lambda d: (d.name != master, d.t, d.index))


def _make_plan(method, devs, counts, sizes, context, master, dropped) -> Plan:
    out, pos = [], 0
    kv = sizes.kv_bytes_per_token
    for d in _order(devs, counts, master):
        k, p = counts[d.index], d.profile
        extra = sizes.master_bytes if d.name == master else 0
        weights = sizes.range_bytes(pos, pos + k)  # this range's real bytes
        held = round(held_factor(p) * weights)
        t = d.t
        if sizes.each_layer or sizes.each_active:  # this range's, not the mean's
            read = sizes.active_range_bytes(pos, pos + k)
            t = layer_seconds(p, context, read / k, kv)
        out.append(
            Assignment(
                name=d.name,
                backend=p.backend,
                device=f"{p.device_kind}: {p.device_name}",
                address=p.address,
                start=pos,
                end=pos + k,
                layer_seconds=t,
                hop_seconds=d.hop,
                memory_bytes=held + k * kv * context + extra,
                memory_available=p.memory_bytes,
            )
        )
        pos += k
    return Plan(method, master, sizes.n_layers, context, tuple(out), tuple(dropped))


def _why_dropped(d: _Dev, used: list[_Dev], counts, fraction) -> str:
    if d.cap == 0:
        return (
            f"cannot hold one layer ({_gb(d.per_layer)} with its KV cache; "
            f"{_gb(fraction * d.profile.memory_bytes)} usable)"
        )
    slower = sorted(
        (u.t for u in used for _ in range(counts[u.index]) if u.t > d.t), reverse=True
    )
    if not slower:
        return (
            f"too slow ({d.t * 1e3:.2f} ms per layer): faster devices hold every layer"
        )
    saving = sum(t - d.t for t in slower[: d.cap])
    return (
        f"its hop costs {d.hop * 1e3:.2f} ms per token, more than the "
        f"{saving * 1e3:.2f} ms its layers would save"
    )


def plan(
    profiles: Sequence[DeviceProfile],
    n_layers: int,
    layer_bytes: int | Sequence[int],
    kv_bytes_per_token: int,
    context: int,
    master: str = "master",
    *,
    activation_bytes: int = 0,
    master_bytes: int = 0,
    active_bytes: int | Sequence[int] | None = None,
    memory_fraction: float = MEMORY_FRACTION,
) -> Plan:
    """The placement with the least predicted time per token that fits in memory.

    layer_bytes: one layer's weights, or each layer's (n_layers of them) when
    they differ, e.g. `ModelSizes.per_layer`; a device reserves the largest for
    every layer it holds (see the module docstring for why).
    active_bytes: what one token's decode step reads of a layer, or of each
    (`ModelSizes.active_per_layer`: a MoE layer's top_k experts and the rest);
    None: every weight, a dense model. Memory is placed by layer_bytes, time
    predicted from active_bytes.
    kv_bytes_per_token: K and V of one layer for one position. master: the name
    of the profile that is the master process (it keeps the embedding and head,
    `master_bytes`, and runs the first layers if it runs any). A device that
    would make the pipeline slower holds no layers and is listed in `dropped`.
    Raises PlanError, saying how much memory is missing, when nothing fits.
    """
    if n_layers < 1 or context < 1:
        raise PlanError("planning needs at least one layer and a context of 1")
    sizes = _sizes(
        n_layers,
        layer_bytes,
        kv_bytes_per_token,
        activation_bytes,
        master_bytes,
        active_bytes,
    )
    devs = _devices(profiles, sizes, context, master, memory_fraction)
    per_layer = sizes.layer_bytes + kv_bytes_per_token * context
    found = _search(devs, n_layers)
    if found is None:
        room = sum(d.cap for d in devs)
        missing = (n_layers - room) * per_layer
        raise PlanError(
            f"the devices hold {room} of {n_layers} layers at context {context} "
            f"({_gb(per_layer)} per layer with its KV cache, using "
            f"{memory_fraction:.0%} of each device's memory): {_gb(missing)} more "
            "is needed; add a device, lower --context or use a smaller dtype"
        )
    method, counts = found
    used = [d for d in devs if counts.get(d.index)]
    dropped = [
        (d.name, _why_dropped(d, used, counts, memory_fraction))
        for d in devs
        if not counts.get(d.index)
    ]
    return _make_plan(method, devs, counts, sizes, context, master, dropped)


def _baseline(method, weights, profiles, sizes, context, master, fraction):
    """Plan of `weights(devices)` shares over every device; None if it does not fit."""
    try:
        devs = _devices(profiles, sizes, context, master, fraction)
    except PlanError:
        return None
    devs = sorted(devs, key=lambda d: (d.name != master, d.index))
    w = [max(x, 0.0) for x in weights(devs)]
    if sum(w) <= 0:
        return None
    # Largest remainder: floor each share, then hand out what is left.
    n = sizes.n_layers
    exact = [n * x / sum(w) for x in w]
    counts = [int(x) for x in exact]
    by_rest = sorted(range(len(devs)), key=lambda j: (counts[j] - exact[j], j))
    for j in by_rest[: n - sum(counts)]:
        counts[j] += 1
    if any(k > d.cap for k, d in zip(counts, devs, strict=True)):
        return None
    table = {d.index: k for d, k in zip(devs, counts, strict=True) if k}
    return _make_plan(method, devs, table, sizes, context, master, ())


def even_split(
    profiles: Sequence[DeviceProfile],
    n_layers: int,
    layer_bytes: int | Sequence[int],
    kv_bytes_per_token: int,
    context: int,
    master: str = "master",
    *,
    activation_bytes: int = 0,
    master_bytes: int = 0,
    active_bytes: int | Sequence[int] | None = None,
    memory_fraction: float = MEMORY_FRACTION,
) -> Plan | None:
    """Every device the same number of layers (mlx-lm's way); None if it does not fit."""
    sizes = _sizes(
        n_layers,
        layer_bytes,
        kv_bytes_per_token,
        activation_bytes,
        master_bytes,
        active_bytes,
    )
    return _baseline(
        "even split",
        lambda ds: [1.0] * len(ds),
        profiles,
        sizes,
        context,
        master,
        memory_fraction,
    )


def memory_share_split(
    profiles: Sequence[DeviceProfile],
    n_layers: int,
    layer_bytes: int | Sequence[int],
    kv_bytes_per_token: int,
    context: int,
    master: str = "master",
    *,
    activation_bytes: int = 0,
    master_bytes: int = 0,
    active_bytes: int | Sequence[int] | None = None,
    memory_fraction: float = MEMORY_FRACTION,
) -> Plan | None:
    """Layers in proportion to usable memory (exo's way); None if it does not fit."""
    sizes = _sizes(
        n_layers,
        layer_bytes,
        kv_bytes_per_token,
        activation_bytes,
        master_bytes,
        active_bytes,
    )

    def usable(ds: list[_Dev]) -> list[float]:
        reserved = [master_bytes if d.name == master else 0 for d in ds]
        return [
            memory_fraction * d.profile.memory_bytes - r
            for d, r in zip(ds, reserved, strict=True)
        ]

    return _baseline(
        "memory share", usable, profiles, sizes, context, master, memory_fraction
    )


def to_topology(plan: Plan, addresses: Mapping[str, str] | None = None) -> Topology:
    """The plan's workers as a Topology (the master's layers are left out: layers
    no worker holds run on the master). `addresses`: name -> "host:port", else
    each profile's own address."""
    data: dict[str, dict] = {}
    for a in plan.assignments:
        if a.name == plan.master:
            continue  # it runs these layers itself
        address = (addresses or {}).get(a.name) or a.address
        if address is None:
            raise PlanError(
                f"device {a.name!r} has no address: give its host:port "
                "(bench it with --workers, or pass addresses)"
            )
        data[a.name] = {
            "host": address,
            "description": f"{a.device} ({a.backend}), planned "
            f"{a.layers * a.layer_seconds * 1e3:.2f} ms per token",
            "layers": [f"model.layers.{a.start}-{a.end - 1}"],
            "backend": a.backend,
        }
    if not data:
        raise PlanError(
            "the plan runs every layer on the master: no topology file is needed"
        )
    return parse_topology(yaml.safe_dump(data, sort_keys=False), source="<plan>")


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"
