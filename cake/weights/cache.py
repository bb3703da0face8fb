"""Weights streamed to a worker, as stored: the manifest a master sends, the
worker's content-addressed cache, and the TensorSource reading it back.

A tensor travels as its raw entries: a float array is one entry, a GGUF block
matrix one uint8 entry, an mlx-quantized matrix three (packed weight, scales,
biases). Each entry is cut into CHUNK-byte chunks, each with its checksum
(xxHash's XXH3-64, ~13 GB/s here against CRC-32's 2.4: the check must not be
what bounds the stream); the entry's digest is the SHA-256 of its length, the
chunk size and those checksums, so the master computes it in one pass over
the bytes (and keeps the checksums, cake/net/stream.py `DigestCache`) and the
worker checks it from the chunks it verified, with no second pass. Quantized
stays quantized: nothing is decoded on either side.

The worker's cache (`cake worker --cache-dir DIR`):

    DIR/packs/<id>.pack         the entries of one stream, page-aligned
    DIR/packs/<id>.index        where each entry lies, and its verified chunks

Entries are named by their content, so a later run with the same layers of
the same weights finds every entry and streams nothing, another assignment of
the same model reuses the entries it shares, and a different checkpoint of the
same shape (a fine-tune) never reads a stale one. An entry half received
resumes where its verified checksums end (WeightCache). Nothing is ever
deleted by cake: remove DIR to reclaim it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import xxhash

from cake.errors import CakeError, ModelError
from cake.weights.packed import Packed, Stored

CHUNK = 4 << 20  # bytes per chunk: a few ms on loopback, one message each
# A chunk goes to its pack in writes of this size. On Linux 6.18's ext4 a
# buffered write of 2 MiB or more, into memory free for a few seconds, cost
# ~0.6 s of system time per 260 MB here (425-478 MB/s; 2 MiB page-cache
# folios, we take it, not checked with a counter); 1 MiB writes of the
# same bytes took 0.06 s (3.5-5.0 GB/s), 512 KiB 2.6-4.2 GB/s, 16 KiB 2.4
# (docs/performance.md, "Weight streaming: 1 MiB writes").
WRITE_PIECE = 1 << 20

_DTYPES = {
    np.dtype(t).name: np.dtype(t)
    for t in (np.float32, np.float16, ml_dtypes.bfloat16, np.uint8, np.uint32,
              np.int8, np.int32, np.int64, np.float64)
}  # fmt: skip


def checksum(data: Any) -> int:
    """A chunk's checksum: XXH3-64 of its bytes."""
    return xxhash.xxh3_64_intdigest(data)


def entry_digest(nbytes: int, chunk: int, sums: list[int]) -> str:
    """The digest of an entry of `nbytes` from its chunks' checksums."""
    body = f"xxh3:{nbytes}:{chunk}:" + ",".join(f"{c:016x}" for c in sums)
    return hashlib.sha256(body.encode()).hexdigest()


def chunk_sums(data: np.ndarray, chunk: int = CHUNK) -> list[int]:
    """The checksum of each `chunk` bytes of `data` (a flat uint8 view)."""
    mv = memoryview(data)
    return [checksum(mv[o : o + chunk]) for o in range(0, len(mv), chunk)]


def raw_entries(w: Stored) -> list[tuple[str, np.ndarray]]:
    """(role, array) entries that store `w`."""
    if not isinstance(w, Packed):
        return [("data", w)]
    if w.is_mlx:
        return [("data", w.data), ("scales", w.scales), ("biases", w.biases)]
    return [("data", w.data)]


