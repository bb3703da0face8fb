"""The master streams a worker the weights of its layers (cake/weights/cache.py).

`stream_weights` sends the manifest (`weights`), learns how much of each entry
the worker already holds, and sends the rest chunk by chunk (`chunk`), one
request at a time: a chunk whose CRC fails there is sent again, a dropped
connection is reopened and the stream goes on from what the worker verified
(a worker restarted on the same --cache-dir keeps its .part files). The
entries' digests are kept per checkpoint file (path, size, mtime) in
`<cache>/digests/`, so a later run reads no weights just to learn that the
worker has them all. See docs/protocol.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cake.errors import NetworkError, WorkerLost
from cake.net.protocol import CHUNK_OP, E_CHECKSUM, PROTOCOL_VERSION, WEIGHTS
from cake.shard import Shard
from cake.weights.cache import CHUNK, Manifest, flat_bytes, raw_entries, tensor_entries
from cake.weights.names import shard_tensor_names
from cake.weights.packed import stored_tensor

if TYPE_CHECKING:
    from cake.config import ModelConfig
    from cake.net.remote import WorkerClient
    from cake.weights.source import TensorSource

RESENDS = 3  # times one chunk is sent again after a failed CRC
RECONNECTS = 5  # times a dropped stream is reopened


def _say(message: str) -> None:
    print(f"cake: {message}", file=sys.stderr, flush=True)


def _source_files(tensors: TensorSource) -> list[Path]:
    """The files behind a checkpoint source (none known: digests not kept)."""
    from cake.weights.gguf import GGUFSource
    from cake.weights.safetensors import SafetensorsSource

    if isinstance(tensors, GGUFSource):
        return [tensors.path]
    if isinstance(tensors, SafetensorsSource):
        return sorted(set(tensors._where.values()))
    return []


class DigestCache:
    """Entry digests of one checkpoint, kept while its files stay the same."""

    def __init__(self, tensors: TensorSource, chunk: int) -> None:
        from cake.kernels.cpu.build import cache_dir

        files = _source_files(tensors)
        self.path: Path | None = None
        self.digests: dict[str, str] = {}
        if not files:
            return
        ident = [chunk] + [
            [str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files
        ]
        key = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]
        self.path = cache_dir() / "digests" / f"{key}.json"
        try:
            self.digests = dict(json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            self.digests = {}

    def save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.digests))
            os.replace(tmp, self.path)
        except OSError:
            pass  # only a speed-up


def build_manifest(
    config: ModelConfig,
    tensors: TensorSource,
    ranges: Sequence[tuple[int, int]],
    chunk: int = CHUNK,
) -> Manifest:
    """The manifest of `ranges`' tensors (digests from the cache, else computed)."""
    from cake.net.protocol import fingerprint
    from cake.split import hf_config_dict

    n = config.num_hidden_layers
    digests = DigestCache(tensors, chunk)
    entries = []
    for a, b in ranges:
        for name in shard_tensor_names(config, Shard(a, b, n)):
            t, _ = tensor_entries(name, stored_tensor(tensors, name), digests.digests,
                                  chunk)  # fmt: skip
            entries.append(t)
    digests.save()
    return Manifest(
        hf_config_dict(config), fingerprint(config, [], tensors), chunk, tuple(entries)
    )


class _Bar:
    """Bytes sent of a total: a rich bar on a terminal, else a line per 10 %."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done, self._next = label, total, 0, 0.1
        self._rich = None
        self._t0 = time.monotonic()
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

            self._rich = Progress(
                *Progress.get_default_columns(), DownloadColumn(),
                TransferSpeedColumn(), console=Console(stderr=True), transient=True,
            )  # fmt: skip
            self._rich.start()
            self._task = self._rich.add_task(label, total=total)

    def advance(self, n: int) -> None:
        self.done += n
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done)
        elif self.total and self.done / self.total >= self._next:
            _say(f"{self.label}: {self.done / 1e6:.1f} of {self.total / 1e6:.1f} MB")
            self._next += 0.1

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()


def stream_weights(
    client: WorkerClient,
    config: ModelConfig,
    tensors: TensorSource,
    ranges: Sequence[tuple[int, int]],
    *,
    chunk: int | None = None,
    corrupt: Callable[[int, bytes], bytes] | None = None,
) -> int:
    """Make the worker hold `ranges`' weights; returns the bytes sent.

    corrupt(k, data): what is sent as the k-th chunk (tests only: a damaged
    chunk must be found and sent again).
    """
    manifest = build_manifest(config, tensors, ranges, chunk or CHUNK)
    body = manifest.to_bytes()
    sent = [0, 0]  # bytes, chunks
    bar = None
    try:
        for attempt in range(RECONNECTS + 1):
            try:
                head = {"op": WEIGHTS, "v": PROTOCOL_VERSION}
                reply, _ = client.request(head, body, recover=False)
                held = reply.get("held")
                if type(held) is not list or len(held) != len(list(manifest.entries())):
                    raise NetworkError(f"{client.who} sent a bad weights reply")
                need = manifest.nbytes - sum(int(h) for h in held)
                if need == 0:
                    if attempt == 0:
                        _say(f"{client.who} holds the weights already (its cache)")
                    return sent[0]
                if bar is None:
                    _say(
                        f"{client.who}: streaming {need / 1e6:.1f} MB of weights "
                        f"({manifest.nbytes / 1e6:.1f} MB in all)"
                    )
                    bar = _Bar(f"weights to {client.name}", need)
                _send_missing(client, tensors, manifest, held, sent, bar, corrupt)
            except WorkerLost as e:
                if attempt == RECONNECTS:
                    raise
                _say(f"{e}; reconnecting to resume the weights")
                client.reopen()
        raise NetworkError(f"{client.who}: the weights did not arrive")
    finally:
        if bar is not None:
            bar.close()
            dt = time.monotonic() - bar._t0
            _say(
                f"{client.who}: {sent[0] / 1e6:.1f} MB of weights sent in "
                f"{sent[1]} chunks, {dt:.1f} s"
            )


def _send_missing(client, tensors, manifest, held, sent, bar, corrupt) -> None:
    i = 0
    for t in manifest.tensors:
        todo = [held[i + k] < e.nbytes for k, e in enumerate(t.entries)]
        if not any(todo):
            i += len(t.entries)
            continue
        arrays = raw_entries(stored_tensor(tensors, t.name))
        for e, (_, a) in zip(t.entries, arrays, strict=True):
            data = memoryview(flat_bytes(a))
            offset = int(held[i])
            while offset < e.nbytes:
                piece = data[offset : offset + manifest.chunk]
                crc = zlib.crc32(piece)
                head = {"op": CHUNK_OP, "v": PROTOCOL_VERSION, "digest": e.digest,
                        "offset": offset, "crc": crc}  # fmt: skip
                for tries in range(RESENDS + 1):
                    frame = piece if corrupt is None else corrupt(sent[1], bytes(piece))
                    sent[1] += 1
                    try:
                        reply, _ = client.request(head, frame, recover=False)
                        break
                    except NetworkError as err:
                        if f"({E_CHECKSUM})" not in str(err) or tries == RESENDS:
                            raise
                        _say(f"{err}: sending that chunk again")
                sent[0] += len(piece)
                new = int(reply.get("held", -1))
                if not offset < new <= e.nbytes:
                    raise NetworkError(f"{client.who} sent a bad chunk reply")
                bar.advance(new - offset)
                offset = new
            i += 1
