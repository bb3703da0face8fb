"""Finding workers by mDNS (DNS-SD through python-zeroconf), with real processes.

Every process of a test runs in a network namespace the module creates (`ip
netns add`, only its loopback up) and removes: zeroconf's own default, every
interface, is then the loopback alone, and nothing leaves this machine or meets
another test's workers. Without `ip netns` (not root) the processes run here
with $CAKE_MDNS_INTERFACES=127.0.0.1: zeroconf on the loopback only.
Workers and the master use the test backends of tests/test_net_bench.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from cake.net.discovery import (
    Announcement,
    FoundWorker,
    found_table,
    key_fingerprint,
    why_unused,
)
from cake.net.keys import create_keys, load_public_key
from cake.net.protocol import PROTOCOL_VERSION
from tests.netutil import PYTHON, Proc, free_port, greedy_text, tiny_model
from tests.test_net_bench import ONE_LAYER

PROMPT = "w5 w17 w99 w3 w42 w7"
N = 8
BENCH = "tests.test_net_bench"  # `cake` with the slownumpy and smallnumpy backends
WIDE = {"COLUMNS": "200"}  # rich tables on one line per row


@pytest.fixture(scope="module")
def net():
    """(command prefix, environment) that every process of the module runs with."""
    name = f"cake-discovery-{os.getpid()}"
    ip = shutil.which("ip")
    ok = ip is not None and os.geteuid() == 0
    if ok:
        made = subprocess.run([ip, "netns", "add", name], capture_output=True)
        up = [ip, "netns", "exec", name, ip, "link", "set", "lo", "up"]
        ok = made.returncode == 0 and subprocess.run(up).returncode == 0
    if not ok:
        yield [], {"CAKE_MDNS_INTERFACES": "127.0.0.1"}
        return
    try:
        yield [ip, "netns", "exec", name], {"CAKE_MDNS_INTERFACES": ""}
    finally:
        subprocess.run([ip, "netns", "del", name])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def reference(tiny):
    return greedy_text(tiny, PROMPT, N)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Key pairs w1..w5 and master; `allow`: the master's key (for the workers);
    `workers`: w1's and w2's public keys (for the master), not w3's."""
    root = tmp_path_factory.mktemp("keys")
    pairs = {n: create_keys(n, root / "pairs") for n in ("w1", "w2", "w3", "w4", "w5")}
    pairs["master"] = create_keys("master", root / "pairs")
    for folder, names in (("allow", ["master"]), ("workers", ["w1", "w2"])):
        (root / folder).mkdir()
        for n in names:
            shutil.copy(pairs[n][0], root / folder)
    return root, pairs


def _cake(net, *args: str, env: dict | None = None) -> Proc:
    prefix, base = net
    return Proc(
        [*prefix, PYTHON, "-m", BENCH, *args], env={**base, **WIDE, **(env or {})}
    )


def _worker(net, tiny, keys, name: str | None, bind: str, *extra, env=None) -> Proc:
    """A worker waiting for layers on "smallnumpy" (memory for one layer)."""
    args = ["worker", "--model", str(tiny), "--bind", bind, "--backend", "smallnumpy"]
    if name is not None:
        root, pairs = keys
        args += [
            "--secret-key",
            str(pairs[name][1]),
            "--allow-keys",
            str(root / "allow"),
        ]
    w = _cake(
        net, *args, *extra, env={"CAKE_TEST_MEMORY": str(ONE_LAYER), **(env or {})}
    )
    try:
        w.wait_for("ready on", 120)
    except AssertionError:
        w.kill()
        raise
    return w


@pytest.fixture(scope="module")
def workers(net, tiny, keys):
    """w1 and w2 (keys the master allows; w2 bound to every interface), w3 (a key
    it does not allow), and one without keys; name -> (port, process)."""
    started = {}
    try:
        for name, host in (("w1", "127.0.0.1"), ("w2", "0.0.0.0"), ("w3", "127.0.0.1")):
            port = free_port()
            started[name] = (
                port,
                _worker(net, tiny, keys, name, f"tcp://{host}:{port}"),
            )
        port = free_port()
        started["nokeys"] = (
            port,
            _worker(net, tiny, keys, None, f"tcp://127.0.0.1:{port}"),
        )
        yield started
    finally:
        for _, w in started.values():
            assert w.terminate() == 0, w.stderr


def _listed(net, *args: str, timeout: float = 3) -> dict[str, dict]:
    """`cake workers --json`: the rows, by name."""
    r = _cake(net, "workers", "--json", "--timeout", str(timeout), *args)
    assert r.wait(60) == 0, r.stderr
    return {row["name"]: row for row in json.loads(r.stdout)}


