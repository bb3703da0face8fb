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
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cake.errors import NetworkError, WorkerLost
from cake.net import bulk
from cake.net.progress import ByteBar
from cake.net.protocol import (
    BULK,
    CHUNK_OP,
    E_CHECKSUM,
    E_DROPPED,
    FLUSH,
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

PART_BYTES = 64 << 20  # a cold master's manifest parts: tensors of this many bytes
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


class _Tensors:
    """The layers' TensorEntries and their entries' chunk sums, in manifest
    order, as far as they are known: from the digest cache at once, the rest
    computed a part at a time (`grow`), each part while the last one's chunks
    are on their way (a cold master reads each tensor once for both)."""

    def __init__(self, config, tensors, ranges, chunk: int) -> None:
        from cake.net.protocol import fingerprint
        from cake.split import hf_config_dict

        n = config.num_hidden_layers
        self.tensors, self.chunk = tensors, chunk
        self.names = [
            t for a, b in ranges for t in shard_tensor_names(config, Shard(a, b, n))
        ]
        self.digests = DigestCache(tensors, chunk)
        self.config = hf_config_dict(config)
        self.fingerprint = fingerprint(config, [], tensors)
        self.entries: list[TensorEntry] = []
        self.sums: list[list[int]] = []  # per entry, flat over the tensors
        self.index: dict[str, int] = {}  # entry digest -> its place in the manifest
        self._read: dict[str, Any] = {}  # tensors read by grow, until sent
        for name in self.names:  # a warm master reads no weights
            known = _known_tensor(self.digests.known, name)
            if known is None:
                break
            self._add(*known)

    @property
    def done(self) -> bool:
        return len(self.entries) == len(self.names)

    def _add(self, t: TensorEntry, sums: list[list[int]]) -> None:
        for e, s in zip(t.entries, sums, strict=True):
            self.index.setdefault(e.digest, len(self.sums))
            self.sums.append(s)
        self.entries.append(t)

    def grow(self, nbytes: float) -> list[TensorEntry]:
        """The next tensors, at least `nbytes` of them (or the rest), read
        and checksummed."""
        new: list[TensorEntry] = []
        got = 0
        while not self.done and (not new or got < nbytes):
            name = self.names[len(self.entries)]
            w = stored_tensor(self.tensors, name)
            t, sums = tensor_entries(name, w, self.digests.known, self.chunk)
            self.digests.known[name] = {"format": t.format, "shape": list(t.shape),
                                        "entries": [e.to_json() for e in t.entries]}  # fmt: skip
            self._add(t, sums)
            self._read[name] = w
            new.append(t)
            got += sum(e.nbytes for e in t.entries)
        if new and self.done:  # every digest known now: keep them for next time
            self.digests.save()
        return new

    def stored(self, name: str):
        """The tensor as stored (the one `grow` read, if it did)."""
        w = self._read.pop(name, None)
        return stored_tensor(self.tensors, name) if w is None else w

    def manifest(self, tensors: Sequence[TensorEntry]) -> Manifest:
        return Manifest(self.config, self.fingerprint, self.chunk, tuple(tensors))


def build_manifest(
    config: ModelConfig,
    tensors: TensorSource,
    ranges: Sequence[tuple[int, int]],
    chunk: int = CHUNK,
) -> tuple[Manifest, list[list[int]]]:
    """The manifest of `ranges`' tensors and each entry's chunk checksums (from
    the digest cache, else computed: one pass over the bytes)."""
    ts = _Tensors(config, tensors, ranges, chunk)
    ts.grow(float("inf"))
    return ts.manifest(ts.entries), ts.sums


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
    `chunk` requests. A master without the digests of the file sends the
    manifest in parts (`more`) as it reads and checksums the tensors, each
    part among the last part's chunks. A damaged chunk (or a dropped
    connection, reopened) ends the pass; the next one goes on from what the
    worker verified. corrupt(k, data): what is sent as the k-th chunk (tests
    only: a damaged chunk must be found and sent again).
    """
    ts = _Tensors(config, tensors, ranges, chunk or CHUNK)
    if not ts.entries:
        ts.grow(PART_BYTES)
    count = {"sent": 0, "chunks": 0, "resends": 0, "drops": 0}
    bar = None
    t0 = time.monotonic()
    try:
        for _ in range(RECONNECTS + RESENDS + 1):
            try:
                manifest, more = ts.manifest(ts.entries), not ts.done
                head = {"op": WEIGHTS, "v": PROTOCOL_VERSION}
                if more:
                    head["more"] = True
                reply, _ = client.request(head, manifest.to_bytes(), recover=False)
                held = _held(client, reply, manifest)
                need = manifest.nbytes - sum(held)
                if need == 0 and not more:
                    if bar is None:
                        _say(f"{client.who} holds the weights already (its cache)")
                    return count["sent"]
                link = None
                if tcp and client.server_key is None:  # never bare beside Curve
                    link = bulk.connect(client.address, reply.get("bulk"))
                if bar is None:
                    _say(f"{client.who}: streaming {_amount(ts, manifest, need)} over "
                         + ("ZeroMQ" if link is None else "a TCP connection"))  # fmt: skip
                    bar = ByteBar(f"weights to {client.name}", need)
                parts: deque[dict[str, Any]] = deque()  # parts sent, unanswered
                items = _items(ts, manifest, held, parts, count, corrupt)

                def took(
                    header: dict, reply: dict, bar: ByteBar = bar, parts=parts
                ) -> None:
                    if header["op"] == WEIGHTS:  # a part: what of it is held
                        part = parts.popleft()
                        part["held"] = _held(client, reply, part["manifest"])
                        bar.grow(part["manifest"].nbytes - sum(part["held"]))
                        return
                    bar.advance(int(reply.get("held", 0)) - header["offset"])

                if link is None:
                    client.pipelined(items, window, took)
                else:
                    _send_bulk(client, link, ts.index, items, window, took)
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


def _held(client: WorkerClient, reply: dict, manifest: Manifest) -> list[int]:
    """A weights reply's `held`, checked against its manifest."""
    held = reply.get("held")
    entries = list(manifest.entries())
    if (
        type(held) is not list
        or len(held) != len(entries)
        or not all(
            type(h) is int and 0 <= h <= e.nbytes
            for h, e in zip(held, entries, strict=True)
        )
    ):
        raise NetworkError(f"{client.who} sent a bad weights reply")
    return held


