"""Finding workers on the local network: DNS-SD over mDNS (python-zeroconf).

A worker with CurveZMQ keys announces a `_cake._tcp.local.` service whose TXT
record says what it is (`Announcement`); it withdraws it when it stops. A
master browses for a few seconds (`browse`), lists what answered, and uses only
the workers whose public key is in its allow list (`--allow-workers DIR` of
NAME.key files): the fingerprint in the TXT record only says which of those
keys to expect, the Curve handshake then proves the worker holds its secret.
Nothing about the link changes: a worker found here is reached over CurveZMQ
exactly as one named in a topology file. A worker without keys announces
nothing (it binds loopback only). See docs/topology.md.

The interfaces mDNS runs on: $CAKE_MDNS_INTERFACES (comma-separated IPv4
addresses of this machine's interfaces, e.g. 127.0.0.1), else a worker's own
bind address (loopback only for a loopback bind) or every interface.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zmq.utils.z85

from cake.errors import NetworkError
from cake.net import keys as curve
from cake.net.protocol import PROTOCOL_VERSION, format_ranges
from cake.topology import WorkerSpec

if TYPE_CHECKING:
    from cake.net.worker import WorkerServer

SERVICE_TYPE = "_cake._tcp.local."
INTERFACES_ENV = "CAKE_MDNS_INTERFACES"
RESOLVE_MS = 1000  # how long one found service's records may take to arrive


class DiscoveryError(NetworkError):
    """mDNS cannot run here, or too few usable workers answered."""


def key_fingerprint(public_key: str | bytes) -> str:
    """A short hash of a Z85 Curve public key: 16 hex digits of its sha256."""
    raw = zmq.utils.z85.decode(public_key)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class Announcement:
    """What a worker says about itself: its service's TXT record."""

    name: str
    version: int  # protocol version
    backend: str
    device: str  # "kind:name"
    memory_bytes: int  # free for weights and caches
    key_fingerprint: str  # key_fingerprint of its Curve public key
    model_fingerprint: str  # the config's alone (cake.net.protocol.fingerprint)
    layers: tuple[tuple[int, int], ...] = ()  # half-open; () while it waits
    fixed: bool = False  # started with --layers: a master cannot assign others

    def txt(self) -> dict[str, str]:
        return {
            "name": self.name[:63],
            "v": str(self.version),
            "backend": self.backend,
            "device": self.device[:100],
            "memory": str(self.memory_bytes),
            "key": self.key_fingerprint,
            "model": self.model_fingerprint,
            "layers": ",".join(f"{a}-{b}" for a, b in self.layers),
            "fixed": "1" if self.fixed else "0",
        }

    @classmethod
    def from_txt(cls, txt: dict[str, str]) -> Announcement:
        """Parse a TXT record; ValueError if it is not a cake worker's."""
        layers = []
        for item in filter(None, txt.get("layers", "").split(",")):
            a, b = item.split("-")
            layers.append((int(a), int(b)))
        return cls(
            name=txt["name"],
            version=int(txt["v"]),
            backend=txt.get("backend", "?"),
            device=txt.get("device", "?"),
            memory_bytes=int(txt.get("memory") or 0),
            key_fingerprint=txt["key"],
            model_fingerprint=txt.get("model", ""),
            layers=tuple(layers),
            fixed=txt.get("fixed") == "1",
        )


@dataclass(frozen=True)
class FoundWorker:
    """A worker's service as a browse saw it."""

    instance: str  # the DNS-SD instance name
    host: str  # the IPv4 address to reach it at
    port: int
    addresses: tuple[str, ...]  # every IPv4 address it announced
    about: Announcement

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"


def worker_announcement(server: WorkerServer, public_key: bytes) -> Announcement:
    """The announcement of a worker server now (its layers and free memory)."""
    from cake.bench import available_memory

    dev = server.device
    return Announcement(
        name=server.name,
        version=PROTOCOL_VERSION,
        backend=server.backend,
        device=f"{dev.kind}:{dev.name}",
        memory_bytes=available_memory(dev),
        key_fingerprint=key_fingerprint(public_key),
        model_fingerprint=server.model_fingerprint,
        layers=tuple(server.ranges),
        fixed=server.fixed,
    )


