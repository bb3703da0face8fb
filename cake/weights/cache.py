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

    DIR/blobs/<digest>          a complete entry, memory-mapped when used
    DIR/blobs/<digest>.part     an entry being received, CHUNK-aligned prefix
    DIR/blobs/<digest>.sums     the checksums verified so far of the .part

Entries are named by their content, so a later run with the same layers of
the same weights finds every entry and streams nothing, another assignment of
the same model reuses the entries it shares, and a different checkpoint of the
same shape (a fine-tune) never reads a stale one. A .part resumes where its
verified checksums end. Nothing is ever deleted by cake: remove DIR to reclaim it.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import xxhash

from cake import heap
from cake.errors import CakeError, ModelError
from cake.weights.packed import Packed, Stored

CHUNK = 4 << 20  # bytes per chunk: a few ms on loopback, one message each

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


# fallocate(2)'s flag that reserves the blocks without changing the file's
# size: a .part's size stays what was written.
_FALLOC_FL_KEEP_SIZE = 1


def _reserve(fd: int, nbytes: int) -> None:
    """Reserve `nbytes` of disk for the .part open as `fd`, its size unchanged
    (Linux; elsewhere, or where the file system refuses, nothing: it is only a
    speed-up). Writing the 16 layers of bench_stream (548 MB in 144 entries,
    4 MiB pwrites, ext4, each run after 4 s of sleep): 227-228 MB/s into 144
    new files, 441-502 MB/s with their blocks reserved first, 566-1131 MB/s
    into one file; WeightCache.write was 207-243 MB/s without this."""
    lib = heap.libc()
    if not sys.platform.startswith("linux") or nbytes == 0 or lib is None:
        return
    try:
        fallocate = lib.fallocate
    except AttributeError:
        return
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate(fd, _FALLOC_FL_KEEP_SIZE, 0, nbytes)  # -1 (not reserved) is fine


class _Part:
    """An entry being received: its .part open for writing, its sums file
    open for appending, and what is verified so far."""

    def __init__(
        self,
        part: Path,
        sums_path: Path,
        held: int,
        sums: list[int],
        chunk: int,
        nbytes: int,
    ):
        self.fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(self.fd, held)
        _reserve(self.fd, nbytes)
        self.sums = sums
        self.held = held
        self.log = open(sums_path, "w")  # rewritten once, then appended to
        self.log.write(f"xxh3 {chunk}\n" + "".join(f"{c:016x}\n" for c in sums))
        self.log.flush()

    def close(self) -> None:
        os.close(self.fd)
        self.log.close()


class WeightCache:
    """The worker's side: entries by digest under `root`/blobs."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        self.blobs = self.root / "blobs"
        self._parts: dict[str, _Part] = {}  # digest -> the entry being received
        try:
            self.blobs.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CakeError(f"cannot use --cache-dir {self.root}: {e}") from None

    def _paths(self, digest: str) -> tuple[Path, Path, Path]:
        b = self.blobs / digest
        return b, b.with_name(digest + ".part"), b.with_name(digest + ".sums")

    def held(self, e: Entry, chunk: int) -> int:
        """Bytes of `e` held and verified: e.nbytes when complete."""
        p = self._parts.get(e.digest)
        return p.held if p is not None else self._held(e, chunk)[0]

    def _held(self, e: Entry, chunk: int) -> tuple[int, list[int]]:
        """(bytes held, the checksums of a .part's verified chunks) on disk. The
        sums file is "xxh3 CHUNK" and one hex checksum per line, each appended
        after its chunk's bytes were written: a torn last line is ignored."""
        blob, part, sums_path = self._paths(e.digest)
        if blob.is_file() and blob.stat().st_size == e.nbytes:
            return e.nbytes, []
        try:
            lines = sums_path.read_text().split("\n")
            size = part.stat().st_size
        except OSError:
            return 0, []
        if lines[0] != f"xxh3 {chunk}":
            return 0, []
        sums = []
        for line in lines[1:]:
            if len(line) != 16:
                break
            try:
                sums.append(int(line, 16))
            except ValueError:
                break
        k = min(len(sums), size // chunk)
        return min(k * chunk, e.nbytes), sums[:k]

    def write(self, e: Entry, chunk: int, offset: int, data: Any, sum_: int) -> int:
        """Write the chunk of `e` at `offset` (where the verified prefix ends)
        after checking its checksum; returns the bytes now held. A completed
        entry is checked against its digest and becomes its blob."""
        blob, part_path, sums_path = self._paths(e.digest)
        p = self._parts.get(e.digest)
        if p is None:
            held, sums = self._held(e, chunk)
            if held == e.nbytes:
                raise ChunkError(f"offset {offset}: this entry is held whole")
            p = _Part(part_path, sums_path, held, sums, chunk, e.nbytes)
            self._parts[e.digest] = p
        if offset != p.held:
            raise ChunkError(f"offset {offset}: {p.held} bytes of this entry are held")
        want = min(chunk, e.nbytes - offset)
        if len(data) != want:
            raise ChunkError(f"chunk of {len(data)} bytes at {offset}, not {want}")
        if checksum(data) != sum_:
            raise ChecksumError(
                f"chunk at {offset} of {e.digest[:12]} fails its checksum"
            )
        if os.pwrite(p.fd, data, offset) != want:
            raise CakeError(f"short write to {part_path}")
        p.log.write(f"{sum_:016x}\n")  # after the bytes: never claims unwritten ones
        p.log.flush()
        p.sums.append(sum_)
        p.held = offset + want
        if p.held < e.nbytes:
            return p.held
        p.close()
        del self._parts[e.digest]
        if entry_digest(e.nbytes, chunk, p.sums) != e.digest:
            part_path.unlink(missing_ok=True)
            sums_path.unlink(missing_ok=True)
            raise ChecksumError(f"entry {e.digest[:12]} does not match its digest")
        os.replace(part_path, blob)
        sums_path.unlink(missing_ok=True)
        return e.nbytes

    def close(self) -> None:
        for p in self._parts.values():
            p.close()
        self._parts.clear()

    def array(self, e: Entry) -> np.ndarray:
        """The complete entry, memory-mapped read-only."""
        blob = self._paths(e.digest)[0]
        dt = _DTYPES[e.dtype]
        if e.nbytes == 0:
            return np.zeros(e.shape, dt)
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
