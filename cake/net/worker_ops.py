"""The worker's long ops, `bench` and `load`, and loading a worker.

`bench` runs `cake.bench.profile_local` on the worker's own backend (its model's
layers, or a synthetic shape) and answers with the DeviceProfile, sending
progress replies meanwhile; the profile's `loaded_bytes` says how many bytes of
weights the worker's own layers hold (`held_bytes`). `load` gives a worker that
was started without layers the ones a master planned; a worker started with
--layers keeps them.
See docs/protocol.md. The server is a `cake.net.worker.WorkerServer` (not
imported here: it imports this module).
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cake.config import ModelConfig
from cake.errors import CakeError
from cake.kv import DTYPES
from cake.net.progress import ByteBar
from cake.net.protocol import (
    BENCH,
    BULK,
    CHUNK_OP,
    E_ASSIGN,
    E_CHECKSUM,
    E_DROPPED,
    LOAD,
    PROTOCOL_VERSION,
    WEIGHTS,
    ProtocolError,
    fingerprint,
    format_ranges,
    int_field,
)

if TYPE_CHECKING:
    from cake.net.worker import WorkerServer
    from cake.weights.cache import Entry, Manifest
    from cake.weights.source import TensorSource

MAX_BENCH_CONTEXT = 1 << 17  # positions a bench request may ask for
PROBE_MEMORY_FRACTION = 0.5  # of the available memory a probe's layers may take
MAX_RANGES = 64  # layer ranges in one load request
PROGRESS_EVERY_S = 0.2  # interim bench replies at most this often


def _say(message: str) -> None:
    print(f"cake worker: {message}", file=sys.stderr, flush=True)


def handle_bench(server: WorkerServer, peer: bytes, header: dict[str, Any]) -> dict:
    """Probe this worker's device; the reply carries `profile` (a DeviceProfile dict).

    Fields: `synthetic` (a shape name, or null for the worker's own model;
    a worker with no model, --cache-dir, takes the model's `config` instead),
    `context`, `layers`, `dtype` ("auto" or a dtype), and optionally `short`,
    `chunk`, `batch`, `repeats` (cake.bench.profile_local's parameters).
    """
    from cake.bench import SYNTHETIC, profile_local, synthetic_config

    rid = header["id"]
    synthetic = header.get("synthetic")
    if synthetic is not None and synthetic not in SYNTHETIC:
        raise ProtocolError(
            f"'synthetic' must be null or one of {', '.join(SYNTHETIC)}"
        )
    dtype = header.get("dtype", "auto")
    if dtype != "auto" and dtype not in DTYPES:
        raise ProtocolError(f"'dtype' must be auto or one of {', '.join(DTYPES)}")
    kw = dict(
        context=int_field(header, "context", 2, MAX_BENCH_CONTEXT),
        layers=int_field(header, "layers", 1, 8, 2),
        short=int_field(header, "short", 1, MAX_BENCH_CONTEXT, 128),
        chunk=int_field(header, "chunk", 1, MAX_BENCH_CONTEXT, 512),
        batch=int_field(header, "batch", 1, 64, 8),
        repeats=int_field(header, "repeats", 1, 10, 3),
    )
    if synthetic is not None:
        config, tensors, label = (
            synthetic_config(synthetic),
            None,
            f"synthetic {synthetic}",
        )
    elif server.cache is not None:  # no model of its own: the master's shape
        try:
            config = ModelConfig.from_dict(header.get("config"))
        except (CakeError, TypeError, AttributeError) as e:
            raise ProtocolError(
                f"a worker with no model (--cache-dir) probes the shape in "
                f"'config': {e}"
            ) from None
        tensors, label = None, f"{config.model_type} shape, random float weights"
    else:
        config, tensors, label = server.config, server.tensors, server.label
        if tensors is None:
            raise ProtocolError("this worker has no checkpoint to probe: ask synthetic")
    kw["layers"] = layers_that_fit(
        config, dtype, kw["context"], kw["batch"], server.backend, kw["layers"]
    )
    last = [0.0]

    def progress(phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < PROGRESS_EVERY_S:
            return
        last[0] = now
        server.send_progress(peer, rid, {"phase": phase, "done": done, "total": total})

    _say(f"bench of {label} ({kw['layers']} layers, context {kw['context']})")
    try:
        p = profile_local(
            server.backend,
            config,
            tensors,
            dtype=dtype,
            name=server.name,
            label=label,
            progress=progress,
            **kw,
        )
    except CakeError as e:
        raise ProtocolError(f"bench on worker {server.name!r} failed: {e}") from None
    finally:
        gc.collect()  # the probe's stage and caches
    # a field older masters ignore (DeviceProfile.from_dict drops unknown keys)
    profile = {**p.to_dict(), "loaded_bytes": held_bytes(server)}
    return {"op": BENCH, "v": PROTOCOL_VERSION, "id": rid, "profile": profile}


def handle_weights(server: WorkerServer, header: dict[str, Any], frames) -> dict:
    """A master's manifest (frame 1, cake/weights/cache.py) of the layers it
    will assign: the reply's `held` says the bytes of each entry this worker's
    cache holds, in the manifest's order. `more`: parts of it are still to
    come (a master that checksums as it streams, cake/net/stream.py), each a
    `weights` with `part` (its tensors extend the manifest; `held` is theirs)
    or a PART record on the bulk connection. Only a worker started with
    --cache-dir and no model takes one."""
    if server.cache is None:
        raise ProtocolError(
            f"worker {server.name!r} was started with --model: it streams no weights"
        )
    if len(frames) != 2:
        raise ProtocolError(f"a weights request has 2 frames, got {len(frames)}")
    more = header.get("more") is True
    if header.get("part") is True:
        held = weights_part(server, bytes(frames[1]), more)
        return {"op": WEIGHTS, "v": PROTOCOL_VERSION, "id": header["id"], "held": held}
    manifest = _manifest(bytes(frames[1]))
    _settle(server, manifest, not more)
    server.manifest, server.manifest_more = manifest, more
    server.config = ModelConfig.from_dict(manifest.config)
    server.model_fingerprint = manifest.model_fingerprint
    held = [server.cache.held(e, manifest.chunk) for e in manifest.entries()]
    need = manifest.nbytes - sum(held)
    if need or more:
        _say(
            f"receiving {need / 1e6:.1f} MB of weights ({manifest.nbytes / 1e6:.1f} "
            f"MB for {len(manifest.tensors)} tensors"
            + (", more to come" if more else "")
            + f") into {server.cache.root}"
        )
    if server.receiving is not None:
        server.receiving.close()
    server.receiving = (
        ByteBar("weights received", need, "cake worker") if need or more else None
    )
    reply = {"op": WEIGHTS, "v": PROTOCOL_VERSION, "id": header["id"], "held": held}
    if server.bulk is not None:
        server.bulk.close()
        server.bulk = None
    if (need or more) and server._auth is None:  # no Curve keys: may go bare
        from cake.net.bulk import Listener

        try:
            server.bulk = Listener(server.sock.last_endpoint.decode())
            reply["bulk"] = server.bulk.offer()
        except OSError as e:  # no port: the chunks come over ZeroMQ
            _say(f"no TCP port for the weights ({e}): they come over ZeroMQ")
    return reply


def _manifest(body: bytes) -> Manifest:
    from cake.weights.cache import Manifest

    try:
        manifest = Manifest.from_bytes(body)
        ModelConfig.from_dict(manifest.config)
    except CakeError as e:
        raise ProtocolError(f"bad weights manifest: {e}") from None
    return manifest


def _settle(server: WorkerServer, manifest: Manifest, whole: bool) -> None:
    """The weights change (their stages go) unless `manifest` is the last
    whole one, or while parts are to come, the start of it."""
    old = server.settled
    if old is not None:
        was, now = (
            [e.digest for e in old.entries()],
            [e.digest for e in manifest.entries()],
        )
        if (was != now) if whole else (was[: len(now)] != now):
            if server._seqs:  # the same weights again are fine (a reconnection)
                raise ProtocolError(
                    f"worker {server.name!r} is serving sequences of other weights: "
                    "wait for them to end",
                    E_ASSIGN,
                )
            server.stages, server.tensors = {}, None  # other weights: drop them
            server.settled = None
            gc.unfreeze()  # what warm_up froze (their cycles) may go now
            gc.collect()
    if whole:
        server.settled = manifest


def weights_part(server: WorkerServer, body: bytes, more: bool) -> list[int]:
    """A later part of the manifest (`more` parts after it): its tensors
    extend it; what of them this worker holds."""
    from cake.weights.cache import Manifest

    m = server.manifest
    if m is None or not server.manifest_more:
        raise ProtocolError("a weights part comes after a manifest with more to come")
    part = _manifest(body)
    if (part.config, part.model_fingerprint, part.chunk) != (
        m.config, m.model_fingerprint, m.chunk,
    ):  # fmt: skip
        raise ProtocolError("a weights part of another manifest")
    whole = Manifest(m.config, m.model_fingerprint, m.chunk, m.tensors + part.tensors)
    _settle(server, whole, not more)
    server.manifest, server.manifest_more = whole, more
    held = [server.cache.held(e, m.chunk) for e in part.entries()]
    need = part.nbytes - sum(held)
    if need:
        if server.receiving is None:
            server.receiving = ByteBar("weights received", 0, "cake worker")
        server.receiving.grow(need)
    return held


def handle_chunk(server: WorkerServer, header: dict[str, Any], frames) -> dict:
    """One chunk of an entry of the manifest, written to the cache after its
    checksum is checked (`checksum` error otherwise: the master sends it again);
    the reply's `held` is the entry's bytes now held."""
    if server.manifest is None or len(frames) != 2:
        raise ProtocolError("a chunk comes after a weights manifest, in 2 frames")
    e = server.manifest.by_digest.get(header.get("digest"))
    if e is None:
        raise ProtocolError("chunk of an entry the manifest does not list")
    offset = int_field(header, "offset", 0, e.nbytes)
    sum_ = int_field(header, "sum", 0, 2**64 - 1)
    held = store_chunk(server, e, offset, frames[1], sum_)
    return {"op": CHUNK_OP, "v": PROTOCOL_VERSION, "id": header["id"], "held": held}


def store_chunk(server: WorkerServer, e: Entry, offset: int, data, sum_: int) -> int:
    """Check and write one chunk of `e` (a `chunk` request's, or one over the
    bulk connection); the entry's bytes now held. ProtocolError if refused."""
    from cake.weights.cache import ChecksumError

    try:
        held = server.cache.write(e, server.manifest.chunk, offset, data, sum_)
    except ChecksumError as err:
        raise ProtocolError(str(err), E_CHECKSUM) from None
    except CakeError as err:
        raise ProtocolError(str(err)) from None
    except OSError as err:
        raise ProtocolError(f"cannot write the weight cache: {err}", E_ASSIGN) from None
    bar = server.receiving
    if bar is not None:
        bar.advance(held - offset)
        if bar.done >= bar.total:
            bar.close()
            server.receiving = None
    return held


def handle_bulk(server: WorkerServer, header: dict[str, Any]) -> dict:
    """The chunks over the TCP port the last `weights` reply offered
    (cake/net/bulk.py), until the master ends them; the reply's `chunks` says
    how many were stored. A failed sum is a `checksum` error, a connection
    that broke a `dropped` one: the master asks what is held and goes on."""
    from cake.net import bulk

    listener, server.bulk = server.bulk, None  # one stream per offer
    if listener is None or server.manifest is None:
        raise ProtocolError("a bulk request comes after a weights reply offering it")
    entries = list(server.manifest.entries())

    def store(index: int, offset: int, data, sum_: int) -> int:
        if index >= len(entries):
            raise bulk.Broken(f"a chunk of entry {index}, of {len(entries)}")
        return store_chunk(server, entries[index], offset, data, sum_)

    def part(body: bytes, more: bool) -> list[int]:
        held = weights_part(server, body, more)
        entries[:] = server.manifest.entries()
        return held

    try:
        with listener.accept() as conn:
            n = bulk.receive(conn, server.manifest.chunk, store, part)
    except (bulk.Broken, OSError) as e:
        raise ProtocolError(f"the weight connection broke: {e}", E_DROPPED) from None
    finally:
        listener.close()
    return {"op": BULK, "v": PROTOCOL_VERSION, "id": header["id"], "chunks": n}


def held_bytes(server: WorkerServer) -> int:
    """Bytes of weights the worker's loaded stages hold: each stage's own
    `weight_bytes` where its backend reports one, else its tensors' bytes as
    stored in the checkpoint. 0 for a worker that waits for layers."""
    from cake.shard import Shard
    from cake.sizes import stored_bytes
    from cake.weights.names import shard_tensor_names

    total = 0
    for (a, b), stage in server.stages.items():
        n = server.config.num_hidden_layers
        held = getattr(stage, "weight_bytes", None)
        if held is None and server.tensors is not None:
            names = shard_tensor_names(server.config, Shard(a, b, n))
            held = stored_bytes(server.tensors, names)
        total += int(held or 0)
    return total


def layers_that_fit(
    config: ModelConfig, dtype: str, context: int, batch: int, backend: str, want: int
) -> int:
    """`want` probe layers, fewer if they (with `batch` caches of `context`
    positions) would take over half the device's available memory; at least 1."""
    from cake.backends.base import get_backend
    from cake.bench import available_memory
    from cake.sizes import model_sizes

    s = model_sizes(config, "float32" if dtype == "auto" else dtype)
    per_layer = s.layer_bytes + s.kv_bytes_per_token * context * batch
    free = available_memory(get_backend(backend).devices()[0])
    return max(1, min(want, int(PROBE_MEMORY_FRACTION * free // per_layer)))


def _ranges(header: dict[str, Any], n: int) -> list[tuple[int, int]]:
    v = header.get("layers")
    if type(v) is not list or not 0 < len(v) <= MAX_RANGES:
        raise ProtocolError(
            f"'layers' must be a list of 1 to {MAX_RANGES} [a, b] pairs"
        )
    out = []
    for r in v:
        if (
            type(r) is not list
            or len(r) != 2
            or not all(type(i) is int for i in r)
            or not 0 <= r[0] < r[1] <= n
        ):
            raise ProtocolError(f"'layers' needs [a, b] pairs with 0 <= a < b <= {n}")
        out.append((r[0], r[1]))
    out.sort()
    if any(b[0] < a[1] for a, b in zip(out, out[1:], strict=False)):
        raise ProtocolError("'layers' overlap")
    return out


def handle_load(server: WorkerServer, peer: bytes, header: dict[str, Any]) -> dict:
    """Load `layers` ([[a, b], ...], half-open) with `dtype`, `context` and
    `max_sequences`, unless the worker already holds exactly that; the reply is
    the hello after loading. A fixed worker, or one serving another master's
    sequences, refuses (`assign`)."""
    rid = header["id"]
    if server.config is None:
        raise ProtocolError(
            f"worker {server.name!r} has no model yet: the master streams its "
            "weights first (a newer master), or start it with --model",
            E_ASSIGN,
        )
    ranges = _ranges(header, server.config.num_hidden_layers)
    dtype = header.get("dtype")
    if dtype not in DTYPES:
        raise ProtocolError(f"'dtype' must be one of {', '.join(DTYPES)}")
    limit_ctx = server.limit_context or server.context
    limit_seq = server.limit_sequences or server.max_sequences
    context = int_field(header, "context", 1, 2**31)
    max_sequences = int_field(header, "max_sequences", 1, 2**31)
    same = ranges == server.ranges and dtype == server.dtype
    if server.fixed:
        if same and context <= server.context and max_sequences <= server.max_sequences:
            return server.hello(rid, LOAD)
        raise ProtocolError(
            f"worker {server.name!r} was started with layers "
            f"{format_ranges(server.ranges)} ({server.dtype}, context "
            f"{server.context}) and serves only those, not "
            f"{format_ranges(ranges)} ({dtype}, context {context}): restart it "
            "without --layers and --name to let the master assign its layers",
            E_ASSIGN,
        )
    if context > limit_ctx or max_sequences > limit_seq:
        raise ProtocolError(
            f"worker {server.name!r} holds at most {limit_ctx} positions and "
            f"{limit_seq} sequences, not {context} and {max_sequences}: restart it "
            "with a larger --context / --max-sequences, or lower --context",
            E_ASSIGN,
        )
    if same and (context, max_sequences) == (server.context, server.max_sequences):
        return server.hello(rid, LOAD)
    others = {p for p, _ in server._seqs if p != peer}
    if others:
        raise ProtocolError(
            f"worker {server.name!r} serves another master ({len(others)} "
            "connection(s) with sequences): wait for it to finish",
            E_ASSIGN,
        )
    server._release(peer, [s for p, s in list(server._seqs) if p == peer])
    server.stages = {}  # free the old layers before loading the new ones
    gc.unfreeze()  # what warm_up froze (their cycles) may go now
    gc.collect()
    if server.cache is not None:  # the layers the master streamed, mapped
        from cake.weights.cache import CachedSource

        if server.manifest_more:
            raise ProtocolError(
                f"worker {server.name!r}: the weights manifest has parts to come",
                E_ASSIGN,
            )
        try:
            server.tensors = CachedSource(server.cache, server.manifest)
        except CakeError as e:
            raise ProtocolError(f"worker {server.name!r}: {e}", E_ASSIGN) from None
    _say(f"loading layers {format_ranges(ranges)} ({dtype}, context {context})")
    t0 = time.perf_counter()
    try:
        stages = load_stages(
            server.config, server.tensors, ranges, server.backend, dtype,
            context, max_sequences,
        )  # fmt: skip
    except CakeError as e:
        raise ProtocolError(
            f"worker {server.name!r} cannot load: {e}", E_ASSIGN
        ) from None
    server.stages, server.dtype = stages, dtype
    server.context, server.max_sequences = context, max_sequences
    try:
        server.fingerprint = fingerprint(server.config, ranges, server.tensors)
    except CakeError as e:  # a streamed manifest of other layers
        raise ProtocolError(f"worker {server.name!r}: {e}", E_ASSIGN) from None
    dev = server.device
    _say(
        f"serving layers {format_ranges(ranges)} on {server.backend} "
        f"({dev.kind}:{dev.name}, {dtype}), context {context}, max sequences "
        f"{max_sequences}; loaded in {time.perf_counter() - t0:.1f} s"
    )
    if server.warm:  # before the reply: the master's first steps then compile nothing
        warm_up(server)
    return server.hello(rid, LOAD)


def warm_up(server: WorkerServer) -> None:
    """Run every step shape a master may send once on each of the server's
    stages that compiles them (cake.warmup): decode steps of 1..max_sequences
    sequences, prefill chunks of one sequence at each padded width."""
    from cake.pipeline import DEFAULT_PREFILL_CHUNK
    from cake.warmup import freeze_heap, prefill_widths, step_shapes, warm_stage

    t0, n = time.perf_counter(), 0
    for stage in server.stages.values():
        if not getattr(stage, "compiles", False):
            continue
        chunk = getattr(stage, "prefill_chunk", DEFAULT_PREFILL_CHUNK)
        widths = prefill_widths(chunk, server.context)
        shapes = step_shapes(range(1, server.max_sequences + 1), widths)
        warm_stage(stage, shapes, server.config.hidden_size)
        n += len(shapes)
    if n:
        _say(f"warmed up {n} step shapes in {time.perf_counter() - t0:.1f} s")
    freeze_heap()  # until these layers are dropped (gc.unfreeze above)


def load_stages(
    config: ModelConfig,
    tensors: TensorSource,
    ranges: Sequence[tuple[int, int]],
    backend: str,
    dtype: str,
    context: int,
    max_sequences: int,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """One stage per half-open range: (a, b) -> StageModel."""
    from cake.pipeline import load_local_stage
    from cake.shard import Shard

    n = config.num_hidden_layers
    return {
        (a, b): load_local_stage(
            config,
            Shard(a, b, n),
            tensors,
            backend,
            dtype,
            max_context=context,
            max_sequences=max_sequences,
            progress=progress,
        )
        for a, b in ranges
    }


def load_worker(
    model: str | Path | None,
    ranges: Sequence[tuple[int, int]] | None,
    *,
    name: str = "worker",
    backend: str = "auto",
    dtype: str = "auto",
    context: int | None = None,
    max_sequences: int = 4,
    progress: Callable[[int, int], None] | None = None,
    cache_dir: str | Path | None = None,
) -> WorkerServer:
    """Load only `ranges` (half-open) of the model at `model` on `backend`.

    ranges None: load nothing yet and wait for a master's `load`; `context` and
    `max_sequences` are then the most a load may ask for. model None (with
    `cache_dir`, ranges None): no model at all; a master streams the weights
    of the layers it assigns into the cache (cake/weights/cache.py).
    """
    from cake.backends.base import auto_backend
    from cake.net.worker import WorkerServer
    from cake.weights.checkpoint import context_for, open_checkpoint, resolve_dtype

    if backend == "auto":
        backend = auto_backend()
    if model is None:  # the master streams the weights into cache_dir
        from cake.weights.cache import WeightCache
        from cake.weights.checkpoint import DEFAULT_CONTEXT

        ctx = context or DEFAULT_CONTEXT
        return WorkerServer(
            name=name, config=None, stages={}, fingerprint="",
            dtype="float32" if dtype == "auto" else dtype, backend=backend,
            context=ctx, max_sequences=max_sequences, label="streamed weights",
            fixed=False, limit_context=ctx, limit_sequences=max_sequences,
            cache=WeightCache(cache_dir),
        )  # fmt: skip
    config, tensors = open_checkpoint(model)
    dtype = resolve_dtype(dtype, tensors)
    ctx = context_for(config, context)
    stages = {}
    if ranges is not None:
        stages = load_stages(
            config, tensors, ranges, backend, dtype, ctx, max_sequences, progress
        )
    return WorkerServer(
        name=name,
        config=config,
        stages=stages,
        fingerprint=fingerprint(config, list(stages), tensors),
        dtype=dtype,
        backend=backend,
        context=ctx,
        max_sequences=max_sequences,
        tensors=tensors,
        label=Path(model).name,
        fixed=ranges is not None,
        limit_context=ctx,
        limit_sequences=max_sequences,
        model_fingerprint=fingerprint(config, [], tensors),
    )
