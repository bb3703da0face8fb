"""Topology files: which worker runs which layers, in evilsocket/cake's YAML format.

    linux_server_1:
      host: 'linux_server.host:10128'
      description: 'NVIDIA Titan X'
      layers: ['model.layers.0-5', 'model.layers.6']
      backend: jax
      public_key: '<40-character Z85 CurveZMQ key>'

Ranges are inclusive in the file and half-open `[start, end)` everywhere in code.
Parsing checks syntax only; `validate_topology` checks against the model's layer
count, which is known only once the model is loaded. See docs/topology.md.
"""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass, field

import yaml

from cake.errors import CakeError, TopologyError
from cake.shard import parse_layer_range

DEFAULT_PORT = 10128
KEYS = ("host", "description", "layers", "backend", "public_key")
_Z85 = set(
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
)


@dataclass(frozen=True)
class WorkerSpec:
    """One worker: where it listens and which layers it runs."""

    name: str
    host: str
    port: int
    address: str  # "tcp://host:port", what ZeroMQ connects to
    description: str = ""
    ranges: tuple[tuple[int, int], ...] = ()  # half-open, sorted by start
    backend: str | None = None
    public_key: str | None = None  # Z85 CurveZMQ public key of the worker


@dataclass(frozen=True)
class Topology:
    workers: tuple[WorkerSpec, ...]
    source: str = field(default="<topology>", compare=False)  # for error messages

    def worker(self, name: str) -> WorkerSpec:
        for w in self.workers:
            if w.name == name:
                return w
        names = ", ".join(w.name for w in self.workers)
        raise TopologyError(f"{self.source}: no worker named {name!r} (have: {names})")


@dataclass(frozen=True)
class Placement:
    """Layers `[start, end)` run on `worker`, or on the master when it is None."""

    start: int
    end: int
    worker: WorkerSpec | None

    @property
    def layers(self) -> range:
        return range(self.start, self.end)


def _inclusive(r: tuple[int, int]) -> str:
    a, b = r[0], r[1] - 1
    return f"{a}" if a == b else f"{a}-{b}"


# --- parsing -------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (plain YAML keeps the last)."""

    def construct_document(self, node):
        self._root = node
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    dup = key in seen
                    seen.add(key)
                except TypeError:
                    continue  # unhashable key: PyYAML itself reports it
                if dup:
                    line = key_node.start_mark.line + 1
                    what = "worker name" if node is self._root else "key"
                    raise TopologyError(
                        f"duplicate {what} {key!r} at line {line}: "
                        "each name may appear only once"
                    )
        return super().construct_mapping(node, deep=deep)


def _parse_host(value: object, where: str) -> tuple[str, int]:
    if not isinstance(value, str) or not value.strip():
        raise TopologyError(
            f"{where}: 'host' must be a non-empty 'host' or 'host:port'"
        )
    text = value.strip()
    if "://" in text:
        scheme, _, text = text.partition("://")
        if scheme != "tcp":
            raise TopologyError(f"{where}: host {value!r}: only tcp:// addresses work")
    if text.startswith("["):  # IPv6 literal: [::1]:10128
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else rest
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise TopologyError(f"{where}: bad host {value!r}: expected host or host:port")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise TopologyError(f"{where}: bad port in {value!r}: expected 1-65535")
    return host, int(port_text)


