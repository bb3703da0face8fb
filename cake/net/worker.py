"""The worker: serves forward requests for its layers over a ZeroMQ ROUTER socket.

One thread answers one request at a time; libzmq's I/O thread answers heartbeats
meanwhile (also during a bench or a load, which take seconds to minutes). A
worker started without layers holds none until a master assigns them (`load`,
cake/net/worker_ops.py). KV caches are kept per (connection, master sequence id):
a connection is a master session, and its caches are released when it asks, or
when it disconnects (a socket-monitor event names the connection's file descriptor,
which each received message carries as ZMQ_SRCFD). Any malformed message gets an
error reply and the worker goes on; message sizes are capped by MAXMSGSIZE.
"""

from __future__ import annotations

import ipaddress
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from cake.backends.base import DeviceInfo, StageModel, Step, get_backend
from cake.config import ModelConfig
from cake.errors import (
    CacheFullError,
    CakeError,
    ContextLengthError,
    NetworkError,
    PositionError,
)
from cake.kv import dtype_of
from cake.net import keys as curve
from cake.net.bulk import Listener
from cake.net.progress import ByteBar
from cake.net.protocol import (
    BENCH,
    BULK,
    CHUNK_OP,
    E_CACHE_FULL,
    E_CONTEXT,
    E_INTERNAL,
    E_POSITION,
    ECHO,
    FORWARD,
    HELLO,
    LOAD,
    MAX_HEADER,
    PING,
    PROTOCOL_VERSION,
    RELEASE,
    WEIGHTS,
    ProtocolError,
    array_from_frame,
    decode_header,
    encode_header,
    error_header,
    format_ranges,
    heartbeat,
    int_list,
    payload,
    step_from_header,
)
from cake.net.worker_ops import (
    handle_bench,
    handle_bulk,
    handle_chunk,
    handle_load,
    handle_weights,
    held_bytes,
    load_worker,
)
from cake.weights.cache import CHUNK, Manifest, WeightCache
from cake.weights.source import TensorSource

__all__ = ["DEFAULT_BIND", "WorkerServer", "check_bind", "load_worker"]

DEFAULT_BIND = "tcp://127.0.0.1:10128"
HWM = 64  # queued messages per peer: bounds the memory a flood can take
MAX_FRAMES = 3  # routing id, header, activation
CHUNK_LIMIT = 4 * CHUNK  # the largest weight chunk a streaming worker takes
MAX_STREAMED_HIDDEN = 16384  # a streaming worker's activation frames assume at most


