"""Build the master's pipeline from a topology: local stages and remote stages.

The master keeps the embedding, the final norm and the head, and runs every
layer no worker holds. Workers are connected and checked (handshake) before any
local weights are loaded, so a wrong topology fails fast.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from cake.config import ModelConfig
from cake.errors import NetworkError
from cake.net import keys as curve
from cake.net.handshake import Expect
from cake.net.protocol import fingerprint, format_ranges
from cake.net.remote import RemoteStage, WorkerClient, _say
from cake.pipeline import Stage, load_local_stage
from cake.shard import Shard
from cake.weights.names import shard_tensor_names
from cake.weights.source import TensorSource


def connect_workers(
    config: ModelConfig,
    tensors: TensorSource,
    topology,
    dtype: str,
    *,
    client_key: str | os.PathLike[str] | None = None,
    retry_timeout: float = 30.0,
    request_timeout: float = 300.0,
    context: int = 0,
    max_sequences: int = 1,
) -> dict[str, WorkerClient]:
    """Connect to every worker of `topology` and check it; name -> client.

    A worker that waits for layers (started without --layers) is sent a `load`
    of its topology layers, with `context` positions (0: as many as it allows).
    """
    keys = curve.load_secret_key(client_key) if client_key is not None else None
    model = fingerprint(config, [], tensors)
    clients: dict[str, WorkerClient] = {}
    try:
        for w in topology.workers:
            if keys is not None and w.public_key is None:
                raise NetworkError(
                    f"worker {w.name!r} has no public_key in the topology: with "
                    "--client-key every worker needs one (its NAME.key, see `cake keys`)"
                )
            expect = Expect(
                fingerprint=fingerprint(config, w.ranges, tensors),
                ranges=tuple(w.ranges),
                dtype=dtype,
                model_type=config.model_type,
                n_layers=config.num_hidden_layers,
                hidden_size=config.hidden_size,
                model_fingerprint=model,
                context=context,
                max_sequences=max_sequences,
            )
            server_key = curve.load_public_key(w.public_key) if w.public_key else None
            client = WorkerClient(
                w.name,
                w.address,
                expect,
                server_key=server_key,
                client_keys=keys,
                retry_timeout=retry_timeout,
                request_timeout=request_timeout,
            )
            client.weights = (config, tensors)  # for a worker with --cache-dir
            clients[w.name] = client
            info = client.connect()
            dev = info.get("device") or {}
            _say(
                f"worker {w.name!r} at {w.address}: layers "
                f"{format_ranges(w.ranges)} on {info.get('backend')} "
                f"({dev.get('kind')}:{dev.get('name')}, {info.get('dtype')})"
            )
            if w.backend and info.get("backend") != w.backend:
                _say(
                    f"note: the topology gives worker {w.name!r} backend "
                    f"{w.backend}, it runs {info.get('backend')}"
                )
    except BaseException:
        for c in clients.values():
            c.close()
        raise
    return clients


def worker_context(clients: dict[str, WorkerClient], ctx: int, explicit: bool) -> int:
    """The pipeline's context: `ctx`, lowered to the smallest worker's unless the
    user asked for `ctx` explicitly (then a smaller worker is an error)."""
    for c in clients.values():
        have = int(c.info.get("context", 0))
        if have < ctx:
            if explicit:
                raise NetworkError(
                    f"{c.who} holds {have} positions but the master was asked for "
                    f"{ctx}: start the worker with --context {ctx} or lower --context"
                )
            ctx = have
    return ctx


def build_stages(
    config: ModelConfig,
    tensors: TensorSource,
    places,
    clients: dict[str, WorkerClient],
    backend: str,
    dtype: str,
    *,
    max_context: int,
    max_sequences: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> list[Stage]:
    """Stages for `places` (topology placements), with the master's embed and head."""
    n = config.num_hidden_layers
    shards: list[tuple[Shard, WorkerClient | None]] = []
    for p in places:
        w = p.worker
        local = w is None
        shard = Shard(
            p.start, p.end, n, embed=local and p.start == 0, head=local and p.end == n
        )
        shards.append((shard, None if local else clients[w.name]))
    if not shards[0][0].embed:
        shards.insert(0, (Shard(0, 0, n, embed=True), None))
    if not shards[-1][0].head:
        shards.append((Shard(n, n, n, head=True), None))
    # One progress count over every local stage's tensors.
    total = sum(len(shard_tensor_names(config, s)) for s, c in shards if c is None)
    stages: list[Stage] = []
    done = 0
    for shard, client in shards:
        if client is not None:
            stages.append(RemoteStage(client, shard))
            continue

        def tick(k: int, _total: int, base: int = done) -> None:
            if progress is not None:
                progress(base + k, total)

        stages.append(
            load_local_stage(
                config,
                shard,
                tensors,
                backend,
                dtype,
                max_context=max_context,
                max_sequences=max_sequences,
                progress=tick,
            )
        )
        done += len(shard_tensor_names(config, shard))
    return stages


def resolve_topology(topology):
    """A Topology given as itself or as the path of its YAML file."""
    from cake.topology import Topology, load_topology

    if isinstance(topology, Topology):
        return topology
    return load_topology(Path(topology))
