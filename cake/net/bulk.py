"""The weight stream's side channel: chunks over a plain TCP connection.

A worker without Curve keys (loopback, or --insecure) that is to receive
weights offers, in its `weights` reply, a TCP port of its own and a one-time
token (`Listener`). The master then sends a `bulk` request on the ZeroMQ link
and, while it waits for the answer, connects to that port, sends the token
and the missing chunks, each after a fixed header (`HEAD`: entry index in the
manifest, offset, length, XXH3-64 sum); the worker checks and writes each as
a `chunk` request would and answers with the entry's held bytes (`ACK`), and
the master keeps at most `window` chunks unanswered, as on the ZeroMQ path.
A master that checksums the tensors as it goes sends the manifest's later
parts on the same connection (`PART`: what a `weights` request with `part`
carries), answered with what of them is held. `END` closes the stream; the
`bulk` reply follows, or an error (a failed sum: `checksum`, as for `chunk`;
a connection that broke: `dropped`).

Why: on loopback a ZeroMQ copy goes through an I/O thread on each side, so a
worker that also checks and writes every chunk has four busy threads on a
2-core host and reads each chunk on another core than the one it arrived on;
here the worker's own thread receives a chunk into one reused buffer, checks
it and writes it while it is in that core's cache (docs/performance.md, "Weight
streaming over TCP"). With Curve keys the chunks go over ZeroMQ, encrypted.
"""

from __future__ import annotations

import hmac
import os
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from cake.errors import NetworkError
from cake.net.protocol import FLUSH, WEIGHTS

HEAD = struct.Struct("<IIQQQ")  # entry index, 0, offset, nbytes, sum
ACK = struct.Struct("<Q")  # bytes of the entry held after the chunk
END = 0xFFFFFFFF  # the entry index that ends the stream
PART = 0xFFFFFFFE  # the entry index of a record that is a part of the manifest
MAX_PART = 16 << 20  # bytes of one manifest part's JSON
TOKEN_BYTES = 16
ACCEPT_S = 10.0  # for the master to connect after the `bulk` request
IDLE_S = 60.0  # a stream that sends nothing for this long is dropped
CONNECT_S = 5.0  # for the master to reach the port (else: the ZeroMQ path)


class Broken(NetworkError):
    """The connection broke or sent what the stream does not allow."""


def recv_into(conn: socket.socket, view: memoryview) -> None:
    """Fill `view` from `conn`; Broken at the end of the stream."""
    got, n = 0, len(view)
    while got < n:
        k = conn.recv_into(view[got:], n - got)
        if k == 0:
            raise Broken(f"the connection closed after {got} of {n} bytes")
        got += k


def _recv(conn: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    recv_into(conn, memoryview(buf))
    return bytes(buf)


class Listener:
    """A worker's one-time TCP port for one stream of chunks."""

    def __init__(self, endpoint: str) -> None:
        host = endpoint_host(endpoint)
        info = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM,
                                  flags=socket.AI_PASSIVE)[0]  # fmt: skip
        self.sock = socket.socket(info[0], socket.SOCK_STREAM)
        try:
            self.sock.bind(info[4])
            self.sock.listen(1)
        except OSError:
            self.sock.close()
            raise
        self.port = self.sock.getsockname()[1]
        self.token = os.urandom(TOKEN_BYTES)

    def offer(self) -> dict[str, Any]:
        return {"port": self.port, "token": self.token.hex()}

    def accept(self) -> socket.socket:
        """The master's connection, its token checked; Broken otherwise."""
        self.sock.settimeout(ACCEPT_S)
        try:
            conn, _ = self.sock.accept()
        except OSError as e:
            raise Broken(f"no connection to the weight port: {e}") from None
        conn.settimeout(IDLE_S)
        try:
            token = _recv(conn, TOKEN_BYTES)
        except (OSError, Broken) as e:
            conn.close()
            raise Broken(f"the weight port's connection sent no token: {e}") from None
        if not hmac.compare_digest(token, self.token):
            conn.close()
            raise Broken("a connection to the weight port with a wrong token")
        return conn

    def close(self) -> None:
        self.sock.close()


