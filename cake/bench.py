"""Probe a device: how long one transformer layer takes, and how much memory there is.

`profile_local` loads a stage of a few layers on a backend (of the given model, or
of a synthetic model of a stated shape), feeds it hidden states and times decode
(batch 1 and batch 8) and a prefill chunk, each at a short and a long context.
Times are per layer: the stage's time divided by its layer count. Bytes are
counted as the checkpoint stores them (quantized layers by their blocks), with
what the backend said it held beside them and, for a mixture of experts, what
one token read of them (its top_k experts and the rest). A worker calls the
same function for a remote probe. See docs/bench.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cake.backends.base import DeviceInfo, Step, auto_backend, get_backend
from cake.config import ModelConfig
from cake.errors import CakeError
from cake.kv import DTYPES, dtype_of
from cake.pipeline import load_local_stage
from cake.shard import Shard
from cake.sizes import byte_counter, model_sizes, stored_and_active
from cake.weights.names import layer_shapes, layer_tensor_names
from cake.weights.source import TensorSource

# Named shapes for a synthetic probe: (hidden, intermediate, heads, kv heads,
# head_dim, layers). Vocabulary and norms do not matter: only layers are built.
SYNTHETIC: dict[str, tuple[int, int, int, int, int, int]] = {
    "llama3-8b": (4096, 14336, 32, 8, 128, 32),
    "llama3-70b": (8192, 28672, 64, 8, 128, 80),
    "llama3.2-3b": (3072, 8192, 24, 8, 128, 28),
    "llama3.2-1b": (2048, 8192, 32, 8, 64, 16),
    "smollm2-135m": (576, 1536, 9, 3, 64, 30),
    "tiny": (64, 96, 4, 2, 16, 4),
}
DEFAULT_SYNTHETIC = "llama3-8b"

# progress(phase, done, total): phase is "load" or the measurement under way
Progress = Callable[[str, int, int], None]


def synthetic_config(name: str = DEFAULT_SYNTHETIC) -> ModelConfig:
    """A Llama config of a named shape (see SYNTHETIC), weights in bfloat16."""
    if name not in SYNTHETIC:
        raise CakeError(
            f"unknown synthetic shape {name!r}: use one of {', '.join(SYNTHETIC)}"
        )
    d, inter, heads, kv, hd, layers = SYNTHETIC[name]
    return ModelConfig(
        model_type="llama",
        vocab_size=128256,
        hidden_size=d,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hd,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        torch_dtype="bfloat16",
    )


class SyntheticSource:
    """Random layer weights of `config`, made when asked (a TensorSource).

    Linear weights are uniform with variance 1/fan_in, so hidden states keep
    their scale through the layers; norms are ones. Each tensor is seeded by its
    name, so a probe is repeatable.
    """

    def __init__(self, config: ModelConfig, layers: range, dtype: str) -> None:
        self.config, self.dtype = config, dtype_of(dtype)
        # name -> shape, in checkpoint order (a MoE layer has hundreds)
        self._shapes: dict[str, tuple[int, ...]] = {}
        for i in layers:
            shapes = layer_shapes(config, i)
            self._shapes.update((n, shapes[n]) for n in layer_tensor_names(config, i))

    def keys(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, name: object) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            raise CakeError(f"the synthetic model has no tensor {name}")
        return self._shapes[name]

    def nbytes(self, name: str) -> int:
        """Bytes of the tensor as made: parameters x the dtype."""
        return math.prod(self.shape(name)) * self.dtype.itemsize

    def get(self, name: str) -> np.ndarray:
        shape = self.shape(name)
        if len(shape) == 1:
            return np.ones(shape, self.dtype)
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        bound = np.float32(np.sqrt(3.0 / shape[-1]))
        w = rng.random(shape, dtype=np.float32)  # (out, in) in [0, 1)
        w = (w - np.float32(0.5)) * (2 * bound)
        return w.astype(self.dtype, copy=False)


@dataclass(frozen=True)
class DeviceProfile:
    """What one device did in a probe. Seconds are per layer, as (short, long)
    context pairs; weight bytes are the probed layers' as stored in the
    checkpoint (parameters x dtype for a synthetic model), cache bytes at the
    probed dtype. Decode times are scaled to another model by the bytes a token
    reads (`active_layer_bytes`): for a mixture of experts, every tensor but
    the experts and top_k of them, for a dense model `layer_bytes`."""

    name: str  # "master" or the worker's name
    backend: str
    device_kind: str  # "cpu", "gpu", "tpu", "metal"
    device_name: str
    memory_bytes: int  # available for weights and caches when probed
    model: str  # what was probed: a path or "synthetic llama3-8b"
    dtype: str
    layers_probed: int
    short_context: int  # positions already cached in the "short" measurements
    long_context: int
    prefill_chunk: int  # tokens per prefill call
    decode_batch: int  # sequences per batched decode call
    decode_s: tuple[float, float]  # decode, 1 sequence, 1 token
    decode_batch_s: tuple[float, float]  # decode, decode_batch sequences, 1 token
    prefill_s: tuple[float, float]  # prefill of prefill_chunk tokens, 1 sequence
    layer_bytes: int  # weights of one probed layer, as stored
    kv_bytes_per_1k: int  # K and V of one layer for 1,000 positions
    estimated: tuple[str, ...] = ()  # figures whose long value is estimated
    probe_seconds: float = 0.0  # wall time of the whole probe
    address: str | None = None  # "host:port" of a worker
    rtt_s: float | None = None  # worker round trip (filled by the network probe)
    bandwidth_bytes_s: float | None = None  # master <-> worker, activation sized
    # what the backend's stage held per probed layer (its weight_bytes), if it says
    held_layer_bytes: int | None = None
    loaded_bytes: int | None = None  # weights a worker holds now (its own layers)
    # what one decode token read of a probed layer, as stored, where it is less
    # than layer_bytes (MoE: top_k experts); None: layer_bytes (a dense model,
    # and every profile written before cake counted experts)
    active_layer_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceProfile:
        """Build from `to_dict`'s output; unknown keys are ignored."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
        missing = [n for n in required if n not in d]
        if missing:
            raise CakeError(
                f"device profile {d.get('name', '?')!r} lacks {missing[0]!r}: "
                "write the file with `cake bench --json`"
            )
        kw = {n: d[n] for n in fields if n in d}
        kw["estimated"] = tuple(kw.get("estimated", ()))
        try:
            for n in ("decode_s", "decode_batch_s", "prefill_s"):
                a, b = kw[n]
                kw[n] = (float(a), float(b))
        except (TypeError, ValueError):
            raise CakeError(
                f"device profile {d['name']!r}: {n} must be a pair of seconds"
            ) from None
        return cls(**kw)