def test_announcement_round_trips_through_txt():
    a = Announcement("w1", PROTOCOL_VERSION, "numpy", "cpu:numpy", 8 << 30,
                     "0123456789abcdef", "f" * 64, ((0, 3), (5, 6)), True)  # fmt: skip
    assert Announcement.from_txt(a.txt()) == a
    assert all(isinstance(v, str) and len(v) < 256 for v in a.txt().values())
    with pytest.raises(KeyError):
        Announcement.from_txt({"name": "printer"})


def test_why_unused_and_the_table():
    a = Announcement("w1", PROTOCOL_VERSION, "numpy", "cpu:numpy", 1, "k1", "m")
    w = FoundWorker("w1@host:1", "10.0.0.2", 1, ("10.0.0.2",), a)
    assert why_unused(w, {"k1": "KEY"}, "m") == ""
    assert why_unused(w, None, "m") == "no --allow-workers"
    assert why_unused(w, {"k2": "KEY"}, "m") == "key not allowed"
    assert why_unused(w, {"k1": "KEY"}, "other") == "another model"
    fixed = FoundWorker(w.instance, w.host, 1, w.addresses,
                        Announcement(**{**a.__dict__, "fixed": True, "layers": ((0, 2),)}))  # fmt: skip
    assert why_unused(fixed, {"k1": "KEY"}, "m") == "fixed layers 0-1"
    assert why_unused(fixed, {"k1": "KEY"}, "m", fixed_ok=True) == ""
    old = FoundWorker(w.instance, w.host, 1, w.addresses,
                      Announcement(**{**a.__dict__, "version": 99}))  # fmt: skip
    assert why_unused(old, {"k1": "KEY"}, "m").startswith("protocol v99")
    assert found_table([w], {"k1": "KEY"}, "m", master=True).row_count == 1


def test_workers_lists_the_workers_with_keys(net, workers, keys):
    _, pairs = keys
    t0 = time.monotonic()
    rows = _listed(net)  # 3 s, the default
    assert time.monotonic() - t0 < 30
    ours = {n: rows[n] for n in ("w1", "w2", "w3") if n in rows}
    assert set(ours) == {"w1", "w2", "w3"}, rows
    for name, row in ours.items():
        port, _ = workers[name]
        key = load_public_key(pairs[name][0])
        assert row["address"] == f"127.0.0.1:{port}"  # w2 too: loopback is all
        assert row["key_fingerprint"] == key_fingerprint(key)
        assert row["backend"] == "smallnumpy" and row["device"] == "gpu:small"
        assert row["version"] == PROTOCOL_VERSION and row["memory_bytes"] == ONE_LAYER
        assert len(row["model_fingerprint"]) == 64 and row["allowed"] is None
    # the worker without keys is not announced, and says so
    nokeys_port, nokeys = workers["nokeys"]
    assert "not announced (no keys)" in nokeys.stderr
    assert all(r["address"] != f"127.0.0.1:{nokeys_port}" for r in rows.values())
    # with the master's allow list: w1 and w2 allowed, w3 not; the table shows it
    root, _ = keys
    rows = _listed(net, "--allow-workers", str(root / "workers"), timeout=2)
    assert [rows[n]["allowed"] for n in ("w1", "w2", "w3")] == [True, True, False]
    r = _cake(
        net, "workers", "--timeout", "2", "--allow-workers", str(root / "workers")
    )
    assert r.wait(60) == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if " w3 " in ln)
    assert key_fingerprint(load_public_key(pairs["w3"][0])) in line and " no " in line


def test_master_finds_two_workers_and_ignores_a_key_it_does_not_allow(
    net, tiny, keys, workers, reference
):
    root, pairs = keys
    # a slow master (20 ms per forward): the plan gives each worker the one layer
    # its memory holds and keeps one on the master (as in test_net_bench)
    r = _cake(net, "run", "--model", str(tiny), "--backend", "slownumpy",
              "--workers", "discover", "--allow-workers", str(root / "workers"),
              "--client-key", str(pairs["master"][1]), "--min-workers", "2",
              "--raw", "-t", "0", "-n", str(N), PROMPT,
              env={"CAKE_TEST_DELAY": "0.02"})  # fmt: skip
    assert r.wait(240) == 0, r.stderr
    assert r.stdout.strip() == reference.strip()
    err = r.stderr
    assert "found in 3 s" in err  # the default --discover-timeout
    rows = {ln.split()[1]: ln for ln in err.splitlines() if ln.startswith("│")}
    assert "used" in rows["w1"] and "used" in rows["w2"], err
    assert "key not allowed" in rows["w3"] and " no " in rows["w3"], err
    for name in ("w1", "w2"):
        assert f"{name}: layers" in err, err
        assert "serving layers" in workers[name][1].stderr
    assert "master: layers" in err
    w3 = workers["w3"][1].stderr
    assert "bench of" not in w3 and "loading layers" not in w3  # never asked
    # the announcements now say which layers w1 and w2 hold
    listed = _listed(net, timeout=2)
    held = sorted(listed[n]["layers"] for n in ("w1", "w2"))
    assert held == [[[1, 2]], [[2, 3]]], listed
    assert listed["w3"]["layers"] == []