def check_bind(address: str, secure: bool, insecure: bool) -> None:
    """Without Curve keys a worker binds to loopback only, unless `insecure`."""
    if not address.startswith("tcp://"):
        raise NetworkError(f"bind address {address!r} must look like tcp://HOST:PORT")
    host = address[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if secure or loopback:
        return
    if not insecure:
        raise NetworkError(
            f"refusing to bind {address} without keys: anyone who reaches it could "
            "use this worker; pass --secret-key and --allow-keys (see `cake keys`), "
            "or --insecure on a network you trust"
        )
    print(
        f"cake worker: WARNING: serving {address} without encryption or "
        "authentication (--insecure)",
        file=sys.stderr,
    )


@dataclass
class WorkerServer:
    """Answers the protocol's ops for `stages` (one per layer range; none yet when
    the worker waits for a master to assign its layers: `fixed` False)."""

    name: str
    config: ModelConfig | None  # None: a streaming worker before its manifest
    stages: dict[tuple[int, int], StageModel]
    fingerprint: str
    dtype: str
    backend: str
    context: int
    max_sequences: int
    tensors: TensorSource | None = None  # the checkpoint: for bench and load
    label: str = ""  # the model, as a bench profile names it
    fixed: bool = True  # started with --layers: a load may not change them
    limit_context: int = 0  # the most a load may ask for (0: `context`)
    limit_sequences: int = 0  # (0: `max_sequences`)
    model_fingerprint: str = ""  # the config's alone, before any layers
    on_load: Callable[[], None] | None = None  # after a load (the announcement)
    cache: WeightCache | None = None  # --cache-dir: weights streamed by a master
    manifest: Manifest | None = None  # what the last master streams
    manifest_more: bool = False  # parts of it are still to come
    settled: Manifest | None = None  # the last whole manifest (its stages' weights)
    receiving: ByteBar | None = None  # the weights still to come, if any
    bulk: Listener | None = None  # the TCP port the last weights reply offered
    warm: bool = False  # --warm-up: run every step shape once on loading layers
    sock: zmq.Socket | None = None
    # (connection routing id, master seq id) -> our seq id, the one the stages
    # see; what each stage holds of it is that stage's `seqs` (cake.sequence)
    _seqs: dict[tuple[bytes, int], int] = field(default_factory=dict)
    _next_seq: int = 0
    _bad: int = 0
    _auth: Any = None
    _mon: zmq.Socket | None = None
    _fd: dict[bytes, int] = field(default_factory=dict)  # connection -> its socket fd

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return sorted(self.stages)

    @property
    def max_message(self) -> int:
        """The largest frame a legal request can need: a full batch of full contexts
        (for any layers and dtype a load may ask for, if it may)."""
        seqs, ctx = self.max_sequences, self.context
        item = dtype_of(self.dtype).itemsize
        if not self.fixed:  # a load may ask for up to the limits, in float32
            seqs, ctx, item = self.limit_sequences or seqs, self.limit_context or ctx, 4
        if self.cache is not None:  # any model a master may stream
            return max(MAX_HEADER, CHUNK_LIMIT, seqs * ctx * MAX_STREAMED_HIDDEN * 4)
        return max(MAX_HEADER, seqs * ctx * self.config.hidden_size * item)

    @property
    def device(self) -> DeviceInfo:
        if self.stages:
            return self.stages[self.ranges[0]].device
        return get_backend(self.backend).devices()[0]

    def bind(
        self,
        address: str = DEFAULT_BIND,
        *,
        keys: tuple[bytes, bytes] | None = None,
        allow: Path | None = None,
        ctx: zmq.Context | None = None,
    ) -> str:
        """Bind the ROUTER socket; returns the endpoint actually bound."""
        ctx = ctx or zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        sock.maxmsgsize = self.max_message
        sock.rcvhwm = sock.sndhwm = HWM
        sock.linger = 1000  # let the last reply leave on shutdown
        heartbeat(sock)
        if keys is not None:
            self._auth = curve.start_authenticator(ctx, allow)
            curve.make_server(sock, *keys)
        try:
            sock.bind(address)
        except zmq.ZMQError as e:
            sock.close(0)
            self.close()
            raise NetworkError(
                f"cannot bind {address}: {e}; is another worker running there? "
                "choose another --bind"
            ) from None
        self.sock = sock
        self._mon = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        return sock.last_endpoint.decode()

    def serve(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Answer requests until `stop()` is true (checked between requests)."""
        assert self.sock is not None, "bind first"
        self.sock.rcvtimeo = 200  # how often `stop` is looked at when idle
        while not stop():
            try:
                first = self.sock.recv(copy=False)
            except zmq.Again:
                self._drain_disconnects()
                continue
            except zmq.ZMQError as e:
                if e.errno in (zmq.ETERM, zmq.ENOTSOCK):
                    break
                raise
            # Disconnects first: a new connection may reuse a closed one's fd.
            self._drain_disconnects()
            self._serve_one(first)

    def close(self) -> None:
        if self._mon is not None:
            self.sock.disable_monitor()
            self._mon.close(0)
            self._mon = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self.cache is not None:
            self.cache.close()  # entries half received stay in their pack
        if self.receiving is not None:
            self.receiving.close()
        if self.bulk is not None:
            self.bulk.close()
            self.bulk = None

    # --- one message ----------------------------------------------------------

    def _serve_one(self, first: zmq.Frame) -> None:
        sock = self.sock
        frames, more = [first], first.more  # Frame.more: no getsockopt per frame
        while more:
            f = sock.recv(copy=False)
            more = f.more
            if len(frames) <= MAX_FRAMES:  # keep one extra to report the count
                frames.append(f)
        peer = frames[0].bytes
        self._fd[peer] = frames[-1].get(zmq.SRCFD)
        reply = self.handle(peer, frames[1:])
        sock.send_multipart([peer, *reply], copy=False)

    def handle(self, peer: bytes, frames: Sequence[Any]) -> list:
        """The reply frames to one request from `peer` (frames after the routing id)."""
        rid = None
        try:
            if not frames:
                raise ProtocolError("empty message")
            header = decode_header(frames[0])
            rid = header["id"]
            op = header["op"]
            if op == FORWARD:
                return self._forward(peer, header, frames)
            if op == CHUNK_OP:
                return [encode_header(handle_chunk(self, header, frames))]
            if op == WEIGHTS:
                return [encode_header(handle_weights(self, header, frames))]
            if op == BULK and len(frames) == 1:
                return [encode_header(handle_bulk(self, header))]
            if op == ECHO and len(frames) <= 2:  # the payload comes back as it came
                head = {"op": ECHO, "v": PROTOCOL_VERSION, "id": rid}
                return [encode_header(head), *frames[1:]]
            if len(frames) != 1:
                raise ProtocolError(f"a {op!r} request has 1 frame, got {len(frames)}")
            if op == HELLO:
                return [encode_header(self.hello(rid))]
            if op == RELEASE:
                self._release(peer, int_list(header, "seq_ids"))
                return [
                    encode_header({"op": RELEASE, "v": PROTOCOL_VERSION, "id": rid})
                ]
            if op == PING:
                return [encode_header({"op": PING, "v": PROTOCOL_VERSION, "id": rid})]
            if op == BENCH:
                return [encode_header(handle_bench(self, peer, header))]
            if op == LOAD:
                reply = handle_load(self, peer, header)
                if self.on_load is not None:
                    self.on_load()
                return [encode_header(reply)]
            raise ProtocolError(f"unknown op {op[:40]!r}")
        except ProtocolError as e:
            self._log_bad(str(e))
            return [encode_header(error_header(rid, e.code, str(e)))]
        except Exception as e:  # a backend bug must not stop the worker
            traceback.print_exc(file=sys.stderr)
            return [encode_header(error_header(rid, E_INTERNAL, f"worker failed: {e}"))]

    def send_progress(self, peer: bytes, rid: int, progress: dict) -> None:
        """An interim reply to a long request (bench): the master's display."""
        if self.sock is not None:
            head = {"op": BENCH, "v": PROTOCOL_VERSION, "id": rid, "progress": progress}
            self.sock.send_multipart([peer, encode_header(head)])

    def hello(self, rid: int, op: str = HELLO) -> dict:
        """What the worker is (also the reply to a load)."""
        dev, c = self.device, self.config
        return {
            "op": op,
            "v": PROTOCOL_VERSION,
            "id": rid,
            "name": self.name,
            "layers": [list(r) for r in self.ranges],
            "n_layers": c.num_hidden_layers if c else 0,
            "model_type": c.model_type if c else "",
            "hidden_size": c.hidden_size if c else 0,
            "streams": self.cache is not None,  # takes weights from the master
            "fingerprint": self.fingerprint,
            "backend": self.backend,
            "device": {"kind": dev.kind, "name": dev.name},
            "dtype": self.dtype,
            "context": self.context,
            "max_sequences": self.max_sequences,
            "context_limit": self.limit_context or self.context,  # for a load
            "sequences_limit": self.limit_sequences or self.max_sequences,
            "assigned": bool(self.stages),
            "fixed": self.fixed,
            "model_fingerprint": self.model_fingerprint,
            "max_message": self.max_message,
            "weight_bytes": held_bytes(self),  # what its stages really hold
        }

    def _forward(self, peer: bytes, header: dict, frames: Sequence[Any]) -> list:
        if len(frames) != 2:
            raise ProtocolError(f"a forward request has 2 frames, got {len(frames)}")
        layers = header.get("layers")
        key = tuple(layers) if isinstance(layers, list) else None
        if not self.stages:
            raise ProtocolError(
                f"worker {self.name!r} holds no layers yet: a master assigns them "
                "(`cake run --topology auto`, or a topology file)"
            )
        if key not in self.stages:
            raise ProtocolError(
                f"layers {layers!r}: this worker serves {format_ranges(self.ranges)}"
            )
        step = step_from_header(header)
        if header.get("dtype") != self.dtype:
            raise ProtocolError(
                f"activation dtype {header.get('dtype')!r}: this worker runs {self.dtype}"
            )
        want = (step.batch, step.max_len, self.config.hidden_size)
        x = array_from_frame(frames[1], header.get("dtype"), header.get("shape"), want)
        if not x.flags.writeable:  # ZeroMQ frames are; bytes (in tests) are not
            x = x.copy()
        seqs = [(peer, s) for s in step.seq_ids]
        new = [s for s in seqs if s not in self._seqs]
        held = len(self._seqs)
        for s in new:
            self._seqs[s] = self._next_seq
            self._next_seq += 1
        ours = tuple(self._seqs[s] for s in seqs)
        t0 = time.perf_counter()
        stage = self.stages[key]
        compiled = getattr(stage, "compile_s", 0.0)
        try:
            # the stage checks the step against what it holds before it runs
            out = stage.forward(x, Step(ours, step.positions, step.lengths))
        except Exception as e:
            self._release(peer, [s[1] for s in new])
            if isinstance(e, CacheFullError):
                raise ProtocolError(
                    f"worker {self.name!r} is full: it holds {held} sequences, "
                    f"at most {self.max_sequences} (--max-sequences)",
                    E_CACHE_FULL,
                ) from None
            if isinstance(e, ContextLengthError):
                raise ProtocolError(
                    f"{e} (worker {self.name!r}, --context)", E_CONTEXT
                ) from None
            if isinstance(e, PositionError):
                theirs = seqs[ours.index(e.seq_id)][1]
                raise ProtocolError(
                    f"sequence {theirs} holds {e.held} tokens here, not {e.position}",
                    E_POSITION,
                ) from None
            if isinstance(e, CakeError):
                raise ProtocolError(str(e)) from None
            raise
        out = np.asarray(out)
        if out.dtype != x.dtype:
            out = out.astype(x.dtype)
        reply = {
            "op": FORWARD,
            "v": PROTOCOL_VERSION,
            "id": header["id"],
            "dtype": self.dtype,
            "shape": list(out.shape),
            "compute_us": int((time.perf_counter() - t0) * 1e6),  # for hop costs
            # of which the stage compiled a new step shape (JAX): the master's
            # statistics count it as compile time, not decode
            "compile_us": int((getattr(stage, "compile_s", 0.0) - compiled) * 1e6),
        }
        return [encode_header(reply), payload(out)]

    def _release(self, peer: bytes, seq_ids: Sequence[int]) -> None:
        ours = [self._seqs.pop((peer, s)) for s in seq_ids if (peer, s) in self._seqs]
        if not ours:
            return
        for stage in self.stages.values():
            stage.release(ours)

    def _drain_disconnects(self) -> None:
        while self._mon.get(zmq.EVENTS) & zmq.POLLIN:
            fd = recv_monitor_message(self._mon)["value"]
            for peer in [p for p, f in self._fd.items() if f == fd]:
                del self._fd[peer]
                self._release(peer, [s for p, s in self._seqs if p == peer])

    def _log_bad(self, message: str) -> None:
        self._bad += 1
        n = self._bad
        if n <= 10 or n % 1000 == 0:
            print(f"cake worker: bad request #{n}: {message[:200]}", file=sys.stderr)