def flat_bytes(a: np.ndarray) -> np.ndarray:
    """`a`'s bytes as a flat uint8 array (a view when C-contiguous)."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


@dataclass(frozen=True)
class Entry:
    role: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    digest: str

    def to_json(self) -> dict:
        return {"role": self.role, "dtype": self.dtype, "shape": list(self.shape),
                "nbytes": self.nbytes, "digest": self.digest}  # fmt: skip


@dataclass(frozen=True)
class TensorEntry:
    name: str
    format: str | None  # a Packed format, or None for a plain array
    shape: tuple[int, ...]
    entries: tuple[Entry, ...]


@dataclass(frozen=True)
class Manifest:
    """What a master streams: the model's config (config.json fields), the
    fingerprint of that config, and the tensors of the layers it assigns."""

    config: dict[str, Any]
    model_fingerprint: str
    chunk: int
    tensors: tuple[TensorEntry, ...]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for t in self.tensors for e in t.entries)

    def entries(self) -> Iterator[Entry]:
        for t in self.tensors:
            yield from t.entries

    @cached_property
    def by_digest(self) -> dict[str, Entry]:
        return {e.digest: e for e in self.entries()}

    def to_bytes(self) -> bytes:
        body = {
            "config": self.config,
            "model_fingerprint": self.model_fingerprint,
            "chunk": self.chunk,
            "tensors": [
                {"name": t.name, "format": t.format, "shape": list(t.shape),
                 "entries": [e.to_json() for e in t.entries]}
                for t in self.tensors
            ],
        }  # fmt: skip
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse and check a manifest; CakeError naming what is wrong."""
        try:
            d = json.loads(data)
            tensors = tuple(
                TensorEntry(
                    _str(t["name"]),
                    None if t["format"] is None else _str(t["format"]),
                    _shape(t["shape"]),
                    tuple(entry_from_json(e) for e in t["entries"]),
                )
                for t in d["tensors"]
            )
            chunk = d["chunk"]
            if type(chunk) is not int or not 1 << 16 <= chunk <= 1 << 24:
                raise ValueError(f"chunk size {chunk!r}")
            if not isinstance(d["config"], dict):
                raise ValueError("config is not an object")
            return cls(d["config"], _str(d["model_fingerprint"]), chunk, tensors)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CakeError(f"bad weights manifest: {e}") from None


def _str(v: Any) -> str:
    if type(v) is not str or not 0 < len(v) <= 512:
        raise ValueError(f"bad string {str(v)[:40]!r}")
    return v


def _shape(v: Any) -> tuple[int, ...]:
    if type(v) is not list or not 0 <= len(v) <= 4:
        raise ValueError(f"bad shape {v!r}")
    if not all(type(n) is int and 0 <= n < 2**40 for n in v):
        raise ValueError(f"bad shape {v!r}")
    return tuple(v)


def entry_from_json(e: dict) -> Entry:
    """An Entry from its JSON form, checked (ValueError, KeyError, TypeError)."""
    dtype = e["dtype"]
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}")
    shape = _shape(e["shape"])
    nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
    if e["nbytes"] != nbytes:
        raise ValueError(f"entry of {e['nbytes']!r} bytes for {dtype} {shape}")
    digest = _str(e["digest"])
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"digest {digest[:70]!r}")
    return Entry(_str(e["role"]), dtype, shape, nbytes, digest)


# Entries start at multiples of this in a pack: whole pages, so that one
# entry's mapping never shares a page with another's.
_ALIGN = 4096


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@dataclass
class _Slot:
    """Where an entry lies in a pack, and the checksums of its chunks written
    and verified so far (the entry is held to len(sums) chunks)."""

    pack: _Pack
    offset: int
    nbytes: int
    chunk: int
    sums: list[int]
    done: bool = False

    @property
    def held(self) -> int:
        return (
            self.nbytes if self.done else min(len(self.sums) * self.chunk, self.nbytes)
        )