def _env_interfaces() -> list[str] | None:
    text = os.environ.get(INTERFACES_ENV, "").strip()
    return [s.strip() for s in text.split(",") if s.strip()] or None


def _zeroconf(interfaces: Sequence[str] | None):
    """A Zeroconf instance on `interfaces` (None: all), IPv4."""
    from zeroconf import InterfaceChoice, IPVersion, Zeroconf

    choice = list(interfaces) if interfaces else InterfaceChoice.All
    try:
        return Zeroconf(interfaces=choice, ip_version=IPVersion.V4Only)
    except OSError as e:
        where = ", ".join(interfaces) if interfaces else "any interface"
        raise DiscoveryError(
            f"mDNS cannot run on {where}: {e}; give the workers' addresses "
            f"(--workers HOST:PORT,... or a topology file), or set {INTERFACES_ENV} "
            "to an interface address that has multicast"
        ) from None


def _local_ipv4(within: Sequence[str] | None) -> list[str]:
    """This machine's IPv4 addresses (those in `within` if given), loopback
    last and only if there is no other."""
    import ifaddr

    found = [
        ip.ip
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
        if ip.is_IPv4 and (within is None or ip.ip in within)
    ]
    others = [a for a in found if not ipaddress.ip_address(a).is_loopback]
    return list(dict.fromkeys(others or found))


