"""Probing workers from the master: the link and the device.

The link: round trips of activation-sized `echo` messages (hidden size x 1, 8
and 512 tokens in the model dtype); the round trip of one token is the hop's
latency, and the growth to 512 tokens gives the bandwidth. The device: a `bench`
request, which the worker answers by running `cake.bench.profile_local` on its
own backend (see cake/net/worker_ops.py). `cake bench --workers/--topology` and
`cake run --topology auto` use this. See docs/bench.md and docs/protocol.md.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cake.bench import SYNTHETIC, DeviceProfile
from cake.errors import CakeError, NetworkError
from cake.kv import dtype_of
from cake.net import keys as curve
from cake.net.protocol import BENCH, ECHO, PROTOCOL_VERSION
from cake.net.remote import WorkerClient
from cake.topology import Topology, WorkerSpec, load_topology

ECHO_TOKENS = (1, 8, 512)  # activation sizes probed, in tokens
ECHO_REPEATS = (21, 11, 7)  # round trips timed per size (after 3 untimed)

# progress(device, phase, done, total), as `cake bench` displays it
RemoteProgress = Callable[[str, str, int, int], None]


@dataclass(frozen=True)
class Link:
    """What the echo probe measured between the master and one worker."""

    rtt_s: float  # median round trip of a 1-token activation
    bandwidth_bytes_s: float | None  # None: too few sizes fit the worker's limit
    round_trips: dict[int, float]  # message bytes -> median round trip seconds


def worker_specs(workers: Any) -> list[WorkerSpec]:
    """Workers given as "HOST:PORT,..." text, a list of such strings or of
    WorkerSpecs, a Topology, or the path of a topology file (whose hosts and
    public keys are used; its layers are not)."""
    if isinstance(workers, Topology):
        return list(workers.workers)
    if isinstance(workers, os.PathLike) or (
        isinstance(workers, str) and Path(workers).is_file()
    ):
        return list(load_topology(workers).workers)
    items = workers.split(",") if isinstance(workers, str) else list(workers or ())
    specs = []
    for item in items:
        if isinstance(item, WorkerSpec):
            specs.append(item)
            continue
        text = str(item).strip()
        host, _, port = text.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise CakeError(f"bad worker {text!r} in --workers: use HOST:PORT")
        host = host.strip("[]")
        shown = f"[{host}]" if ":" in host else host
        specs.append(WorkerSpec(text, host, int(port), f"tcp://{shown}:{port}"))
    if not specs:
        raise CakeError("no workers given: use --workers HOST:PORT,...")
    names = [s.name for s in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise CakeError(f"worker {dup!r} is given twice")
    return specs


def open_clients(
    specs: Sequence[WorkerSpec],
    *,
    client_key: str | os.PathLike[str] | None = None,
    connect_timeout: float = 10.0,
    bench_timeout: float = 300.0,
) -> list[WorkerClient]:
    """Connect to every worker (a hello, no checks); close them all on failure."""
    keys = curve.load_secret_key(client_key) if client_key is not None else None
    clients: list[WorkerClient] = []
    try:
        for w in specs:
            if keys is not None and w.public_key is None:
                raise NetworkError(
                    f"worker {w.name!r} has no public_key: with --client-key give "
                    "the workers as a topology file that holds their public keys"
                )
            server_key = curve.load_public_key(w.public_key) if w.public_key else None
            client = WorkerClient(
                w.name,
                w.address,
                None,
                server_key=server_key,
                client_keys=keys,
                retry_timeout=connect_timeout,
                request_timeout=bench_timeout,
            )
            clients.append(client)
            client.connect()
    except BaseException:
        for c in clients:
            c.close()
        raise
    return clients


def measure_link(
    client: WorkerClient,
    hidden: int,
    itemsize: int,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Link:
    """Median round trips of echo messages of hidden x ECHO_TOKENS x itemsize
    bytes (those within the worker's message limit)."""
    limit = int(client.info.get("max_message") or 64 * 1024)
    per_token = hidden * itemsize
    tokens = [t for t in ECHO_TOKENS if t * per_token <= limit] or [1]
    if ECHO_TOKENS[-1] not in tokens and limit // per_token > tokens[-1]:
        tokens.append(limit // per_token)  # the largest message it accepts
    rng = np.random.default_rng(0)
    medians: dict[int, float] = {}
    total = sum(3 + r for r in ECHO_REPEATS[: len(tokens)])
    done = 0
    for t, repeats in zip(tokens, ECHO_REPEATS, strict=False):
        data = rng.integers(0, 256, t * per_token, np.uint8)
        times = []
        for i in range(3 + repeats):
            t0 = time.perf_counter()
            _, frame = client.request({"op": ECHO, "v": PROTOCOL_VERSION}, data)
            dt = time.perf_counter() - t0
            if frame is None or len(frame) != data.nbytes:
                raise NetworkError(f"{client.who} sent a bad echo reply")
            if i >= 3:  # the first ones warm the connection up
                times.append(dt)
            done += 1
            if progress is not None:
                progress(done, total)
        medians[data.nbytes] = statistics.median(times)
    sizes = sorted(medians)
    small, big = sizes[0], sizes[-1]
    bandwidth = None
    if big > small:
        dt = medians[big] - medians[small]
        # The payload crosses twice (there and back).
        bandwidth = 2 * (big - small) / dt if dt > 0 else 2 * big / medians[big]
    return Link(medians[small], bandwidth, medians)


def probe_client(
    client: WorkerClient,
    *,
    synthetic: str | None,
    context: int,
    layers: int = 2,
    dtype: str = "auto",
    short: int = 128,
    chunk: int = 512,
    batch: int = 8,
    repeats: int = 3,
    timeout: float | None = None,
    progress: RemoteProgress | None = None,
    model_config: dict | None = None,
) -> DeviceProfile:
    """The link, then the worker's own probe; the profile is named after the
    client, with its address, round trip and bandwidth. model_config (the
    master's config.json fields): what a worker with no model of its own
    (--cache-dir) probes, with random weights of that shape."""
    name = client.name

    def show(phase: str, done: int, total: int) -> None:
        if progress is not None:
            progress(name, phase, done, total)

    info = client.info
    if synthetic is not None:
        hidden, act_dtype = SYNTHETIC[synthetic][0], "bfloat16"
    else:
        hidden, act_dtype = int(info.get("hidden_size") or 1), info.get("dtype")
    if dtype != "auto":
        act_dtype = dtype
    itemsize = dtype_of(act_dtype or "float32").itemsize
    link = measure_link(
        client, hidden, itemsize, progress=lambda d, t: show("network", d, t)
    )
    header = {
        "op": BENCH,
        "v": PROTOCOL_VERSION,
        "synthetic": synthetic,
        "context": context,
        "layers": layers,
        "dtype": dtype,
        "short": short,
        "chunk": chunk,
        "batch": batch,
        "repeats": repeats,
    }
    if info.get("streams") and synthetic is None and model_config is not None:
        header["config"] = model_config

    def relay(p: dict) -> None:
        done, total = p.get("done"), p.get("total")
        if isinstance(done, int) and isinstance(total, int):
            show(str(p.get("phase", "bench"))[:40], done, total)

    show("bench", 0, 1)
    reply, _ = client.request(header, recover=False, timeout=timeout, on_progress=relay)
    data = reply.get("profile")
    if not isinstance(data, dict):
        raise NetworkError(f"{client.who} sent a bench reply without a profile")
    try:
        profile = DeviceProfile.from_dict(data)
    except (CakeError, TypeError) as e:
        raise NetworkError(f"{client.who} sent a bad profile: {e}") from None
    address = client.address.removeprefix("tcp://")
    return dataclasses.replace(
        profile,
        name=name,
        address=address,
        rtt_s=link.rtt_s,
        bandwidth_bytes_s=link.bandwidth_bytes_s,
    )


def probe_workers(
    specs: Sequence[WorkerSpec],
    *,
    synthetic: str | None = None,
    context: int = 4096,
    layers: int = 2,
    dtype: str = "auto",
    progress: RemoteProgress | None = None,
    short: int = 128,
    chunk: int = 512,
    batch: int = 8,
    repeats: int = 3,
    client_key: str | os.PathLike[str] | None = None,
    bench_timeout: float = 300.0,
    connect_timeout: float = 10.0,
) -> list[DeviceProfile]:
    """Probe each worker in turn: link and device (its own model's layers, or
    the `synthetic` shape). One profile per worker, in the order given.

    client_key: this master's NAME.key_secret (each spec then needs its worker's
    public_key). bench_timeout: seconds one worker's probe may take.
    """
    if context <= short + chunk:
        raise CakeError(
            f"the probe context {context} must exceed {short + chunk} "
            f"(short context {short} plus a prefill chunk of {chunk})"
        )
    clients = open_clients(
        specs,
        client_key=client_key,
        connect_timeout=connect_timeout,
        bench_timeout=bench_timeout,
    )
    try:
        return [
            probe_client(
                c,
                synthetic=synthetic,
                context=context,
                layers=layers,
                dtype=dtype,
                short=short,
                chunk=chunk,
                batch=batch,
                repeats=repeats,
                progress=progress,
            )
            for c in clients
        ]
    finally:
        for c in clients:
            c.close()
