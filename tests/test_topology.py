import textwrap

import pytest

from cake.errors import TopologyError
from cake.topology import (
    Placement,
    Topology,
    WorkerSpec,
    dump_topology,
    load_topology,
    parse_topology,
    placements,
    validate_topology,
)

KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # a Z85 public key

EVILSOCKET = """
linux_server_1:
  host: 'linux_server.host:10128'
  description: 'NVIDIA Titan X Pascal (12GB)'
  layers:
    - 'model.layers.0-5'

linux_server_2:
  host: 'linux_server2.host:10128'
  description: 'NVIDIA GeForce 3080 (10GB)'
  layers:
    - 'model.layers.6-16'

iphone:
  host: 'iphone.host:10128'
  description: 'iPhone 15 Pro Max'
  layers:
    - 'model.layers.17'

ipad:
  host: 'ipad.host:10128'
  description: 'iPad'
  layers:
    - 'model.layers.18-19'
"""


def parse(text: str) -> Topology:
    return parse_topology(textwrap.dedent(text))


def topo(*workers: tuple[str, list[tuple[int, int]]]) -> Topology:
    return Topology(
        tuple(
            WorkerSpec(n, f"h{i}", 10128, f"tcp://h{i}:10128", ranges=tuple(r))
            for i, (n, r) in enumerate(workers)
        )
    )


def spans(ps: list[Placement]) -> list[tuple[int, int, str | None]]:
    return [(p.start, p.end, p.worker and p.worker.name) for p in ps]


def test_evilsocket_example_parses():
    t = parse(EVILSOCKET)
    assert [w.name for w in t.workers] == [
        "linux_server_1",
        "linux_server_2",
        "iphone",
        "ipad",
    ]
    w = t.worker("linux_server_2")
    assert (w.host, w.port, w.address) == (
        "linux_server2.host",
        10128,
        "tcp://linux_server2.host:10128",
    )
    assert w.description == "NVIDIA GeForce 3080 (10GB)"
    assert w.ranges == ((6, 17),)
    assert t.worker("iphone").ranges == ((17, 18),)
    assert w.backend is None and w.public_key is None
    validate_topology(t, 22)
    assert spans(placements(t, 22)) == [
        (0, 6, "linux_server_1"),
        (6, 17, "linux_server_2"),
        (17, 18, "iphone"),
        (18, 20, "ipad"),
        (20, 22, None),
    ]


def test_hosts_ranges_and_optional_fields():
    t = parse(f"""
        a: {{host: gpu-box, layers: ['3-4', 0], backend: jax, public_key: '{KEY}'}}
        b: {{host: 'tcp://10.0.0.2:5555', layers: 'model.layers.7'}}
        c: {{host: '[::1]:6000', layers: [9-9]}}
    """)
    a, b, c = t.workers
    assert (a.host, a.port, a.ranges) == ("gpu-box", 10128, ((0, 1), (3, 5)))
    assert (a.backend, a.public_key) == ("jax", KEY)
    assert (b.host, b.port, b.address) == ("10.0.0.2", 5555, "tcp://10.0.0.2:5555")
    assert (c.host, c.port, c.address) == ("::1", 6000, "tcp://[::1]:6000")
    with pytest.raises(TopologyError, match="no worker named 'z'"):
        t.worker("z")


