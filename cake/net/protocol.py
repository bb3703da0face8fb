"""The wire format between the master and its workers (see docs/protocol.md).

Every message is ZeroMQ multipart: frame 0 is a small JSON header (at most
MAX_HEADER bytes), and a forward request or reply adds frame 1, the activation's
raw bytes in the model dtype (C order; bfloat16 as its 2-byte bits). Nothing is
pickled, and the activation is sent and received without copies of our own.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import zmq

from cake.backends.base import Step
from cake.config import ModelConfig
from cake.errors import NetworkError
from cake.kv import DTYPES
from cake.shard import Shard
from cake.weights.names import shard_tensor_names
from cake.weights.source import TensorSource

PROTOCOL_VERSION = 1
MAX_HEADER = 64 * 1024  # bytes of frame 0
MAX_IDS = 4096  # entries in seq_ids / positions / lengths of one request

# ops a master sends; a worker answers with the same op, or with "error"
HELLO, FORWARD, RELEASE, PING, ERROR = "hello", "forward", "release", "ping", "error"
ECHO, BENCH, LOAD = "echo", "bench", "load"  # network probe, device probe, assign
# weight streaming (cake/net/stream.py); bulk: the chunks over TCP (cake/net/bulk.py)
WEIGHTS, CHUNK_OP, BULK = "weights", "chunk", "bulk"
OPS = (HELLO, FORWARD, RELEASE, PING, ECHO, BENCH, LOAD, WEIGHTS, CHUNK_OP, BULK)

# In a stream of pipelined requests (WorkerClient.pipelined, cake/net/bulk.py's
# send): await every reply in flight before the next request.
FLUSH = object()

# error codes a worker sends back
E_BAD_REQUEST = "bad_request"  # malformed message: the master has a bug or is hostile
E_VERSION = "version"  # protocol versions differ
E_CACHE_FULL = "cache_full"  # the worker holds --max-sequences sequences
E_CONTEXT = "context"  # a sequence would pass the worker's --context
E_POSITION = "position"  # the worker's cache does not hold what the step assumes
E_INTERNAL = "internal"  # the backend failed
E_ASSIGN = "assign"  # a load the worker refuses: fixed layers, or another master's
E_CHECKSUM = "checksum"  # a streamed chunk arrived damaged: send it again
E_DROPPED = "dropped"  # the bulk connection of a stream broke: go on from what is held


class ProtocolError(NetworkError):
    """A message that breaks the protocol; `code` is the error code to send back."""

    def __init__(self, message: str, code: str = E_BAD_REQUEST) -> None:
        super().__init__(message)
        self.code = code


_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_DECODE = json.JSONDecoder().decode


def encode_header(header: dict[str, Any]) -> bytes:
    """The header as compact JSON bytes (ASCII; NaN and friends are refused)."""
    return _ENCODE(header).encode()


def decode_header(frame: Any) -> dict[str, Any]:
    """Parse and check the common fields of frame 0: op, v and id.

    Raises ProtocolError for an oversized, non-JSON or incomplete header.
    """
    if len(frame) > MAX_HEADER:
        raise ProtocolError(f"header of {len(frame)} bytes exceeds {MAX_HEADER}")
    data = frame if isinstance(frame, bytes) else bytes(frame)
    try:
        header = _DECODE(data.decode())
    except (ValueError, RecursionError):
        raise ProtocolError("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    op, rid = header.get("op"), header.get("id")
    if not isinstance(op, str):
        raise ProtocolError("header has no 'op'")
    if not _is_int(rid):
        raise ProtocolError("header has no integer 'id'")
    if header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {header.get('v')!r}, this side speaks "
            f"{PROTOCOL_VERSION}: run the same cake version on both",
            E_VERSION,
        )
    return header


def error_header(rid: int | None, code: str, message: str) -> dict[str, Any]:
    return {"op": ERROR, "v": PROTOCOL_VERSION, "id": rid, "code": code,
            "message": message[:2000]}  # fmt: skip


def _is_int(v: Any) -> bool:
    return type(v) is int  # not bool, not float


def int_list(header: dict[str, Any], key: str, lo: int = 0, hi: int = 2**62) -> list:
    """header[key] as a non-empty list of ints in [lo, hi), else ProtocolError."""
    v = header.get(key)
    if type(v) is not list or not 0 < len(v) <= MAX_IDS:
        raise ProtocolError(f"'{key}' must be a list of 1 to {MAX_IDS} integers")
    for i in v:
        if type(i) is not int or not lo <= i < hi:
            raise ProtocolError(f"'{key}' must hold integers in [{lo}, {hi})")
    return v


def int_field(
    header: dict[str, Any], key: str, lo: int, hi: int, default: int | None = None
) -> int:
    """header[key] as an int in [lo, hi] (`default` if absent), else ProtocolError."""
    v = header.get(key, default)
    if not _is_int(v) or not lo <= v <= hi:
        raise ProtocolError(f"'{key}' must be an integer in [{lo}, {hi}]")
    return v


# --- activations --------------------------------------------------------------


def forward_header(rid: int, layers: tuple[int, int], step: Step, x: np.ndarray):
    """Frame 0 of a forward request for hidden `x` (B, L, D) over `layers`."""
    return {
        "op": FORWARD,
        "v": PROTOCOL_VERSION,
        "id": rid,
        "layers": list(layers),
        "seq_ids": list(step.seq_ids),
        "positions": list(step.positions),
        "lengths": list(step.lengths),
        "dtype": x.dtype.name,
        "shape": list(x.shape),
    }


def step_from_header(header: dict[str, Any]) -> Step:
    seq = int_list(header, "seq_ids")
    pos = int_list(header, "positions")
    lengths = int_list(header, "lengths", lo=1)
    try:
        return Step(tuple(seq), tuple(pos), tuple(lengths))
    except ValueError as e:
        raise ProtocolError(f"bad step: {e}") from None


def payload(x: np.ndarray) -> np.ndarray:
    """The bytes of `x` as a flat uint8 view (a copy only if `x` is not C-contiguous).

    Sent with copy=False: ZeroMQ keeps a reference until the bytes are on the wire.
    pyzmq refuses ml_dtypes' buffer format, so every dtype travels as uint8.
    """
    return np.ascontiguousarray(x).reshape(-1).view(np.uint8)


def array_from_frame(
    frame: Any, dtype: Any, shape: Any, want: Sequence[int] | None = None
) -> np.ndarray:
    """View a received frame as an array (no copy), checking dtype, shape and size.

    `want`: the expected shape, if known. The frame's memory is owned by ZeroMQ's
    message and stays alive as the array's base; the array is writable.
    """
    dt = DTYPES.get(dtype) if type(dtype) is str else None
    if dt is None:
        raise ProtocolError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if (
        type(shape) is not list
        or not 1 <= len(shape) <= 4
        or not all(type(n) is int and 0 <= n < 2**31 for n in shape)
    ):
        raise ProtocolError(f"bad shape {shape!r}")
    if want is not None and tuple(shape) != tuple(want):
        raise ProtocolError(f"shape {tuple(shape)} does not match {tuple(want)}")
    size = len(frame)  # bytes, or a zmq.Frame: its length in bytes
    need = math.prod(shape) * dt.itemsize
    if size != need:
        raise ProtocolError(
            f"activation frame has {size} bytes, {dtype} {tuple(shape)} needs {need}"
        )
    return np.frombuffer(frame, dtype=dt).reshape(shape)


# --- model fingerprint ----------------------------------------------------------

# Config fields that change no layer's numbers: a worker need not agree on them.
_NOT_FINGERPRINTED = ("bos_token_id", "eos_token_id", "torch_dtype")


def fingerprint(
    config: ModelConfig, ranges: Sequence[tuple[int, int]], tensors: TensorSource
) -> str:
    """sha256 over the config and the names and shapes of the layers' tensors.

    Both sides compute it from their own checkpoint: equal fingerprints mean the
    same architecture and the same layer tensors (by name and shape, not values).
    """
    cfg = {k: v for k, v in config.to_dict().items() if k not in _NOT_FINGERPRINTED}
    n = config.num_hidden_layers
    names = []
    for a, b in sorted(ranges):
        names += shard_tensor_names(config, Shard(a, b, n))
    body = {"config": cfg, "tensors": [[t, list(tensors.shape(t))] for t in names]}
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, default=str).encode()
    ).hexdigest()


def format_ranges(ranges: Sequence[Sequence[int]]) -> str:
    """Half-open ranges as the user writes them: [(0, 3), (5, 6)] -> '0-2, 5'."""
    out = []
    for a, b in ranges:
        out.append(f"{a}" if b - a == 1 else f"{a}-{b - 1}")
    return ", ".join(out) or "none"


HEARTBEAT_IVL_MS = 500  # ZMTP PINGs, answered by libzmq's I/O thread
HEARTBEAT_TIMEOUT_MS = 2000  # a silent peer is disconnected after this


def heartbeat(sock: zmq.Socket) -> None:
    sock.heartbeat_ivl = HEARTBEAT_IVL_MS
    sock.heartbeat_timeout = HEARTBEAT_TIMEOUT_MS
    sock.heartbeat_ttl = 2 * HEARTBEAT_TIMEOUT_MS
