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

Layers are counted by the bytes the checkpoint stores (`checkpoint_sizes`), so
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import yaml

from cake.config import ModelConfig
from cake.errors import CakeError
from cake.kv import dtype_of
from cake.pipeline import expected_shape
from cake.topology import Topology, parse_topology
from cake.weights.names import head_tensor_names, layer_names, layer_shapes
from cake.weights.packed import stored_tensor
from cake.weights.source import TensorSource

if TYPE_CHECKING:
    from cake.bench import DeviceProfile

MEMORY_FRACTION = 0.9  # of each device's available memory the plan may use
EXACT_MAX_DEVICES = 12  # 2^12 subsets; beyond, a greedy search


class PlanError(CakeError):
    """No placement fits, or a plan cannot become a topology."""


@dataclass(frozen=True)
class ModelSizes:
    """Byte counts of one model, all that planning needs of it.

    Weights are counted as the checkpoint stores them (`checkpoint_sizes`), or
    as parameters x a dtype (`model_sizes`); the KV cache and activations are in
    the compute dtype. `each_layer` lists every layer's weights when they
    differ (a quantized file mixing formats); `layer_bytes` is then the largest,
    what the planner reserves for every layer. `each_active` lists what one
    token's decode step reads of each layer where that is less than it stores
    (a mixture of experts: all experts resident, top_k of them read).
    """

    n_layers: int
    layer_bytes: int  # weights of the largest transformer layer
    kv_bytes_per_token: int  # K and V of one layer for one position
    activation_bytes: int  # hidden state of one token crossing a hop
    master_bytes: int  # embedding, final norm and head: always on the master
    each_layer: tuple[int, ...] = ()  # weights of layers 0, 1, ...; () if uniform
    # weights one token reads of layers 0, 1, ...; () if every weight (dense)
    each_active: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        each = self.each_layer
        if each and (len(each) != self.n_layers or max(each) != self.layer_bytes):
            raise PlanError(
                f"{len(each)} layer sizes for {self.n_layers} layers, or their "
                f"largest is not layer_bytes {self.layer_bytes}"
            )
        active = self.each_active
        if active and (
            len(active) != self.n_layers
            or any(a > b for a, b in zip(active, self.per_layer, strict=True))
        ):
            raise PlanError(
                f"{len(active)} active layer sizes for {self.n_layers} layers, or "
                "one exceeds the bytes its layer stores"
            )

    @property
    def per_layer(self) -> tuple[int, ...]:
        """Every layer's weights, in order."""
        return self.each_layer or (self.layer_bytes,) * self.n_layers

    @property
    def active_per_layer(self) -> tuple[int, ...]:
        """What one token's decode step reads of every layer, in order."""
        return self.each_active or self.per_layer

    @property
    def mean_layer_bytes(self) -> float:
        return sum(self.per_layer) / self.n_layers if self.n_layers else 0.0

    @property
    def mean_active_bytes(self) -> float:
        """What one token reads of the mean layer: what its time is scaled by."""
        return sum(self.active_per_layer) / self.n_layers if self.n_layers else 0.0

    def range_bytes(self, start: int, end: int) -> int:
        """Weights of layers [start, end)."""
        if not self.each_layer:
            return (end - start) * self.layer_bytes
        return sum(self.each_layer[start:end])

    def active_range_bytes(self, start: int, end: int) -> int:
        """What one token reads of layers [start, end)."""
        if not self.each_active:
            return self.range_bytes(start, end)
        return sum(self.each_active[start:end])

    @property
    def weight_bytes(self) -> int:
        """Every weight of the model: the layers and the master's part."""
        return self.range_bytes(0, self.n_layers) + self.master_bytes

    @property
    def active_weight_bytes(self) -> int:
        """What one token reads of the model: its layers' active bytes and the
        master's part (the whole embedding, as MoE parameter counts go)."""
        return self.active_range_bytes(0, self.n_layers) + self.master_bytes


def _master_names(config: ModelConfig) -> list[str]:
    """The embedding, final norm and head (a tied head is the embedding)."""
    names = ["model.embed_tokens.weight", *head_tensor_names(config)]
    return list(dict.fromkeys(names))


def expert_names(config: ModelConfig, i: int) -> tuple[list[str], list[str]]:
    """Layer i's tensors that every token reads (attention, norms, router, the
    shared expert, a dense MLP), and its experts' tensors, of which a token
    reads top_k of num_experts (none in a dense layer)."""
    names = layer_names(config, i)
    experts = [n for parts in names.expert_gate_up for n in parts]
    experts += names.expert_down
    routed = set(experts)
    return [n for n in names.all() if n not in routed], experts


def stored_and_active(
    config: ModelConfig, i: int, count: Callable[[str], int]
) -> tuple[int, int]:
    """(stored, active) bytes of layer i, each tensor counted by `count`: every
    tensor; and what one token's decode step reads (batch 1), the tensors
    besides the experts and top_k / num_experts of the experts' bytes (the mean
    expert, top_k times: quantized experts count as stored)."""
    always, experts = expert_names(config, i)
    base = sum(count(n) for n in always)
    if not experts:
        return base, base
    routed = sum(count(n) for n in experts)
    m = config.moe
    return base + routed, base + round(routed * m.top_k / m.num_experts)