def _amount(ts: _Tensors, manifest: Manifest, need: int) -> str:
    """What the first pass streams, as the master's line says it."""
    if ts.done:
        return f"{need / 1e6:.1f} MB of weights ({manifest.nbytes / 1e6:.1f} MB in all)"
    size = getattr(ts.tensors, "nbytes", None)
    total = f"{sum(size(n) for n in ts.names) / 1e6:.1f} MB" if size else "the weights"
    return f"{total}, checksummed as they go (no digests of this file yet)"


def _items(ts: _Tensors, manifest: Manifest, held, parts: deque, count, corrupt):
    """The pass's messages: every chunk the worker lacks, in manifest order,
    and, while tensors are still unread, the next part of the manifest before
    the current part's chunks (its answer, `parts`, says what of it to send;
    FLUSH awaits that answer when the chunks in between did not)."""
    cur, base = list(manifest.tensors), 0
    while True:
        new = ts.grow(PART_BYTES)
        part = None
        if new:
            part = {"manifest": ts.manifest(new), "held": None}
            parts.append(part)
            head = {"op": WEIGHTS, "v": PROTOCOL_VERSION, "part": True}
            if not ts.done:
                head["more"] = True
            yield head, part["manifest"].to_bytes()
        yield from _missing(ts, cur, base, held, count, corrupt)
        if part is None:
            return
        if part["held"] is None:
            yield FLUSH
        base += sum(len(t.entries) for t in cur)
        cur, held = new, part["held"]


def _send_bulk(client, link, index: dict, items, window: int, took) -> None:
    """One pass's messages over the worker's TCP port, inside its `bulk` request."""
    conn, token = link
    broke: list[Exception] = []

    def work() -> None:
        try:
            with conn:
                conn.settimeout(client.request_timeout)
                bulk.send(conn, token, items, index, window, took)
        except (OSError, bulk.Broken) as e:  # the worker's answer says why
            broke.append(e)

    head = {"op": BULK, "v": PROTOCOL_VERSION}
    client.request(head, recover=False, while_waiting=work)
    if broke:
        raise bulk.Broken(f"{client.who}: the weight connection broke: {broke[0]}")


def _missing(ts: _Tensors, tensors, base: int, held, count, corrupt) -> Iterator:
    """(header, frame) of every chunk of `tensors` (entries from `base` in the
    manifest; held: theirs) the worker lacks."""
    i, chunk = 0, ts.chunk
    for t in tensors:
        if all(held[i + k] == e.nbytes for k, e in enumerate(t.entries)):
            i += len(t.entries)
            ts.stored(t.name)  # not sent: let go of what grow read
            continue
        arrays = raw_entries(ts.stored(t.name))
        for e, (_, a) in zip(t.entries, arrays, strict=True):
            data = memoryview(flat_bytes(a))
            sums = ts.sums[base + i]
            for offset in range(int(held[i]), e.nbytes, chunk):
                piece = data[offset : offset + chunk]
                head = {"op": CHUNK_OP, "v": PROTOCOL_VERSION, "digest": e.digest,
                        "offset": offset, "sum": sums[offset // chunk]}  # fmt: skip
                if corrupt is not None:
                    piece = corrupt(count["chunks"], bytes(piece))
                count["chunks"] += 1
                count["sent"] += len(piece)
                yield head, piece
            i += 1
