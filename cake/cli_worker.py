"""`cake worker`, `cake keys` and `cake workers`: serve a range of layers; create
CurveZMQ keys; list the workers on the local network.

Without --layers and --name a worker loads no layers: it waits for a master to
assign them (`cake run --topology auto`, or any topology naming its address).
A worker with keys announces itself by mDNS unless --no-announce
(cake/net/discovery.py)."""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from cake.errors import CakeError, NetworkError


@dataclass(frozen=True)
class WorkerOptions:
    model: Path | None
    layers: str | None  # inclusive "A-B", as the user writes it
    name: str | None
    topology: Path | None
    backend: str | None  # None: the topology's, else auto
    bind: str | None  # None: the topology's host:port, else DEFAULT_BIND
    context: int | None
    max_sequences: int
    dtype: str
    secret_key: Path | None
    allow_keys: Path | None
    insecure: bool
    announce: bool = True  # with keys: a DNS-SD service on the local network
    cache_dir: Path | None = None  # no model: the master streams the weights here
    warm_up: bool = False  # every step shape once, on loading layers (cake.warmup)


def worker_command(o: WorkerOptions) -> None:
    from cake.api import default_model_path
    from cake.net import keys as curve
    from cake.net.protocol import format_ranges
    from cake.net.worker import DEFAULT_BIND, check_bind, load_worker
    from cake.net.worker_ops import warm_up
    from cake.shard import parse_layer_range
    from cake.weights.checkpoint import open_checkpoint

    if o.layers is not None and o.name is not None:
        raise CakeError("give either --layers A-B or --name NAME with --topology FILE")
    if o.name is not None and o.topology is None:
        raise CakeError("--name needs --topology FILE")
    spec, ranges = None, None  # None: a master assigns the layers
    if o.cache_dir is not None:
        if o.model is not None or o.layers is not None or o.name is not None:
            raise CakeError(
                "--cache-dir is for a worker without a model: the master assigns "
                "its layers and streams their weights; drop --model, --layers "
                "and --name"
            )
        model, n = None, 0
    else:
        model = o.model or default_model_path()
        config, _ = open_checkpoint(model)
        n = config.num_hidden_layers
    if o.layers is not None:
        ranges = [parse_layer_range(o.layers, n)]
    elif o.name is not None:
        from cake.topology import load_topology, validate_topology

        topo = load_topology(o.topology)
        validate_topology(topo, n)
        spec = topo.worker(o.name)
        ranges = list(spec.ranges)
    backend = o.backend or (spec.backend if spec else None) or "auto"
    bind = o.bind or (spec.address if spec else DEFAULT_BIND)

    if o.allow_keys is not None and o.secret_key is None:
        raise NetworkError("--allow-keys needs the worker's own --secret-key")
    keys = curve.load_secret_key(o.secret_key) if o.secret_key else None
    allow = curve.allowed_keys_folder(o.allow_keys) if o.allow_keys else None
    if spec is not None and spec.public_key is not None:
        if keys is None:
            raise NetworkError(
                f"the topology gives worker {spec.name!r} a public_key: pass its "
                "--secret-key (and --allow-keys)"
            )
        if keys[0].decode() != spec.public_key:
            raise NetworkError(
                f"--secret-key {o.secret_key} does not hold the public_key the "
                f"topology gives worker {spec.name!r}"
            )
    check_bind(bind, secure=keys is not None, insecure=o.insecure)
    if keys is not None and allow is None:
        print(
            "cake worker: note: no --allow-keys: any client key is accepted "
            "(encrypted, not authenticated)",
            file=sys.stderr,
        )

    # announced as this: the key pair's name unless --name says otherwise
    name = o.name or (o.secret_key.name.removesuffix(".key_secret") if keys else "")
    server = load_worker(
        model,
        ranges,
        name=name or "worker",
        backend=backend,
        dtype=o.dtype,
        context=o.context,
        max_sequences=o.max_sequences,
        cache_dir=o.cache_dir,
    )
    server.warm = o.warm_up
    if o.warm_up:
        warm_up(server)  # layers given here; assigned ones warm up as they load
    stopping = []

    def stop(signum: int, _frame: object) -> None:
        stopping.append(signum)  # the request in flight finishes first

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    announcer = None
    try:
        endpoint = server.bind(bind, keys=keys, allow=allow)
        announced = "not announced (no keys)" if keys is None else "not announced"
        if keys is not None and o.announce:
            announcer, announced = _announce(server, keys[0], endpoint)
        dev = server.device
        security = "curve" + (" + allowed keys" if allow else "") if keys else "no keys"
        what = (
            f"layers {format_ranges(server.ranges)}"
            if ranges is not None
            else "no layers yet, a master assigns them"
            + (f" and streams their weights to {o.cache_dir}" if o.cache_dir else "")
        )
        upto = "" if ranges is not None else "up to "
        print(
            f"cake worker: ready on {endpoint}: {what} on {server.backend} "
            f"({dev.kind}:{dev.name}, {server.dtype}), {upto}context "
            f"{server.context}, {upto}max sequences {server.max_sequences}, "
            f"{security}, {announced}",
            file=sys.stderr,
            flush=True,
        )
        server.serve(stop=lambda: bool(stopping))
    finally:
        if announcer is not None:
            announcer.close()  # masters stop seeing it before it stops answering
        server.close()
    print("cake worker: stopped", file=sys.stderr, flush=True)


def _announce(server, public_key: bytes, endpoint: str):
    """(announcer or None, what the ready line says about it)."""
    from cake.net.discovery import Announcer, DiscoveryError, worker_announcement

    about = worker_announcement(server, public_key)
    try:
        announcer = Announcer(about, endpoint)
        announcer.start()
    except DiscoveryError as e:
        print(f"cake worker: note: {e}; masters need its address", file=sys.stderr)
        return None, "not announced"

    def reannounce() -> None:
        announcer.update(worker_announcement(server, public_key))

    server.on_load = reannounce  # its layers and free memory changed
    where = ", ".join(announcer.interfaces or ["every interface"])
    return announcer, (
        f"announced as {announcer.instance!r} (key {about.key_fingerprint}) on {where}"
    )


def keys_command(name: str, folder: Path) -> None:
    from cake.net.discovery import key_fingerprint
    from cake.net.keys import create_keys, load_public_key

    public, secret = create_keys(name, folder)
    key = load_public_key(public).decode()
    print(f"public key (give to the other side): {public}")
    print(f"secret key (keep private):           {secret}")
    print(f"public key: {key}")
    print(f"fingerprint (what `cake workers` shows): {key_fingerprint(key)}")


def workers_command(timeout: float, allow_workers: Path | None, as_json: bool) -> None:
    """Browse for `timeout` seconds; a table of the workers found on stdout."""
    import json
    from dataclasses import asdict

    from rich.console import Console

    from cake.net.discovery import allowed_worker_keys, browse, found_table

    allowed = allowed_worker_keys(allow_workers) if allow_workers else None
    found = browse(timeout)
    if as_json:
        rows = [
            {
                **asdict(w.about),
                "instance": w.instance,
                "address": w.hostport,
                "addresses": list(w.addresses),
                "allowed": None
                if allowed is None
                else w.about.key_fingerprint in allowed,
            }
            for w in found
        ]
        print(json.dumps(rows, indent=1))
        return
    if not found:
        print(f"no workers answered within {timeout:g} s", file=sys.stderr)
        return
    Console().print(found_table(found, allowed))
