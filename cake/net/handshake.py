"""What the master requires of a worker's hello, and the `load` that gives a
waiting worker (started without --layers) the layers the master wants.

Used by `WorkerClient` (cake/net/remote.py) after every hello: at connect time
and when a lost worker comes back (a restarted waiting worker gets its layers
again). See docs/protocol.md.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cake.errors import NetworkError
from cake.net.protocol import LOAD, PROTOCOL_VERSION, format_ranges

if TYPE_CHECKING:
    from cake.net.remote import WorkerClient


@dataclass(frozen=True)
class Expect:
    """What the master requires of a worker, from its own checkpoint and topology."""

    fingerprint: str  # of the model config and these ranges' tensors
    ranges: tuple[tuple[int, int], ...]
    dtype: str
    model_type: str
    n_layers: int
    hidden_size: int
    model_fingerprint: str = ""  # of the config alone: checked before a load
    context: int = 0  # positions a load asks for (0: the worker's most)
    max_sequences: int = 1  # sequences the master runs at once (cake serve: many)


def ensure_layers(client: WorkerClient, h: dict[str, Any]) -> dict[str, Any]:
    """The hello `h`, or, for a worker that waits for layers (or holds other ones
    a master gave it), the reply to the `load` of the expected layers."""
    e = client.expect
    if e is None or h.get("fixed", True):
        return h
    streamed = bool(h.get("streams"))
    if streamed:  # a worker with no model of its own: send it the weights first
        if client.weights is None:
            raise NetworkError(
                f"{client.who} has no model (--cache-dir) and this master has no "
                "weights to stream it"
            )
        from cake.net.stream import stream_weights

        stream_weights(client, *client.weights, e.ranges)
    theirs = h.get("model_fingerprint")
    if (
        e.model_fingerprint
        and theirs
        and theirs != e.model_fingerprint
        and not streamed
    ):
        raise NetworkError(_different_model(client, h))
    limit = int(h.get("context_limit") or h.get("context") or 1)
    context = min(e.context, limit) if e.context else limit
    held = tuple(tuple(r) for r in h.get("layers") or ())
    if (held, h.get("dtype"), h.get("context")) == (e.ranges, e.dtype, context) and (
        int(h.get("max_sequences") or 0) >= e.max_sequences and not streamed
    ):
        return h  # (a streamed worker may have dropped them for new weights)
    print(
        f"cake: {client.who}: loading layers {format_ranges(e.ranges)} "
        f"({e.dtype}, context {context})",
        file=sys.stderr,
        flush=True,
    )
    header = {
        "op": LOAD,
        "v": PROTOCOL_VERSION,
        "layers": [list(r) for r in e.ranges],
        "dtype": e.dtype,
        "context": context,
        "max_sequences": e.max_sequences,
    }
    reply, _ = client.request(header, recover=False)
    return reply


def check_hello(client: WorkerClient, h: dict[str, Any]) -> None:
    """Raise NetworkError, naming the worker and what differs, unless the worker
    serves the expected layers of the same model in the same dtype."""
    e = client.expect
    if e is None:
        return  # a probe: any worker will do
    ranges = h.get("layers")
    theirs = tuple(tuple(r) for r in ranges) if isinstance(ranges, list) else ()
    if theirs != e.ranges:
        raise NetworkError(
            f"{client.who} serves layers {format_ranges(theirs)} but the topology "
            f"gives it {format_ranges(e.ranges)}: restart it with --layers or "
            "--name and --topology (or without either, to let the master assign "
            "its layers)"
        )
    if h.get("fingerprint") != e.fingerprint:
        raise NetworkError(_different_model(client, h))
    if h.get("dtype") != e.dtype:
        raise NetworkError(
            f"{client.who} runs {h.get('dtype')} but the master {e.dtype}: "
            "start both with the same --dtype"
        )
    held = int(h.get("max_sequences") or 1)
    if held < e.max_sequences:
        raise NetworkError(
            f"{client.who} caches {held} sequences but the master runs "
            f"{e.max_sequences} at once: start it with --max-sequences "
            f"{e.max_sequences} or lower the master's --parallel"
        )


def _different_model(client: WorkerClient, h: dict[str, Any]) -> str:
    e = client.expect
    diffs = [
        f"{k} {h.get(k)!r} there, {v!r} here"
        for k, v in (
            ("model_type", e.model_type),
            ("n_layers", e.n_layers),
            ("hidden_size", e.hidden_size),
        )
        if h.get(k) != v
    ]
    what = ", ".join(diffs) or "different tensor names or shapes"
    return (
        f"{client.who} runs a different model than the master ({what}): "
        "start it with the same --model"
    )