def _sizes_of(config, each, master, item) -> ModelSizes:
    """ModelSizes of per-layer (stored, active) pairs, cache and activations in
    `item`-byte elements."""
    stored = tuple(s for s, _ in each)
    active = tuple(a for _, a in each)
    c = config
    return ModelSizes(
        n_layers=c.num_hidden_layers,
        layer_bytes=max(stored, default=0),
        kv_bytes_per_token=2 * c.num_key_value_heads * c.head_dim * item,
        activation_bytes=c.hidden_size * item,
        master_bytes=master,
        each_layer=stored if len(set(stored)) > 1 else (),
        each_active=active if active != stored else (),
    )


def model_sizes(config: ModelConfig, dtype: str) -> ModelSizes:
    """Sizes of `config` with weights, cache and activations in `dtype` (for a
    model without a file, e.g. a synthetic probe; a checkpoint's weights are
    counted by `checkpoint_sizes`). Layers differ where a MoE config makes some
    dense (Qwen's mlp_only_layers, decoder_sparse_step)."""
    item = dtype_of(dtype).itemsize
    each = [
        stored_and_active(config, i, _by_shape(layer_shapes(config, i), item))
        for i in range(config.num_hidden_layers)
    ]
    master = _master_shapes(config)
    return _sizes_of(config, each, sum(map(_by_shape(master, item), master)), item)


def _by_shape(shapes: Mapping[str, tuple[int, ...]], item: int) -> Callable[[str], int]:
    """name -> parameters x `item` bytes, by the shapes the config implies (a
    layer's worked out once: a MoE layer has hundreds of tensors)."""
    return lambda name: item * math.prod(shapes.get(name, ()))


def _master_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {n: expected_shape(config, n) or () for n in _master_names(config)}


def byte_counter(tensors: TensorSource) -> Callable[[str], int]:
    """name -> bytes the tensor takes as stored: the source's own `nbytes(name)`
    where it has one (GGUF, safetensors, mlx-quantized: the bytes in the file);
    else its elements x the bytes per element of the stored form, read once from
    the first tensor of each rank asked for (a source without `nbytes` is
    expected to hold one dtype for its matrices and one for its vectors)."""
    own = getattr(tensors, "nbytes", None)
    if own is not None:
        return lambda name: int(own(name))
    per_element: dict[int, float] = {}

    def count(name: str) -> int:
        shape = tuple(tensors.shape(name))
        if len(shape) not in per_element:
            w = stored_tensor(tensors, name)
            per_element[len(shape)] = w.nbytes / max(math.prod(shape), 1)
        return round(math.prod(shape) * per_element[len(shape)])

    return count


def stored_bytes(tensors: TensorSource, names: Iterable[str]) -> int:
    """Bytes the tensors `names` take as the checkpoint stores them."""
    count = byte_counter(tensors)
    return sum(count(n) for n in names)


def checkpoint_sizes(
    config: ModelConfig, tensors: TensorSource, dtype: str
) -> ModelSizes:
    """Sizes of the checkpoint `tensors`: each layer's weights as stored (a
    quantized layer by its blocks, a mixed file layer by layer; a MoE layer
    with every expert) and what one token reads of it (a MoE layer: top_k of
    its experts' stored bytes, see `stored_and_active`), the KV cache and
    activations in the compute `dtype`. Tensors the source lacks (a split part
    holds only some layers) count as parameters x `dtype`."""
    stored = byte_counter(tensors)
    item = dtype_of(dtype).itemsize

    def counter(shapes: Mapping[str, tuple[int, ...]]) -> Callable[[str], int]:
        missing = _by_shape(shapes, item)
        return lambda n: stored(n) if n in tensors else missing(n)

    each = [
        stored_and_active(config, i, counter(layer_shapes(config, i)))
        for i in range(config.num_hidden_layers)
    ]
    master = _master_shapes(config)
    return _sizes_of(config, each, sum(map(counter(master), master)), item)


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


def experts_line(config: ModelConfig, sizes: ModelSizes) -> str | None:
    """For a mixture of experts, the weights it keeps against those a token
    reads, e.g. "experts: 8, 2 active per token; a token reads 25.76 of 93.41
    GB"; None for a dense model."""
    m, n = config.moe, config.num_hidden_layers
    if m is None:
        return None
    sparse = sum(config.is_moe(i) for i in range(n))
    shared = " and a shared one" if m.shared_intermediate_size else ""
    where = "" if sparse == n else f" in {sparse} of {n} layers"
    unit, scale = ("GB", 1e9) if sizes.weight_bytes >= 1e9 else ("MB", 1e6)
    return (
        f"experts: {m.num_experts}{shared}, {m.top_k} active per token{where}; "
        f"a token reads {sizes.active_weight_bytes / scale:.2f} of "
        f"{sizes.weight_bytes / scale:.2f} {unit}"
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