class _Pack:
    """One pack file and its index, opened for writing when first written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.index = path.with_suffix(".index")
        self.end = 0  # where the next entry placed here starts
        self.fd: int | None = None
        self.log: Any = None

    def open(self) -> None:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                with open(self.index, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    torn = f.read(1) != b"\n"  # a crash mid-line: start a new one
                new = False
            except OSError:
                new = torn = True
            self.log = open(self.index, "a")
            if new:
                self.note(_PACK_HEAD)
            elif torn:
                self.note("")

    def write(self, data: Any, at: int) -> None:
        """All of `data` into the pack at `at`, WRITE_PIECE bytes a write."""
        view = memoryview(data).cast("B")
        for o in range(0, len(view), WRITE_PIECE):
            piece = view[o : o + WRITE_PIECE]
            if os.pwrite(self.fd, piece, at + o) != len(piece):
                raise CakeError(f"short write to {self.path}")

    def note(self, line: str) -> None:
        """Append one line to the index, flushed: after the bytes it claims."""
        self.log.write(line + "\n")
        self.log.flush()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.log.close()
            self.fd = self.log = None


_PACK_HEAD = "cake-pack 1"


class WeightCache:
    """The worker's side: entries by digest, in packs under `root`/packs.

    A stream writes every entry it brings into one pack file, each entry at
    a page-aligned offset, and logs in the pack's index (text, appended, one
    line per event, each after the bytes it claims):

        cake-pack 1
        e DIGEST OFFSET NBYTES CHUNK   the entry is placed at OFFSET
        c DIGEST SUM                   its next chunk is written and verified
        d DIGEST                       all of it, and its digest checks
        x DIGEST                       dropped (its digest failed)

    One file, not a file per entry: written in 4 MiB pieces on this VM's ext4
    (kernel 6.18), 274 MB went in at 504-1154 MB/s (median 629) into one new
    file and 353-505 (median 363) into a new file every 8 MB, 5 alternating
    runs each; the stream's writes were all of the worker's time but its
    checksums. A restarted worker reads the indexes back (a torn last line is
    ignored) and resumes each entry after its last verified chunk, in place.
    Complete entries of the earlier layout (`root`/blobs/DIGEST) are still read.
    Each WeightCache starts its own pack, so two workers on one folder never
    append to the same file (an entry half received by one of them, though,
    is continued by the other: give each worker its own --cache-dir).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        self.packs = self.root / "packs"
        self._slots: dict[str, _Slot] = {}
        self._open: list[_Pack] = []  # packs read or written by this cache
        self._current: _Pack | None = None  # where new entries go
        try:
            self.packs.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CakeError(f"cannot use --cache-dir {self.root}: {e}") from None
        for index in sorted(self.packs.glob("*.index")):
            self._read_index(_Pack(index.with_suffix(".pack")))

    def _read_index(self, pack: _Pack) -> None:
        try:
            lines = pack.index.read_text().split("\n")
            size = pack.path.stat().st_size
        except OSError:
            return
        if lines[0] != _PACK_HEAD:
            return
        self._open.append(pack)
        slots: dict[str, _Slot] = {}
        # A line torn by a crash is the last one then, and the next writer
        # starts on a new line (_Pack.open): a line that does not parse claims
        # nothing, and what follows it is read on.
        for line in lines[1:-1]:  # the last: "" or a torn line
            f = line.split(" ")
            try:
                if f[0] == "e" and len(f) == 5:
                    off, n, chunk = int(f[2]), int(f[3]), int(f[4])
                    if off < 0 or n < 0 or chunk <= 0:
                        continue  # not a line this cache wrote
                    slots[f[1]] = _Slot(pack, off, n, chunk, [])
                    pack.end = max(pack.end, off + n)
                elif f[0] == "c" and len(f) == 3 and len(f[2]) == 16:
                    slots[f[1]].sums.append(int(f[2], 16))
                elif f[0] == "d" and len(f) == 2:
                    slots[f[1]].done = True
                elif f[0] == "x" and len(f) == 2:
                    del slots[f[1]]
            except (KeyError, ValueError):
                continue
        for digest, slot in slots.items():
            # claims past the file's end (a crash between the two files' writes)
            room = max(0, size - slot.offset)
            if slot.held > room:
                slot.done = False
                del slot.sums[room // slot.chunk :]
            old = self._slots.get(digest)
            if old is None or slot.held > old.held:
                self._slots[digest] = slot

    def _blob(self, e: Entry) -> Path | None:
        """A complete entry of the earlier layout, if there is one."""
        b = self.root / "blobs" / e.digest
        try:
            return b if b.stat().st_size == e.nbytes else None
        except OSError:
            return None

    def _slot(self, e: Entry) -> _Slot | None:
        """e's slot, if its pack is still there (a removed pack's entries are
        forgotten: removing the folder's files empties the cache)."""
        slot = self._slots.get(e.digest)
        if slot is not None and slot.nbytes != e.nbytes:
            return None  # a damaged index: never map past what it placed
        if slot is not None and not slot.pack.path.exists():
            self._forget(slot.pack)
            return None
        return slot

    def _forget(self, pack: _Pack) -> None:
        pack.close()
        self._slots = {d: s for d, s in self._slots.items() if s.pack is not pack}
        self._open = [p for p in self._open if p is not pack]
        if self._current is pack:
            self._current = None

    def held(self, e: Entry, chunk: int) -> int:
        """Bytes of `e` held and verified: e.nbytes when complete."""
        slot = self._slot(e)
        if slot is not None and slot.chunk == chunk:
            return slot.held
        return e.nbytes if self._blob(e) is not None else 0

    def _place(self, e: Entry, chunk: int) -> _Slot:
        """A new slot for e at the end of this cache's own pack."""
        pack = self._current
        if pack is None or not pack.path.exists():
            if pack is not None:
                self._forget(pack)
            pack = _Pack(self.packs / f"{os.urandom(8).hex()}.pack")
            pack.open()
            self._open.append(pack)
            self._current = pack
        slot = _Slot(pack, _align(pack.end), e.nbytes, chunk, [])
        pack.end = slot.offset + e.nbytes
        pack.note(f"e {e.digest} {slot.offset} {e.nbytes} {chunk}")
        self._slots[e.digest] = slot
        return slot

    def write(self, e: Entry, chunk: int, offset: int, data: Any, sum_: int) -> int:
        """Write the chunk of `e` at `offset` (where the verified prefix ends)
        after checking its checksum; returns the bytes now held. A completed
        entry is checked against its digest."""
        held = self.held(e, chunk)
        if held == e.nbytes:
            raise ChunkError(f"offset {offset}: this entry is held whole")
        if offset != held:
            raise ChunkError(f"offset {offset}: {held} bytes of this entry are held")
        want = min(chunk, e.nbytes - offset)
        if len(data) != want:
            raise ChunkError(f"chunk of {len(data)} bytes at {offset}, not {want}")
        if checksum(data) != sum_:
            raise ChecksumError(
                f"chunk at {offset} of {e.digest[:12]} fails its checksum"
            )
        slot = self._slot(e)
        if slot is None or slot.chunk != chunk:
            slot = self._place(e, chunk)
        pack = slot.pack
        pack.open()
        pack.write(data, slot.offset + offset)
        pack.note(f"c {e.digest} {sum_:016x}")
        slot.sums.append(sum_)
        if slot.held < e.nbytes:
            return slot.held
        if entry_digest(e.nbytes, chunk, slot.sums) != e.digest:
            pack.note(f"x {e.digest}")
            del self._slots[e.digest]
            raise ChecksumError(f"entry {e.digest[:12]} does not match its digest")
        pack.note(f"d {e.digest}")
        slot.done = True
        return e.nbytes

    def close(self) -> None:
        for p in self._open:
            p.close()

    def array(self, e: Entry) -> np.ndarray:
        """The complete entry, memory-mapped read-only."""
        dt = _DTYPES[e.dtype]
        if e.nbytes == 0:
            return np.zeros(e.shape, dt)
        slot = self._slot(e)
        if slot is not None and slot.done:
            return np.memmap(slot.pack.path, dtype=dt, mode="r", shape=e.shape,
                             offset=slot.offset)  # fmt: skip
        blob = self._blob(e)
        if blob is None:
            raise CakeError(f"the weight cache does not hold entry {e.digest[:12]}")
        return np.memmap(blob, dtype=dt, mode="r", shape=e.shape)


class ChunkError(CakeError):
    """A chunk that does not continue the entry where the worker holds it."""


class ChecksumError(CakeError):
    """A chunk or an entry whose checksum fails: the master sends it again."""


class CachedSource:
    """A TensorSource over the entries of `manifest` in `cache`, all held."""

    def __init__(self, cache: WeightCache, manifest: Manifest) -> None:
        self._cache = cache
        self._tensors = {t.name: t for t in manifest.tensors}
        missing = [
            t.name
            for t in manifest.tensors
            for e in t.entries
            if cache.held(e, manifest.chunk) != e.nbytes
        ]
        if missing:
            raise CakeError(
                f"the weight cache lacks {len(missing)} tensors (e.g. {missing[0]})"
            )

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def _t(self, name: str) -> TensorEntry:
        t = self._tensors.get(name)
        if t is None:
            raise ModelError(f"the streamed weights hold no tensor {name!r}")
        return t

    def shape(self, name: str) -> tuple[int, ...]:
        return self._t(name).shape

    def format(self, name: str) -> str:
        t = self._t(name)
        return t.format or self.stored(name).dtype.name.upper()

    def nbytes(self, name: str) -> int:
        return sum(e.nbytes for e in self._t(name).entries)

    def stored(self, name: str) -> Stored:
        t = self._t(name)
        parts = {e.role: self._cache.array(e) for e in t.entries}
        if t.format is None:
            return parts["data"]
        return Packed(t.format, t.shape, parts["data"], parts.get("scales"),
                      parts.get("biases"))  # fmt: skip

    def get(self, name: str) -> np.ndarray:
        w = self.stored(name)
        return w.dequantize() if isinstance(w, Packed) else np.array(w)


def tensor_entries(
    name: str, w: Stored, known: dict[str, list], chunk: int
) -> tuple[TensorEntry, list[list[int]]]:
    """The TensorEntry of stored `w` and its entries' chunk checksums; `known`
    ("name/role" -> [digest, sums]) gives those computed before and takes the
    new ones."""
    fmt = w.format if isinstance(w, Packed) else None
    entries, all_sums = [], []
    for role, a in raw_entries(w):
        data = flat_bytes(a)
        key = f"{name}/{role}"
        got = known.get(key)
        ok = isinstance(got, list) and len(got) == 2 and isinstance(got[1], list)
        digest, sums = got if ok else (None, None)
        if digest is None or len(sums) != -(-data.nbytes // chunk):
            sums = chunk_sums(data, chunk)
            digest = entry_digest(data.nbytes, chunk, sums)
            known[key] = [digest, sums]
        entries.append(Entry(role, a.dtype.name, tuple(a.shape), data.nbytes, digest))
        all_sums.append(list(sums))
    shape = tuple(int(n) for n in w.shape)
    return TensorEntry(name, fmt, shape, tuple(entries)), all_sums