def endpoint_host(endpoint: str) -> str:
    """The host of a tcp://HOST:PORT endpoint ("" for *), without brackets."""
    host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0]
    return "" if host == "*" else host.strip("[]")


def receive(
    conn: socket.socket,
    chunk: int,
    store: Callable[[int, int, memoryview, int], int],
    part: Callable[[bytes, bool], list[int]],
) -> int:
    """The worker's side: read records until END. A chunk: store(index,
    offset, data, sum) checks and writes it (raising to stop) and returns the
    entry's held bytes, sent back. A manifest part (PART, its JSON, `more` in
    the header's second field): part(body, more) extends the manifest and
    returns what of it is held, sent back as a count and the values.
    Returns the chunks stored."""
    buf = memoryview(bytearray(chunk))
    count = 0
    while True:
        index, flag, offset, nbytes, sum_ = HEAD.unpack(_recv(conn, HEAD.size))
        if index == END:
            return count
        if index == PART:
            if nbytes > MAX_PART:
                raise Broken(f"a manifest part of {nbytes} bytes")
            held = part(_recv(conn, nbytes), flag == 1)
            conn.sendall(struct.pack(f"<{len(held) + 1}Q", len(held), *held))
            continue
        if nbytes > chunk:
            raise Broken(f"a chunk header for entry {index} of {nbytes} bytes")
        data = buf[:nbytes]
        recv_into(conn, data)
        conn.sendall(ACK.pack(store(index, offset, data, sum_)))
        count += 1


def send(
    conn: socket.socket,
    token: bytes,
    items: Iterable[Any],
    index: dict[str, int],
    window: int,
    took: Callable[[dict[str, Any], dict[str, Any]], None],
) -> None:
    """The master's side: the token, then each item, with at most `window`
    unanswered: a chunk (header, data), a manifest part (a `weights` header
    with `part`, its JSON) or FLUSH (every answer first); then END.
    took(header, {"held": ...}) for each answer; index: entry digest -> its
    place in the manifest. OSError or Broken when the connection breaks (the
    worker says why)."""
    conn.sendall(token)
    waiting: deque[dict[str, Any]] = deque()
    for item in items:
        if item is FLUSH:
            while waiting:
                _took(conn, waiting, took)
            continue
        header, data = item
        view = memoryview(data).cast("B")
        if header["op"] == WEIGHTS:
            more = 1 if header.get("more") else 0
            head = HEAD.pack(PART, more, 0, len(view), 0)
        else:
            head = HEAD.pack(index[header["digest"]], 0, header["offset"], len(view),
                             header["sum"])  # fmt: skip
        conn.sendall(head)
        conn.sendall(view)
        waiting.append(header)
        if len(waiting) >= window:
            _took(conn, waiting, took)
    conn.sendall(HEAD.pack(END, 0, 0, 0, 0))
    while waiting:
        _took(conn, waiting, took)


def _took(conn: socket.socket, waiting: deque, took: Callable) -> None:
    header = waiting.popleft()
    (held,) = ACK.unpack(_recv(conn, ACK.size))
    if header["op"] == WEIGHTS:  # a part's answer: the count, then the values
        if held > MAX_PART // 8:
            raise Broken(f"an answer of {held} values to a manifest part")
        held = list(struct.unpack(f"<{held}Q", _recv(conn, 8 * held)))
    took(header, {"held": held})


def connect(address: str, offer: Any) -> tuple[socket.socket, bytes] | None:
    """A connection to the worker's offered port (its host: the worker's
    ZeroMQ address), or None: no offer, a bad one, or the port unreachable
    (a firewall: the chunks go over ZeroMQ)."""
    if not isinstance(offer, dict):
        return None
    try:
        port, token = int(offer["port"]), bytes.fromhex(offer["token"])
        if not 0 < port < 65536 or len(token) != TOKEN_BYTES:
            return None
        conn = socket.create_connection((endpoint_host(address), port), CONNECT_S)
    except (OSError, KeyError, ValueError, TypeError):
        return None
    return conn, token