def _parse_layers(value: object, where: str) -> tuple[tuple[int, int], ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise TopologyError(
            f"{where}: 'layers' must be a non-empty list, e.g. ['model.layers.0-5']"
        )
    ranges = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise TopologyError(f"{where}: bad layer range {item!r}: expected 'A-B'")
        try:  # syntax only: the layer count is checked by validate_topology
            ranges.append(parse_layer_range(str(item), sys.maxsize))
        except CakeError as e:
            raise TopologyError(f"{where}: {e}") from None
    return tuple(sorted(ranges))


def _optional_str(entry: dict, key: str, where: str) -> str | None:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise TopologyError(f"{where}: {key!r} must be a non-empty string")
    return value.strip()


def _parse_worker(name: str, entry: object, source: str) -> WorkerSpec:
    where = f"{source}: worker {name!r}"
    if not isinstance(entry, dict):
        raise TopologyError(
            f"{where}: expected a mapping with 'host' and 'layers', got {entry!r}"
        )
    for key in entry:
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = (
                f"did you mean {close[0]!r}?"
                if close
                else f"allowed: {', '.join(KEYS)}"
            )
            raise TopologyError(f"{where}: unknown key {key!r} ({hint})")
    if "host" not in entry:
        raise TopologyError(f"{where}: missing 'host' (e.g. host: '10.0.0.2:10128')")
    if "layers" not in entry:
        raise TopologyError(f"{where}: missing 'layers' (e.g. ['model.layers.0-5'])")
    host, port = _parse_host(entry["host"], where)
    key = _optional_str(entry, "public_key", where)
    if key is not None and (len(key) != 40 or not set(key) <= _Z85):
        raise TopologyError(
            f"{where}: 'public_key' must be a 40-character Z85 key (see `cake keys`)"
        )
    bracketed = f"[{host}]" if ":" in host else host
    return WorkerSpec(
        name=name,
        host=host,
        port=port,
        address=f"tcp://{bracketed}:{port}",
        description=_optional_str(entry, "description", where) or "",
        ranges=_parse_layers(entry["layers"], where),
        backend=_optional_str(entry, "backend", where),
        public_key=key,
    )


def parse_topology(text: str, source: str = "<topology>") -> Topology:
    """Parse topology YAML. Checks syntax only; see `validate_topology`."""
    try:
        data = yaml.load(text, Loader=_Loader)
    except TopologyError as e:
        raise TopologyError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise TopologyError(f"{source}: not valid YAML: {problem}{at}") from None
    if data is None:
        raise TopologyError(
            f"{source}: the topology is empty: list at least one worker"
        )
    if not isinstance(data, dict):
        raise TopologyError(
            f"{source}: expected a mapping of worker name -> settings, "
            f"got {type(data).__name__}"
        )
    if not data:
        raise TopologyError(f"{source}: the topology lists no workers")
    workers = tuple(_parse_worker(str(n), e, source) for n, e in data.items())
    return Topology(workers, source=source)


def load_topology(path: str | os.PathLike[str]) -> Topology:
    """Read and parse a topology file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise TopologyError(f"topology file {os.fspath(path)!r} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TopologyError(
            f"cannot read topology file {os.fspath(path)!r}: {e}"
        ) from None
    return parse_topology(text, source=os.fspath(path))


# --- validation and placement --------------------------------------------------


def validate_topology(topology: Topology, n_layers: int) -> None:
    """Check the topology against a model with `n_layers` layers."""
    src = topology.source
    names: set[str] = set()
    hosts: dict[tuple[str, int], str] = {}
    for w in topology.workers:
        if w.name in names:
            raise TopologyError(f"{src}: duplicate worker name {w.name!r}")
        names.add(w.name)
        if (w.host, w.port) in hosts:
            raise TopologyError(
                f"{src}: workers {hosts[w.host, w.port]!r} and {w.name!r} share "
                f"the address {w.host}:{w.port}: give each worker its own host or port"
            )
        hosts[w.host, w.port] = w.name
        for r in w.ranges:
            if not 0 <= r[0] < r[1] <= n_layers:
                raise TopologyError(
                    f"{src}: worker {w.name!r}: layers {_inclusive(r)} are out of "
                    f"range: the model has {n_layers} layers (0-{n_layers - 1})"
                )
    owned = sorted((r, w.name) for w in topology.workers for r in w.ranges)
    for (ra, a), (rb, b) in zip(owned, owned[1:], strict=False):
        if rb[0] < ra[1]:
            both = f"worker {a!r} lists" if a == b else f"workers {a!r} and {b!r} list"
            raise TopologyError(
                f"{src}: {both} overlapping layers {_inclusive(ra)} and "
                f"{_inclusive(rb)}: each layer may run in one place only"
            )


def placements(topology: Topology, n_layers: int) -> list[Placement]:
    """Where each layer runs: placements covering [0, n_layers) in order.

    Layers no worker holds run on the master (worker None); adjacent ranges of one
    worker merge into one placement, so each worker costs one round trip per step.
    """
    validate_topology(topology, n_layers)
    owned = sorted(
        ((r, w) for w in topology.workers for r in w.ranges), key=lambda t: t[0]
    )
    out: list[Placement] = []
    pos = 0
    for (start, end), w in owned:
        if start > pos:
            out.append(Placement(pos, start, None))
        if out and out[-1].worker is w and out[-1].end == start:
            out[-1] = Placement(out[-1].start, end, w)
        else:
            out.append(Placement(start, end, w))
        pos = end
    if pos < n_layers:
        out.append(Placement(pos, n_layers, None))
    return out


def dump_topology(topology: Topology) -> str:
    """The topology as YAML in the file format; `parse_topology` reads it back."""
    data: dict[str, dict] = {}
    for w in topology.workers:
        bracketed = f"[{w.host}]" if ":" in w.host else w.host
        entry: dict[str, object] = {"host": f"{bracketed}:{w.port}"}
        if w.description:
            entry["description"] = w.description
        entry["layers"] = [f"model.layers.{_inclusive(r)}" for r in w.ranges]
        if w.backend is not None:
            entry["backend"] = w.backend
        if w.public_key is not None:
            entry["public_key"] = w.public_key
        data[w.name] = entry
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