def test_round_trip(tmp_path):
    t = parse(f"""
        a: {{host: 'x:1', description: 'Titan: X #1', layers: [0-2, 5], backend: mlx,
             public_key: '{KEY}'}}
        "b c": {{host: '[::1]', layers: [3-4]}}
    """)
    text = dump_topology(t)
    assert "model.layers.0-2" in text and "model.layers.5" in text
    assert parse_topology(text) == t
    path = tmp_path / "topology.yml"
    path.write_text(text)
    assert load_topology(path) == t


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "topology is empty"),
        ("a: [b", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping of worker name"),
        ("{}", "lists no workers"),
        ("a: 'x:1'", "worker 'a': expected a mapping with 'host' and 'layers'"),
        ("a: {layers: [0]}", "worker 'a': missing 'host'"),
        ("a: {host: '', layers: [0]}", "worker 'a': 'host' must be a non-empty"),
        ("a: {host: x}", "worker 'a': missing 'layers'"),
        ("a: {host: x, layers: []}", "worker 'a': 'layers' must be a non-empty list"),
        ("a: {host: x, layers: [0-a]}", "worker 'a': bad layer range '0-a'"),
        (
            "a: {host: x, layers: [5-2]}",
            "worker 'a': bad layer range '5-2': start after end",
        ),
        ("a: {host: x, layers: [{b: 1}]}", "worker 'a': bad layer range"),
        (
            "a: {host: x, layers: [0], hots: y}",
            "worker 'a': unknown key 'hots' (did you mean 'host'?)",
        ),
        (
            "a: {host: x, layers: [0], gpu: y}",
            "worker 'a': unknown key 'gpu' (allowed: host",
        ),
        ("a: {host: 'x:99999', layers: [0]}", "worker 'a': bad port in 'x:99999'"),
        ("a: {host: 'x:y', layers: [0]}", "worker 'a': bad port"),
        ("a: {host: 'ipc://x', layers: [0]}", "only tcp:// addresses"),
        ("a: {host: x, layers: [0], public_key: abc}", "40-character Z85 key"),
        (
            "a: {host: x, layers: [0], backend: 3}",
            "'backend' must be a non-empty string",
        ),
        (
            "a: {host: x, layers: [0]}\na: {host: y, layers: [1]}",
            "duplicate worker name 'a' at line 2",
        ),
        ("a: {host: x, host: y, layers: [0]}", "duplicate key 'host' at line 1"),
    ],
)
def test_parse_errors(text, message):
    with pytest.raises(TopologyError) as e:
        parse_topology(text, source="t.yml")
    msg = str(e.value)
    assert msg.startswith("t.yml: ") and message in msg and "\n" not in msg


def test_load_errors(tmp_path):
    with pytest.raises(TopologyError, match="topology file .*nope.yml' not found"):
        load_topology(tmp_path / "nope.yml")
    with pytest.raises(TopologyError, match="cannot read topology file"):
        load_topology(tmp_path)


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "a: {host: x, layers: [0-5]}\nb: {host: y, layers: [6-12]}",
            "worker 'b': layers 6-12 are out of range: the model has 12 layers (0-11)",
        ),
        (
            "a: {host: x, layers: [0-5]}\nb: {host: y, layers: [4-7]}",
            "workers 'a' and 'b' list overlapping layers 0-5 and 4-7",
        ),
        (
            "a: {host: x, layers: [0-3, 3]}",
            "worker 'a' lists overlapping layers 0-3 and 3",
        ),
        (
            "a: {host: 'x:7', layers: [0]}\nb: {host: 'tcp://x:7', layers: [1]}",
            "workers 'a' and 'b' share the address x:7",
        ),
    ],
)
def test_validation_errors(text, message):
    t = parse_topology(text, source="t.yml")
    with pytest.raises(TopologyError) as e:
        validate_topology(t, 12)
    assert str(e.value).startswith(f"t.yml: {message}")
    with pytest.raises(TopologyError):
        placements(t, 12)


def test_duplicate_names_built_in_code():
    with pytest.raises(TopologyError, match="duplicate worker name 'a'"):
        validate_topology(topo(("a", [(0, 1)]), ("a", [(1, 2)])), 4)


def test_distinct_ports_on_one_host_are_fine():
    t = parse("a: {host: 'x:1', layers: [0]}\nb: {host: 'x:2', layers: [1]}")
    validate_topology(t, 2)


@pytest.mark.parametrize(
    "workers, expected",
    [
        ([], [(0, 8, None)]),  # all local
        ([("w", [(3, 5)])], [(0, 3, None), (3, 5, "w"), (5, 8, None)]),
        ([("a", [(0, 2)]), ("b", [(6, 8)])], [(0, 2, "a"), (2, 6, None), (6, 8, "b")]),
        (
            [("w", [(1, 2), (5, 7)])],
            [(0, 1, None), (1, 2, "w"), (2, 5, None), (5, 7, "w"), (7, 8, None)],
        ),
        ([("w", [(4, 8), (0, 2), (2, 4)])], [(0, 8, "w")]),  # adjacent ranges merge
        ([("a", [(0, 4)]), ("b", [(4, 8)])], [(0, 4, "a"), (4, 8, "b")]),
    ],
)
def test_placements(workers, expected):
    assert spans(placements(topo(*workers), 8)) == expected
