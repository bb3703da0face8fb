"""The master streams a worker the weights of its layers (cake/weights/cache.py).

`stream_weights` sends the manifest (`weights`), learns how much of each entry
the worker already holds, and sends the rest chunk by chunk, a few in flight
(over the TCP port a worker without keys offers, cake/net/bulk.py, else as
`chunk` requests): after a chunk whose checksum fails there, or a dropped connection
(reopened), it asks again what the worker holds and goes on from there (a
worker restarted on the same --cache-dir keeps what it verified). The entries'
digests and chunk checksums are kept per checkpoint file (path, size, mtime)
in `<cache>/digests/`, so a later run reads no weights just to learn that the
worker has them all, nor to send them. See docs/protocol.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cake.errors import NetworkError, WorkerLost
from cake.net import bulk
from cake.net.progress import ByteBar
from cake.net.protocol import (
    BULK,
    CHUNK_OP,
    E_CHECKSUM,
    E_DROPPED,
    PROTOCOL_VERSION,
    WEIGHTS,
)
from cake.paths import cache_dir
from cake.shard import Shard
from cake.weights.cache import (
    CHUNK,
    Manifest,
    TensorEntry,
    entry_from_json,
    flat_bytes,
    raw_entries,
    tensor_entries,
)
from cake.weights.names import shard_tensor_names
from cake.weights.packed import stored_tensor

if TYPE_CHECKING:
    from cake.config import ModelConfig
    from cake.net.remote import WorkerClient
    from cake.weights.source import TensorSource

RESENDS = 8  # passes begun again after a damaged chunk
RECONNECTS = 5  # times a dropped stream is reopened
WINDOW = 16  # chunks in flight (bench_stream: 1 -> 4 -> 16: 0.23x -> 0.36x -> 0.52x)


def _say(message: str) -> None:
    print(f"cake: {message}", file=sys.stderr, flush=True)


class DigestCache:
    """Entry digests and chunk checksums of one checkpoint, kept while its
    files stay the same ("name/role" -> [digest, checksums])."""

    def __init__(self, tensors: TensorSource, chunk: int) -> None:
        # the files behind the source (a source that names none: not kept)
        files = tensors.files() if hasattr(tensors, "files") else []
        self.path: Path | None = None
        self.known: dict[str, list] = {}
        if not files:
            return
        ident = ["xxh3", chunk] + [
            [str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files
        ]
        key = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]
        self.path = cache_dir() / "digests" / f"{key}.json"
        try:
            self.known = dict(json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            self.known = {}

    def save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.known))
            os.replace(tmp, self.path)
        except OSError:
            pass  # only a speed-up


def build_manifest(
    config: ModelConfig,
    tensors: TensorSource,
    ranges: Sequence[tuple[int, int]],
    chunk: int = CHUNK,
) -> tuple[Manifest, list[list[int]]]:
    """The manifest of `ranges`' tensors and each entry's chunk checksums (from
    the digest cache, else computed: one pass over the bytes)."""
    from cake.net.protocol import fingerprint
    from cake.split import hf_config_dict

    n = config.num_hidden_layers
    digests = DigestCache(tensors, chunk)
    entries, sums = [], []
    for a, b in ranges:
        for name in shard_tensor_names(config, Shard(a, b, n)):
            known = _known_tensor(digests.known, name)
            if known is None:  # read it once: its bytes give the digests
                w = stored_tensor(tensors, name)
                known = tensor_entries(name, w, digests.known, chunk)
                t = known[0]
                digests.known[name] = {"format": t.format, "shape": list(t.shape),
                                       "entries": [e.to_json() for e in t.entries]}  # fmt: skip
            entries.append(known[0])
            sums += known[1]
    digests.save()
    config_dict = hf_config_dict(config)
    m = Manifest(config_dict, fingerprint(config, [], tensors), chunk, tuple(entries))
    return m, sums


def _known_tensor(known: dict, name: str):
    """(TensorEntry, entry sums) of `name` from the digest cache, or None: a
    warm run builds its manifest without reading (or un-permuting) a tensor."""
    meta = known.get(name)
    if not isinstance(meta, dict):
        return None
    try:
        entries = tuple(entry_from_json(e) for e in meta["entries"])
        sums = [known[f"{name}/{e.role}"][1] for e in entries]
        if any(known[f"{name}/{e.role}"][0] != e.digest for e in entries):
            return None
        t = TensorEntry(name, meta["format"], tuple(meta["shape"]), entries)
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    return t, sums


def stream_weights(
    client: WorkerClient,
    config: ModelConfig,
    tensors: TensorSource,
    ranges: Sequence[tuple[int, int]],
    *,
    chunk: int | None = None,
    window: int = WINDOW,
    corrupt: Callable[[int, bytes], bytes] | None = None,
    tcp: bool = True,
) -> int:
    """Make the worker hold `ranges`' weights; returns the bytes sent (chunks
    sent again after a damaged one or a drop included).

    Each pass sends the manifest, learns what the worker holds, and sends the
    rest with `window` chunks in flight: over the TCP port the worker offers
    (cake/net/bulk.py: one without Curve keys; tcp=False: never), else as
    `chunk` requests. A damaged chunk (or a dropped connection, reopened)
    ends the pass; the next one goes on from what the worker verified.
    corrupt(k, data): what is sent as the k-th chunk (tests only: a damaged
    chunk must be found and sent again).
    """
    manifest, sums = build_manifest(config, tensors, ranges, chunk or CHUNK)
    body = manifest.to_bytes()
    n_entries = len(sums)
    count = {"bytes": 0, "sent": 0, "chunks": 0, "resends": 0, "drops": 0}
    bar = None
    t0 = time.monotonic()
    try:
        for _ in range(RECONNECTS + RESENDS + 1):
            try:
                head = {"op": WEIGHTS, "v": PROTOCOL_VERSION}
                reply, _ = client.request(head, body, recover=False)
                held = reply.get("held")
                if type(held) is not list or len(held) != n_entries:
                    raise NetworkError(f"{client.who} sent a bad weights reply")
                need = manifest.nbytes - sum(int(h) for h in held)
                if need == 0:
                    if bar is None:
                        _say(f"{client.who} holds the weights already (its cache)")
                    return count["sent"]
                link = None
                if tcp and client.server_key is None:  # never bare beside Curve
                    link = bulk.connect(client.address, reply.get("bulk"))
                if bar is None:
                    _say(
                        f"{client.who}: streaming {need / 1e6:.1f} MB of weights "
                        f"({manifest.nbytes / 1e6:.1f} MB in all) over "
                        + ("ZeroMQ" if link is None else "a TCP connection")
                    )
                    bar = ByteBar(f"weights to {client.name}", need)
                chunks = _missing(tensors, manifest, sums, held, count, corrupt)

                def took(header: dict, reply: dict, bar: ByteBar = bar) -> None:
                    n = int(reply.get("held", 0)) - header["offset"]
                    count["bytes"] += n
                    bar.advance(n)

                if link is None:
                    client.pipelined(chunks, window, took)
                else:
                    _send_bulk(client, link, manifest, chunks, window, took)
            except WorkerLost as e:
                _say(f"{e}; reconnecting to resume the weights")
                client.reopen()
            except NetworkError as e:
                broke = isinstance(e, bulk.Broken) or f"({E_DROPPED})" in str(e)
                if broke and count["drops"] < RECONNECTS:
                    count["drops"] += 1
                    _say(f"{e}; resuming the weights")
                    continue
                if f"({E_CHECKSUM})" not in str(e) or count["resends"] == RESENDS:
                    raise
                count["resends"] += 1
                _say(f"{e}: sending from there again")
        raise NetworkError(f"{client.who}: the weights did not arrive")
    finally:
        if bar is not None:
            bar.close()
            dt = time.monotonic() - t0
            _say(
                f"{client.who}: {count['sent'] / 1e6:.1f} MB of weights sent in "
                f"{count['chunks']} chunks, {dt:.1f} s"
            )


def _send_bulk(client, link, manifest: Manifest, chunks, window: int, took) -> None:
    """One pass's chunks over the worker's TCP port, inside its `bulk` request."""
    conn, token = link
    index = {e.digest: i for i, e in enumerate(manifest.entries())}
    broke: list[Exception] = []

    def work() -> None:
        try:
            with conn:
                conn.settimeout(client.request_timeout)
                bulk.send(conn, token, chunks, index, window, took)
        except (OSError, bulk.Broken) as e:  # the worker's answer says why
            broke.append(e)

    head = {"op": BULK, "v": PROTOCOL_VERSION}
    client.request(head, recover=False, while_waiting=work)
    if broke:
        raise bulk.Broken(f"{client.who}: the weight connection broke: {broke[0]}")


def _missing(tensors, manifest: Manifest, sums, held, count, corrupt) -> Iterator:
    """(header, frame) of every chunk the worker lacks, in manifest order."""
    i = 0
    for t in manifest.tensors:
        if all(held[i + k] == e.nbytes for k, e in enumerate(t.entries)):
            i += len(t.entries)
            continue
        arrays = raw_entries(stored_tensor(tensors, t.name))
        for e, (_, a) in zip(t.entries, arrays, strict=True):
            data = memoryview(flat_bytes(a))
            for offset in range(int(held[i]), e.nbytes, manifest.chunk):
                piece = data[offset : offset + manifest.chunk]
                head = {"op": CHUNK_OP, "v": PROTOCOL_VERSION, "digest": e.digest,
                        "offset": offset, "sum": sums[i][offset // manifest.chunk]}  # fmt: skip
                if corrupt is not None:
                    piece = corrupt(count["chunks"], bytes(piece))
                count["chunks"] += 1
                count["sent"] += len(piece)
                yield head, piece
            i += 1
