"""The master's side: one DEALER socket per worker, and RemoteStage over it.

A WorkerClient connects, checks the worker with a hello (protocol version, model
fingerprint, layers, dtype; a worker waiting for layers is first sent a `load`,
cake/net/handshake.py), and sends one request at a time. A socket monitor
reports disconnects and failed Curve handshakes; ZMTP heartbeats find a peer that
went silent. When a worker is lost, the client says so on stderr and waits up to
`retry_timeout` seconds for it to come back at the same address; if it does, the
client raises StageReset so that the caller replays its sequences (the new
worker's caches are empty), otherwise a NetworkError naming the worker.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from cake.backends.base import DeviceInfo, Step
from cake.errors import CacheFullError, ContextLengthError, NetworkError, WorkerLost
from cake.kv import DTYPES
from cake.net import keys as curve
from cake.net.handshake import Expect, check_hello, ensure_layers
from cake.net.protocol import (
    E_CACHE_FULL,
    E_CONTEXT,
    E_POSITION,
    ERROR,
    FLUSH,
    HELLO,
    PROTOCOL_VERSION,
    RELEASE,
    ProtocolError,
    array_from_frame,
    decode_header,
    encode_header,
    forward_header,
    heartbeat,
    payload,
)
from cake.pipeline import StageReset
from cake.shard import Shard

RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 500
WAIT_MS = 100  # while waiting for a reply, look at the monitor this often
HANDSHAKE_FAILURES = 3  # failed ZMTP handshakes in a row that mean wrong keys
_EV_FAILED = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL


def _say(message: str) -> None:
    print(f"cake: {message}", file=sys.stderr, flush=True)


class WorkerClient:
    """A connection to one worker; `request` sends one message and awaits its reply."""

    def __init__(
        self,
        name: str,
        address: str,
        expect: Expect | None,
        *,
        server_key: bytes | None = None,
        client_keys: tuple[bytes, bytes] | None = None,
        retry_timeout: float = 30.0,
        request_timeout: float = 300.0,
        ctx: zmq.Context | None = None,
    ) -> None:
        self.name, self.address, self.expect = name, address, expect
        self.server_key, self.client_keys = server_key, client_keys
        self.retry_timeout, self.request_timeout = retry_timeout, request_timeout
        self.ctx = ctx or zmq.Context.instance()
        self.info: dict[str, Any] = {}
        # (config, tensors) to stream to a worker without a model (cake/net/stream.py)
        self.weights: tuple[Any, Any] | None = None
        self._sock: zmq.Socket | None = None
        self._mon: zmq.Socket | None = None
        self._next_id = 0
        self._dropped = False  # the connection dropped since the last hello
        self._secured = False  # a ZMTP (Curve) handshake has succeeded
        self._failed = 0  # failed ZMTP handshakes on this socket

    @property
    def who(self) -> str:
        return f"worker {self.name!r} at {self.address}"

    def connect(self) -> dict[str, Any]:
        """Connect and hello, waiting up to retry_timeout for the worker to be up.
        With `expect` None nothing is checked (a probe of any worker)."""
        self._open()
        deadline = time.monotonic() + self.retry_timeout
        self.info = self._handshake(deadline, announce=True)
        return self.info

    def reopen(self) -> dict[str, Any]:
        """A new connection and hello (no load, no checks), waiting up to
        retry_timeout for the worker: after a WorkerLost, to go on where it was."""
        self._open()
        self.info = self._hello(time.monotonic() + self.retry_timeout, announce=True)
        return self.info

    def close(self) -> None:
        if self._sock is not None:
            self._sock.disable_monitor()
            self._mon.close(0)
            self._sock.close(0)
            self._sock = self._mon = None

    def request(
        self,
        header: dict[str, Any],
        data: Any = None,
        *,
        recover: bool = True,
        timeout: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        while_waiting: Callable[[], None] | None = None,
    ) -> tuple[dict[str, Any], Any]:
        """Send `header` (+ `data` frame); return the reply header and its frame.

        recover=False: a lost worker raises NetworkError at once (no waiting).
        timeout: seconds for this request (default request_timeout), counted
        from the end of while_waiting() (called once the request is sent: the
        work that the worker answers, e.g. cake/net/bulk.py's stream).
        on_progress: called with the `progress` of interim replies (bench).
        """
        rid = self._send(header, data, recover)
        if while_waiting is not None:
            while_waiting()
        limit = self.request_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            reply = self._recv()
            if reply is None:  # nothing for WAIT_MS: look at the connection
                self._check_waiting(deadline, limit, recover)
                continue
            h = self._decode(reply[0])
            if h["id"] != rid:
                continue  # a late reply to an abandoned request
            if h["op"] == ERROR:
                self._raise_error(h, recover)
            if "progress" in h and h["op"] == header["op"]:
                if on_progress is not None and isinstance(h["progress"], dict):
                    on_progress(h["progress"])
                continue  # an interim reply; the answer follows
            return h, (reply[1] if len(reply) > 1 else None)

    def pipelined(
        self,
        messages: Iterable[tuple[dict[str, Any], Any]],
        window: int,
        on_reply: Callable[[dict[str, Any], dict[str, Any]], None],
    ) -> None:
        """Send (header, frame) messages with up to `window` awaiting replies;
        on_reply(header, reply) for each answer that is not an error (a FLUSH
        among the messages: every reply before the next message). The first
        error stops the sending: the replies in flight are awaited (later errors
        dropped), then it raises as `request(recover=False)` would."""
        sent: dict[int, dict[str, Any]] = {}  # id -> header, in sending order
        error: dict[str, Any] | None = None
        it = iter(messages)
        more, flushing = True, False
        deadline = time.monotonic() + self.request_timeout
        while True:
            while more and error is None and not flushing and len(sent) < window:
                try:
                    item = next(it)
                except StopIteration:
                    more = False
                    break
                if item is FLUSH:
                    flushing = True
                    break
                header, data = item
                sent[self._send(header, data, False)] = header
            if not sent:
                if flushing and error is None:
                    flushing = False
                    continue
                break
            reply = self._recv()
            if reply is None:
                self._check_waiting(deadline, self.request_timeout, False)
                continue
            h = self._decode(reply[0])
            header = sent.pop(h["id"], None)
            if header is None:
                continue  # a late reply to an abandoned request
            deadline = time.monotonic() + self.request_timeout
            if h["op"] == ERROR:
                error = error or h
            else:
                on_reply(header, h)
        if error is not None:
            self._raise_error(error, False)

    def _send(self, header: dict[str, Any], data: Any, recover: bool) -> int:
        """Send one request on a live connection; its new id."""
        if self._sock is None:
            self._lost("it is not connected", recover)
        if self._events_pending():
            self._drain_events()
        if self._dropped:
            self._lost("the connection dropped", recover)
        rid = header["id"] = self._new_id()
        head = encode_header(header)
        try:
            self._sock.send_multipart(
                [head] if data is None else [head, data], copy=False
            )
        except zmq.Again:
            self._lost("it takes no messages", recover)
        return rid

    def _check_waiting(self, deadline: float, limit: float, recover: bool) -> None:
        """After WAIT_MS without a reply: a dropped connection or a deadline
        passed is a lost worker."""
        self._drain_events()
        if self._dropped:
            self._lost("the connection dropped", recover)
        if time.monotonic() > deadline:
            self._lost(f"no answer within {limit:g} s", recover)

    def _recv(self) -> list | None:
        """One message's frames, or None after WAIT_MS without one."""
        try:
            frames = [self._sock.recv(copy=False)]
        except zmq.Again:
            return None
        while frames[-1].more:  # Frame.more: no getsockopt per frame
            frames.append(self._sock.recv(copy=False))
        return frames

    def _events_pending(self) -> bool:
        return bool(self._mon.get(zmq.EVENTS) & zmq.POLLIN)

    # --- connection -----------------------------------------------------------

    def _open(self) -> None:
        self.close()
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.rcvtimeo = WAIT_MS
        # A DEALER with no live connection blocks in send (seen after a refused
        # Curve handshake): never wait there, the callers retry or report.
        sock.sndtimeo = WAIT_MS
        sock.reconnect_ivl = RECONNECT_IVL_MS
        sock.reconnect_ivl_max = RECONNECT_IVL_MAX_MS
        heartbeat(sock)
        if self.server_key is not None:
            curve.make_client(sock, self.server_key, self.client_keys)
        self._mon = sock.get_monitor_socket()
        sock.connect(self.address)
        self._sock, self._dropped, self._secured = sock, False, False
        self._failed = 0

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _drain_events(self) -> bool:
        """Read the monitor; True if a ZMTP handshake succeeded. Raises on a key
        the worker refuses or a Curve handshake that fails."""
        ok = False
        while self._events_pending():
            ev = recv_monitor_message(self._mon)["event"]
            if ev == zmq.EVENT_DISCONNECTED:
                self._dropped = True
            elif ev == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                ok = self._secured = True
                self._failed = 0
            elif ev == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.close()
                raise NetworkError(
                    f"{self.who} refused this master's key: put the master's public "
                    "key file (NAME.key) in the worker's --allow-keys folder and "
                    "pass the master's NAME.key_secret as --client-key"
                )
            elif ev & _EV_FAILED:
                # Once may be chance (a TCP connection to itself while the port
                # is free); a key mismatch fails every reconnection.
                self._failed += 1
                if self._failed < HANDSHAKE_FAILURES:
                    continue
                self.close()
                why = (
                    "the worker's public_key in the topology may be wrong, or the "
                    "worker runs without --secret-key"
                    if self.server_key is not None
                    else "the worker requires keys: set its public_key in the "
                    "topology and pass --client-key"
                )
                raise NetworkError(
                    f"the secure handshake with {self.who} failed: {why}"
                )
        return ok

    def _hello(self, deadline: float, announce: bool = False) -> dict[str, Any]:
        sent: set[int] = set()

        def send() -> bool:
            """Send a hello; False when no connection takes it yet."""
            rid = self._new_id()
            fp = self.expect.fingerprint if self.expect else None
            msg = {"op": HELLO, "v": PROTOCOL_VERSION, "id": rid, "fingerprint": fp}
            try:
                self._sock.send(encode_header(msg))
            except zmq.Again:
                return False
            sent.add(rid)
            return True

        pending = not send()
        said = False
        while True:
            now = time.monotonic()
            if now >= deadline:
                self.close()
                raise NetworkError(self._no_hello_reason())
            if announce and not said and now + self.retry_timeout - deadline > 2:
                _say(f"waiting for {self.who} (up to {self.retry_timeout:g} s)")
                said = True
            reply = self._recv()
            if self._drain_events() and self._dropped:
                # A new connection after a drop: the hello may have been lost with it.
                self._dropped = False
                pending = True
            if pending:
                pending = not send()
            if reply is not None:
                h = self._decode(reply[0])
                if h["id"] in sent:
                    if h["op"] == ERROR:
                        self.close()
                        raise NetworkError(
                            f"{self.who} refused the hello: {h.get('message')}"
                        )
                    self._dropped = False
                    return h

    def _handshake(self, deadline: float, announce: bool = False) -> dict[str, Any]:
        """Hello, load the expected layers if the worker waits for some, check."""
        h = ensure_layers(self, self._hello(deadline, announce))
        check_hello(self, h)
        return h

    def _no_hello_reason(self) -> str:
        if self.server_key is not None and not self._secured:
            return (
                f"no secure handshake with {self.who}: it is not running, or the "
                "worker's public_key in the topology is wrong"
            )
        if not self._secured:
            return f"cannot reach {self.who}: is `cake worker` running there?"
        return f"{self.who} accepted the connection but did not answer the hello"

    def _decode(self, frame: Any) -> dict[str, Any]:
        try:
            return decode_header(frame)
        except ProtocolError as e:
            raise NetworkError(f"{self.who} sent a bad reply: {e}") from None

    # --- failures -------------------------------------------------------------

    def _lost(self, reason: str, recover: bool) -> None:
        """Wait for the worker to come back, then raise StageReset (or NetworkError)."""
        self.close()
        if not recover:
            raise WorkerLost(f"lost {self.who}: {reason}")
        t = self.retry_timeout
        _say(f"lost {self.who} ({reason}); waiting up to {t:g} s for it to come back")
        self._open()
        try:
            self.info = self._handshake(time.monotonic() + t)
        except NetworkError as e:
            raise NetworkError(
                f"lost {self.who}: it did not come back within {t:g} s "
                f"(--retry-timeout): {e}"
            ) from None
        _say(f"{self.who} is back; replaying to rebuild its cache")
        raise StageReset(f"{self.who} was restarted and lost its caches")

    def _raise_error(self, h: dict[str, Any], recover: bool) -> None:
        code, msg = h.get("code"), f"{self.who}: {h.get('message')}"
        if code == E_CACHE_FULL:
            raise CacheFullError(msg)
        if code == E_CONTEXT:
            raise ContextLengthError(msg)
        if code == E_POSITION and recover:
            # Its caches do not hold what we sent before: it restarted unseen.
            self._drain_events()
            self._lost("it lost its caches", recover)
        raise NetworkError(f"{msg} ({code})")


class RemoteStage:
    """Layers [shard.start, shard.end) run by a worker; the Stage protocol."""

    def __init__(self, client: WorkerClient, shard: Shard) -> None:
        self.client, self.shard = client, shard
        info = client.info
        self.dtype = info["dtype"]
        dev = info.get("device") or {}
        self.device = DeviceInfo(
            str(dev.get("kind", "?")), f"{client.name}:{dev.get('name', '?')}"
        )
        self.backend = str(info.get("backend", "?"))
        self._dt = DTYPES[self.dtype]
        self._layers = (shard.start, shard.end)
        self.compiles = self.backend == "jax"  # each new step shape, on the worker
        # seconds the worker's stage spent compiling new step shapes, as its
        # replies say (Pipeline.compile_s: the run's statistics)
        self.compile_s = 0.0

    def forward(self, x: np.ndarray, step: Step) -> np.ndarray:
        """x (B, L, D) hidden -> (B, L, D) hidden, one round trip."""
        if x.dtype != self._dt:
            x = x.astype(self._dt)
        header = forward_header(0, self._layers, step, x)
        reply, frame = self.client.request(header, payload(x))
        want = (step.batch, step.max_len, x.shape[-1])
        try:
            if frame is None:
                raise ProtocolError("no activation frame")
            if reply.get("dtype") != self.dtype:
                raise ProtocolError(f"dtype {reply.get('dtype')!r}, not {self.dtype}")
            out = array_from_frame(frame, reply["dtype"], reply.get("shape"), want)
        except ProtocolError as e:
            raise NetworkError(f"{self.client.who} sent a bad reply: {e}") from None
        compiled = reply.get("compile_us", 0)  # an older worker does not say
        if isinstance(compiled, int) and compiled > 0:
            self.compile_s += compiled / 1e6
        return out

    def release(self, seq_ids: Sequence[int]) -> None:
        """Free the sequences' caches on the worker (nothing to do if it is gone)."""
        header = {"op": RELEASE, "v": PROTOCOL_VERSION, "seq_ids": list(seq_ids)}
        try:
            self.client.request(header, recover=False)
        except NetworkError:
            pass

    def close(self) -> None:
        self.client.close()