def _bind_host_port(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    return host.strip("[]"), int(port)


class Announcer:
    """A worker's DNS-SD service: `start` it after binding, `update` it when its
    layers change, `close` it when the worker stops (goodbye packets)."""

    def __init__(
        self,
        about: Announcement,
        endpoint: str,
        interfaces: Sequence[str] | None = None,
    ) -> None:
        host, self.port = _bind_host_port(endpoint)
        if host in ("*", ""):
            host = "0.0.0.0"
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            try:
                ip = ipaddress.ip_address(socket.gethostbyname(host))
            except OSError as e:
                raise DiscoveryError(f"cannot resolve {host!r}: {e}") from None
        if ip.version != 4:
            raise DiscoveryError(
                f"{endpoint}: announcements are IPv4 only; bind an IPv4 address"
            )
        given = list(interfaces) if interfaces else _env_interfaces()
        if ip.is_unspecified:
            self.interfaces = given  # None: every interface
            self.addresses = _local_ipv4(given)
        else:
            # reachable at that address only: announce it there only
            self.interfaces = given or [str(ip)]
            self.addresses = [str(ip)]
        if not self.addresses:
            raise DiscoveryError(f"no IPv4 address to announce {endpoint} at")
        self.about = about
        machine = "".join(c if c.isalnum() else "-" for c in socket.gethostname())
        machine = machine.strip("-")[:30] or "host"
        self._instance = f"{about.name[:20]}@{machine}:{self.port}"
        self._server = f"cake-{machine}-{self.port}.local."  # one per worker
        self._zc = None
        self._info = None
        self._lock = threading.Lock()

    @property
    def instance(self) -> str:
        """The service's instance name (once started, as registered)."""
        return self._info.name.removesuffix("." + SERVICE_TYPE) if self._info else ""

    def _service_info(self, about: Announcement, name: str):
        from zeroconf import ServiceInfo

        return ServiceInfo(
            SERVICE_TYPE,
            name,
            port=self.port,
            properties=about.txt(),
            server=self._server,
            parsed_addresses=self.addresses,
        )

    def start(self) -> None:
        """Register the service (probes the name first: about a second)."""
        from zeroconf import Error as ZeroconfError

        self._zc = _zeroconf(self.interfaces)
        info = self._service_info(self.about, f"{self._instance}.{SERVICE_TYPE}")
        try:
            self._zc.register_service(info, allow_name_change=True)
        except (ZeroconfError, OSError) as e:
            self._zc.close()
            self._zc = None
            raise DiscoveryError(f"cannot announce {self._instance}: {e}") from None
        self._info = info  # its name may have changed to be unique

    def update(self, about: Announcement) -> None:
        """Publish a new TXT record; returns at once (the rebroadcast runs on
        zeroconf's own loop), and never raises: discovery is a convenience."""
        with self._lock:
            if self._zc is None or self._info is None:
                return
            self.about = about
            self._info = self._service_info(about, self._info.name)
            try:
                asyncio.run_coroutine_threadsafe(
                    self._zc.async_update_service(self._info), self._zc.loop
                )
            except Exception:  # a closed loop: nothing to update
                pass

    def close(self) -> None:
        """Withdraw the service (goodbye packets) and stop mDNS."""
        with self._lock:
            zc, info, self._zc, self._info = self._zc, self._info, None, None
        if zc is None:
            return
        try:
            if info is not None:
                zc.unregister_service(info)
        except Exception:  # stopping anyway; the records expire on their own
            pass
        finally:
            zc.close()


def _decode_txt(properties: dict) -> dict[str, str]:
    return {
        k.decode(errors="replace"): (v or b"").decode(errors="replace")
        for k, v in properties.items()
    }


def browse(
    timeout: float = 3.0, interfaces: Sequence[str] | None = None
) -> list[FoundWorker]:
    """The cake workers that answer within `timeout` seconds, sorted by name.

    A service whose TXT record is not a cake worker's, or that gives no IPv4
    address, is left out. Raises DiscoveryError when mDNS cannot run here."""
    from zeroconf import DNSQuestionType, IPVersion, ServiceBrowser, ServiceListener

    zc = _zeroconf(interfaces or _env_interfaces())
    found: dict[str, FoundWorker] = {}
    lock = threading.Lock()

    def resolve(name: str) -> None:
        info = zc.get_service_info(
            SERVICE_TYPE, name, timeout=RESOLVE_MS, question_type=DNSQuestionType.QM
        )
        addresses = info.parsed_addresses(IPVersion.V4Only) if info else []
        if not info or not addresses or not info.port:
            return
        try:
            about = Announcement.from_txt(_decode_txt(info.properties))
        except (KeyError, ValueError):
            return  # not a cake worker's record
        instance = name.removesuffix("." + SERVICE_TYPE)
        w = FoundWorker(instance, addresses[0], info.port, tuple(addresses), about)
        with lock:
            found[name] = w

    class Listener(ServiceListener):
        def add_service(self, zc, type_: str, name: str) -> None:
            resolve(name)

        def update_service(self, zc, type_: str, name: str) -> None:
            resolve(name)

        def remove_service(self, zc, type_: str, name: str) -> None:
            with lock:
                found.pop(name, None)

    # Ask for multicast answers (QM). With zeroconf's default unicast (QU) first
    # query, on loopback with the workers on this machine, the answers came only
    # after the second query, at 1.15 s instead of 0.15 s: the unicast reply goes
    # to port 5353, which every zeroconf process here shares (SO_REUSEPORT).
    browser = ServiceBrowser(
        zc, SERVICE_TYPE, Listener(), question_type=DNSQuestionType.QM
    )
    try:
        time.sleep(timeout)
    finally:
        browser.cancel()
        zc.close()
    with lock:
        return sorted(found.values(), key=lambda w: (w.about.name, w.host, w.port))


@dataclass(frozen=True)
class Discover:
    """`workers=Discover(...)` in cake.load (`--workers discover`): browse the
    local network for `timeout` seconds and use the workers whose public key is
    in `allow_workers` (a folder of their NAME.key files), at least
    `min_workers` of them. `interfaces`: IPv4 addresses of this machine's
    interfaces to browse on (None: $CAKE_MDNS_INTERFACES, else all)."""

    timeout: float = 3.0
    min_workers: int = 1
    allow_workers: str | os.PathLike[str] | None = None
    interfaces: tuple[str, ...] | None = None


def allowed_worker_keys(folder: str | os.PathLike[str]) -> dict[str, str]:
    """key fingerprint -> Z85 public key, for every NAME.key in `folder`."""
    p = curve.allowed_keys_folder(folder)
    out = {}
    for f in sorted(p.glob("*.key")):
        key = curve.load_public_key(f).decode()
        out[key_fingerprint(key)] = key
    return out


def why_unused(
    w: FoundWorker,
    allowed: dict[str, str] | None,
    model_fingerprint: str | None,
    fixed_ok: bool = False,
) -> str:
    """Why a master does not use a found worker ("" if it does); `fixed_ok`: a
    worker with fixed layers will do (to probe it, not to assign it layers)."""
    a = w.about
    if a.version != PROTOCOL_VERSION:
        return f"protocol v{a.version}, not v{PROTOCOL_VERSION}"
    if allowed is None:
        return "no --allow-workers"
    if a.key_fingerprint not in allowed:
        return "key not allowed"
    if model_fingerprint and a.model_fingerprint != model_fingerprint:
        return "another model"
    if a.fixed and not fixed_ok:
        return f"fixed layers {format_ranges(a.layers)}"
    return ""


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def found_table(
    found: Iterable[FoundWorker],
    allowed: dict[str, str] | None = None,
    model_fingerprint: str | None = None,
    *,
    title: str | None = None,
    master: bool = False,
    fixed_ok: bool = False,
):
    """A rich Table of found workers: whether each key is `allowed` (None: no
    allow list), and either the layers each holds or (`master`) why the master
    does not use it."""
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col in ("name", "address", "backend", "device", "memory", "key"):
        t.add_column(col, no_wrap=col in ("name", "address", "key"))
    t.add_column("allowed")
    t.add_column("use" if master else "layers")
    for w in found:
        a = w.about
        ok = "-" if allowed is None else "yes" if a.key_fingerprint in allowed else "no"
        if master:
            note = why_unused(w, allowed, model_fingerprint, fixed_ok) or "used"
        else:
            note = format_ranges(a.layers) if a.layers else "waiting"
        t.add_row(
            a.name, w.hostport, a.backend, a.device,
            _size(a.memory_bytes), a.key_fingerprint, ok, note,
        )  # fmt: skip
    return t


def find_workers(
    options: Discover,
    *,
    model_fingerprint: str | None = None,
    fixed_ok: bool = False,
    show: Callable[[object], None] | None = None,
) -> list[WorkerSpec]:
    """Browse, show the table (on stderr unless `show` says where), and return
    the usable workers as WorkerSpecs with their public keys: those whose key
    is allowed, that run the model of `model_fingerprint` (None: any) and wait
    for layers (`fixed_ok`: or hold fixed ones). Raises DiscoveryError when
    fewer than `options.min_workers` are usable."""
    allowed = (
        allowed_worker_keys(options.allow_workers)
        if options.allow_workers is not None
        else None
    )
    found = browse(options.timeout, options.interfaces)
    if show is None:
        from rich.console import Console

        show = Console(stderr=True).print
    show(
        found_table(
            found, allowed, model_fingerprint, master=True, fixed_ok=fixed_ok,
            title=f"cake: {len(found)} worker(s) found in {options.timeout:g} s",
        )
    )  # fmt: skip
    used = [w for w in found if not why_unused(w, allowed, model_fingerprint, fixed_ok)]
    if len(used) < options.min_workers:
        reasons: dict[str, int] = {}
        for w in found:
            why = why_unused(w, allowed, model_fingerprint, fixed_ok)
            if why:
                reasons[why] = reasons.get(why, 0) + 1
        left = "; ".join(f"{n} {why}" for why, n in reasons.items())
        hint = (
            "pass --allow-workers DIR with the workers' NAME.key files"
            if allowed is None
            else "start more workers (with --secret-key), copy their NAME.key into "
            f"{options.allow_workers}, or raise --discover-timeout"
        )
        raise DiscoveryError(
            f"{len(used)} usable worker(s) found in {options.timeout:g} s, "
            f"--min-workers is {options.min_workers}"
            + (f" ({len(found)} answered: {left})" if left else "")
            + f": {hint}"
        )
    names = [w.about.name for w in used]
    specs = []
    for w in used:
        name = w.about.name
        if names.count(name) > 1:  # two machines with the same worker name
            name = f"{name}@{w.hostport}"
        specs.append(
            WorkerSpec(
                name,
                w.host,
                w.port,
                f"tcp://{w.hostport}",
                description=f"found by mDNS as {w.instance}",
                public_key=allowed[w.about.key_fingerprint],
            )
        )
    return specs