def save_profiles(path: str | os.PathLike[str], profiles: list[DeviceProfile]) -> None:
    """Write profiles as JSON (what `cake plan --profile` reads)."""
    data = {"cake_bench": 1, "devices": [p.to_dict() for p in profiles]}
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def load_profiles(path: str | os.PathLike[str]) -> list[DeviceProfile]:
    """Read a `cake bench --json` file (or a bare list of profiles)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CakeError(f"profile file {os.fspath(path)!r} not found") from None
    except (OSError, ValueError) as e:
        raise CakeError(f"cannot read profile file {os.fspath(path)!r}: {e}") from None
    devices = data.get("devices") if isinstance(data, dict) else data
    if not isinstance(devices, list) or not all(isinstance(d, dict) for d in devices):
        raise CakeError(
            f"{os.fspath(path)} is not a profile file: expected "
            '{"devices": [...]} as written by `cake bench --json`'
        )
    return [DeviceProfile.from_dict(d) for d in devices]


def available_memory(device: DeviceInfo) -> int:
    """Bytes free for a stage: the accelerator's memory, or the host's available RAM."""
    if device.kind != "cpu" and device.memory_bytes:
        return int(device.memory_bytes)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if device.memory_bytes:
        return int(device.memory_bytes)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _probe_layers(config: ModelConfig, tensors: TensorSource, k: int) -> range:
    """The first run of up to k consecutive layers whose tensors are all present
    (a split folder holds only some layers)."""
    have = [
        i
        for i in range(config.num_hidden_layers)
        if all(n in tensors for n in layer_tensor_names(config, i))
    ]
    if not have:
        raise CakeError("the checkpoint holds no complete transformer layer to probe")
    start = end = have[0]
    while end in have and end - start < k:
        end += 1
    return range(start, end)


def _model_dtype(dtype: str, config: ModelConfig, tensors, first: int) -> str:
    if dtype != "auto":
        dtype_of(dtype)  # a clear error for an unknown name
        return dtype
    if tensors is None:
        return config.torch_dtype if config.torch_dtype in DTYPES else "float32"
    name = tensors.get(f"model.layers.{first}.self_attn.o_proj.weight").dtype.name
    return name if name in DTYPES else "float32"


def profile_local(
    backend: str,
    config: ModelConfig | None,
    tensors: TensorSource | None,
    *,
    context: int = 4096,
    layers: int = 2,
    dtype: str = "auto",
    name: str = "master",
    label: str | None = None,
    short: int = 128,
    chunk: int = 512,
    batch: int = 8,
    repeats: int = 3,
    fill_budget: float = 30.0,
    progress: Progress | None = None,
) -> DeviceProfile:
    """Probe `backend` here with `layers` layers of the model (`tensors` None: a
    synthetic model of `config`'s shape, default `synthetic_config()`).

    "Short" measurements run with `short` positions cached; "long" ones end at
    `context` (decode at context - 1, the prefill chunk at context - chunk).
    Each figure is the median of up to `repeats` timed calls after one untimed
    call (compilation), divided by the number of layers. Batched decode at the
    long context needs `batch` full caches: if filling them would take longer
    than `fill_budget` seconds it is estimated, and named in `estimated`.
    """
    t_start = time.perf_counter()
    if context <= short + chunk:
        raise CakeError(
            f"the probe context {context} must exceed {short + chunk} "
            f"(short context {short} plus a prefill chunk of {chunk})"
        )
    if not 1 <= layers <= 8 or batch < 1 or repeats < 1:
        raise CakeError("probe with 1 to 8 layers, batch >= 1 and repeats >= 1")
    config = config or synthetic_config()
    if tensors is None:
        span = range(0, min(layers, config.num_hidden_layers))
    else:
        span = _probe_layers(config, tensors, layers)
    dtype = _model_dtype(dtype, config, tensors, span.start)
    if tensors is None:
        tensors = SyntheticSource(config, span, dtype)
        label = label or f"synthetic (hidden {config.hidden_size})"
    backend = auto_backend() if backend == "auto" else backend
    device = get_backend(backend).devices()[0]
    memory = available_memory(device)  # before the probe allocates anything

    k = len(span)
    end = context - chunk  # the long prefill chunk starts here
    n_fill = -(-(end - short) // chunk)  # chunks from `short` up to `end`
    # calls: first fill, 3 short series, seq 0's fill, prefill long, the other
    # sequences' fill (if measured), 2 long decode series; a series is <= 1+repeats
    series = 1 + repeats
    total = 1 + 3 * series + n_fill + series + (batch - 1) * (n_fill + 1) + 2 * series
    done = [0]

    def tick(phase: str, calls: int = 1) -> None:
        done[0] += calls
        if progress is not None:
            progress(phase, done[0], total)

    tick("load", 0)
    shard = Shard(span.start, span.stop, config.num_hidden_layers)
    stage = load_local_stage(
        config, shard, tensors, backend, dtype, max_context=context, max_sequences=batch
    )
    held = getattr(stage, "weight_bytes", None)
    rng = np.random.default_rng(0)
    dt = dtype_of(dtype)

    def hidden(b: int, n: int) -> np.ndarray:  # (b, n, D) in the model dtype
        return rng.standard_normal((b, n, config.hidden_size), np.float32).astype(dt)

    seqs = tuple(range(batch))
    x1, xb, xc = hidden(1, 1), hidden(batch, 1), hidden(1, chunk)

    def call(phase: str, x: np.ndarray, step: Step) -> float:
        t0 = time.perf_counter()
        stage.forward(x, step)
        tick(phase)
        return time.perf_counter() - t0

    def measure(phase: str, x: np.ndarray, step: Step) -> float:
        """Per layer: one untimed call (compiles), then the median of up to
        `repeats` calls; a call over a second is timed once (noise is small)."""
        call(phase, x, step)
        times = [call(phase, x, step)]
        while len(times) < repeats and times[0] < 1.0:
            times.append(call(phase, x, step))
        tick(phase, series - 1 - len(times))  # the calls skipped
        return statistics.median(times) / k

    def decode(pos: int) -> tuple[Step, Step]:
        return Step((0,), (pos,), (1,)), Step(seqs, (pos,) * batch, (1,) * batch)

    def fill(s: int) -> float:  # sequence s's cache up to `end`
        return sum(
            call(
                "fill",
                xc[:, : min(chunk, end - pos)],
                Step((s,), (pos,), (min(chunk, end - pos),)),
            )
            for pos in range(short, end, chunk)
        )

    estimated: list[str] = []
    try:
        call("fill", hidden(batch, short), Step(seqs, (0,) * batch, (short,) * batch))
        one, many = decode(short)
        d_short = measure("decode short", x1, one)
        b_short = measure(f"decode x{batch} short", xb, many)
        p_short = measure("prefill short", xc, Step((0,), (short,), (chunk,)))
        seconds = fill(0)
        p_long = measure("prefill long", xc, Step((0,), (end,), (chunk,)))
        one, many = decode(context - 1)
        d_long = measure("decode long", x1, one)
        # Batched decode at the long context needs every sequence's cache full:
        # measured when that is cheap, else estimated (each sequence adds its
        # own attention over the longer cache to the short batched figure).
        if (batch - 1) * (seconds + p_long * k) <= fill_budget:
            for s in seqs[1:]:
                fill(s)
                call("fill", xc, Step((s,), (end,), (chunk,)))
            b_long = measure(f"decode x{batch} long", xb, many)
        else:
            b_long = b_short + batch * max(d_long - d_short, 0.0)
            estimated.append("decode_batch_s")
            tick("estimated", total - done[0])
    finally:
        stage.release(seqs)
    sizes = model_sizes(config, dtype)
    # as stored (a synthetic source: parameters x dtype, as it holds them), and
    # what a decode token read of them: the probe's times go with the latter
    count = byte_counter(tensors)
    both = [stored_and_active(config, i, count) for i in span]
    layer_bytes = round(sum(b for b, _ in both) / k)
    active = round(sum(a for _, a in both) / k)
    kind = stage.device.kind
    dev_name = stage.device.name
    if kind == "cpu":
        dev_name = f"{dev_name} ({_cpu_name()}, {os.cpu_count()} cores)"
    return DeviceProfile(
        name=name,
        backend=backend,
        device_kind=kind,
        device_name=dev_name,
        memory_bytes=memory,
        model=label or config.model_type,
        dtype=dtype,
        layers_probed=k,
        short_context=short,
        long_context=context,
        prefill_chunk=chunk,
        decode_batch=batch,
        decode_s=(d_short, d_long),
        decode_batch_s=(b_short, b_long),
        prefill_s=(p_short, p_long),
        layer_bytes=layer_bytes,
        kv_bytes_per_1k=sizes.kv_bytes_per_token * 1000,
        estimated=tuple(estimated),
        probe_seconds=time.perf_counter() - t_start,
        held_layer_bytes=None if held is None else round(held / k),
        active_layer_bytes=active if active != layer_bytes else None,
    )