def test_too_few_workers_is_one_error_line(net, tiny, keys, workers):
    root, pairs = keys
    r = _cake(net, "run", "--model", str(tiny), "--backend", "numpy",
              "--workers", "discover", "--allow-workers", str(root / "workers"),
              "--discover-timeout", "1.5", "--min-workers", "3", "--raw", "hi")  # fmt: skip
    assert r.wait(60) == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("cake: error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "2 usable worker(s) found in 1.5 s, --min-workers is 3" in lines[0]
    assert "key not allowed" in lines[0]
    # no allow list: every worker is listed, none used
    r = _cake(net, "run", "--model", str(tiny), "--workers", "discover",
              "--discover-timeout", "1", "--raw", "hi")  # fmt: skip
    assert r.wait(60) == 1 and "pass --allow-workers DIR" in r.stderr.splitlines()[-1]


def test_bench_probes_discovered_workers(net, keys, workers):
    root, pairs = keys
    r = _cake(net, "bench", "--synthetic", "tiny", "--context", "700", "--layers",
              "1", "--backend", "numpy", "--workers", "discover", "--allow-workers",
              str(root / "workers"), "--client-key", str(pairs["master"][1]),
              "--discover-timeout", "2")  # fmt: skip
    assert r.wait(240) == 0, r.stderr
    assert r.stdout.count("round trip") == 2, r.stdout
    assert "w1" in r.stdout and "w2" in r.stdout and "w3" not in r.stdout


def test_explicit_addresses_work_without_multicast(
    net, tiny, keys, reference, tmp_path
):
    # mDNS on an interface this machine does not have: zeroconf cannot join the
    # multicast group, as where multicast is unavailable
    nowhere = {"CAKE_MDNS_INTERFACES": "198.51.100.1"}  # TEST-NET-2
    root, pairs = keys
    ports = [free_port(), free_port()]
    ws = [_worker(net, tiny, keys, n, f"tcp://127.0.0.1:{p}", env=nowhere)
          for n, p in zip(("w4", "w5"), ports, strict=True)]  # fmt: skip
    try:
        for w in ws:
            assert "mDNS cannot run on 198.51.100.1" in w.stderr
            assert "not announced" in w.stderr
        r = _cake(net, "run", "--model", str(tiny), "--workers", "discover",
                  "--discover-timeout", "1", "--raw", "hi", env=nowhere)  # fmt: skip
        assert r.wait(60) == 1
        assert "mDNS cannot run" in r.stderr.splitlines()[-1], r.stderr
        # by address: a file with the hosts and their public keys
        hosts = tmp_path / "hosts.yaml"
        hosts.write_text("".join(
            f"{n}:\n  host: '127.0.0.1:{p}'\n  layers: ['0']\n"
            f"  public_key: '{load_public_key(pairs[n][0]).decode()}'\n"
            for n, p in zip(("w4", "w5"), ports, strict=True)
        ))  # fmt: skip
        r = _cake(net, "run", "--model", str(tiny), "--backend", "slownumpy",
                  "--topology", "auto", "--workers", str(hosts),
                  "--client-key", str(pairs["master"][1]),
                  "--raw", "-t", "0", "-n", str(N), PROMPT,
                  env={"CAKE_TEST_DELAY": "0.02", **nowhere})  # fmt: skip
        assert r.wait(240) == 0, r.stderr
        assert r.stdout.strip() == reference.strip()
        assert "w4: layers" in r.stderr and "w5: layers" in r.stderr
    finally:
        for w in ws:
            w.kill()


def test_a_stopped_worker_is_no_longer_listed(net, tiny, keys):
    ports = {"w4": free_port(), "w5": free_port()}
    ws = {
        n: _worker(net, tiny, keys, n, f"tcp://127.0.0.1:{p}") for n, p in ports.items()
    }
    try:
        assert {"w4", "w5"} <= set(_listed(net, timeout=2))
        assert ws["w4"].terminate() == 0  # SIGTERM: it withdraws its service
        assert "stopped" in ws["w4"].stderr
        ws["w5"].kill()  # SIGKILL: no goodbye, but nobody answers for it
        listed = _listed(net, timeout=2)
        assert "w4" not in listed and "w5" not in listed, listed
    finally:
        for w in ws.values():
            w.kill()
