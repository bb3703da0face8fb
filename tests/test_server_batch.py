"""`cake serve` under concurrency, a real process on loopback spoken to by the
real `openai` client: requests sent at once get the texts they get one at a
time (one process on NumPy or JAX, and master + 2 `cake worker` processes;
--parallel 16, and 4 so that requests queue), and 64 clients at once, some
leaving mid-stream, lose or mix up nothing and leave the server as they found
it.

The model is the tests' tiny random checkpoint with its word tokenizer
(tests/netutil.py): no EOS, so every greedy request runs to its max_tokens.
The oracle for every text is the same request run alone through an engine in
this process (cake.load, NumPy).
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from pathlib import Path

import openai
import pytest

import cake
from cake.request import Request
from cake.sampling import SamplingParams
from tests.netutil import WORDS, free_port, start_worker, tiny_model, write_topology
from tests.serving import get, start_server, stop_server

CONTEXT = 256  # the tiny model's max_position_embeddings
MAX_TOKENS = 16
# what the load may leave behind in the server (measured: 2-5 MB)
RSS_BOUND_KB = 32 * 1024
# prompt lengths 1..200: one decode token up to 7 prefill chunks of 32
LENGTHS = [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 200, 4, 30, 64, 100]


def _prompt(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS[3:]) for _ in range(n))


# 16 prompts of different lengths; the last two extend earlier ones, so that a
# parked sequence's prefix is taken over while others run
PROMPTS = [_prompt(n, i) for i, n in enumerate(LENGTHS[:14])]
PROMPTS += [PROMPTS[6] + " " + _prompt(9, 100), PROMPTS[9] + " " + _prompt(11, 101)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def alone(tiny):
    """text(prompt, max_tokens): the request run by itself, from empty caches."""
    m = cake.load(tiny, backend="numpy", max_context=CONTEXT)
    memo: dict[tuple[str, int], str] = {}

    def text(prompt: str, n: int = MAX_TOKENS) -> str:
        if (prompt, n) not in memo:
            ids = m.tokenizer.encode(prompt)
            req = Request(ids, SamplingParams(temperature=0), n)
            out = [ev.text for ev in m.engine.events(req)]
            assert req.stats.stop_reason == "max_tokens"
            memo[prompt, n] = "".join(out)
            ids = [s.seq_id for s in m.engine.pool.parked]  # no prefix reuse
            m.engine.pool.forget_parked()
            m.pipeline.release(ids)
        return memo[prompt, n]

    yield text
    m.close()


# --- servers -------------------------------------------------------------------


class Server:
    """A `cake serve` process (tests/serving.py) and its openai client."""

    def __init__(self, model: Path, *args: str, backend: str = "numpy") -> None:
        self.proc, self.port = start_server(
            "--model", str(model), "--backend", backend,
            "--served-model-name", "tiny", *args, timeout=120,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.client = openai.OpenAI(base_url=self.url, api_key="-", max_retries=0)

    def get(self, path: str) -> str:
        return get(self.port, path)

    def health(self) -> dict:
        return json.loads(self.get("/health"))

    def metric(self, name: str) -> float:
        for line in self.get("/metrics").splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no {name} in /metrics")

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.proc.proc.pid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1])

    def complete(self, prompt: str, n: int = MAX_TOKENS) -> tuple[str, str, int]:
        r = self.client.completions.create(
            model="tiny", prompt=prompt, max_tokens=n, temperature=0
        )
        c = r.choices[0]
        return c.text, c.finish_reason, r.usage.completion_tokens

    def wait_idle(self, timeout: float = 10) -> dict:
        t0 = time.monotonic()
        while True:
            h = self.health()
            if (h["running"], h["waiting"]) == (0, 0):
                return h
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"the server is still busy: {h}")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def workers(tiny):
    """Two `cake worker` processes holding the tiny model's 3 layers: 0-1 and 2."""
    procs, ports = [], {}
    room = ("--max-sequences", "16", "--context", str(CONTEXT))
    try:
        for name, layers in (("a", "0-1"), ("b", "2")):
            port = free_port()
            procs.append(start_worker(tiny, layers, port, *room))
            ports[name] = (port, layers)
        yield ports
    finally:
        for w in procs:
            assert w.terminate() == 0, w.stderr[-3000:]


# name: (the master's backend, --parallel, whether 2 workers hold the layers)
SETUPS = {
    "numpy-parallel-16": ("numpy", 16, False),
    "numpy-parallel-4": ("numpy", 4, False),  # 12 of the 16 requests queue
    "jax-parallel-16": ("jax", 16, False),
    "two-workers-parallel-16": ("numpy", 16, True),
    "two-workers-parallel-4": ("numpy", 4, True),
}


@pytest.fixture(scope="module", params=list(SETUPS))
def server(request, tiny, tmp_path_factory):
    backend, parallel, split = SETUPS[request.param]
    args = ["--parallel", str(parallel)]
    if split:
        ports = request.getfixturevalue("workers")
        topo = write_topology(tmp_path_factory.mktemp("topo") / "t.yaml", ports)
        args += ["--topology", str(topo)]
    s = Server(tiny, *args, backend=backend)
    yield s
    stop_server(s.proc)


# --- batched equals sequential ---------------------------------------------------


def test_concurrent_greedy_requests_equal_one_at_a_time(server, alone):
    expected = [alone(p) for p in PROMPTS]
    one_by_one = [server.complete(p) for p in PROMPTS]
    assert [t for t, _, _ in one_by_one] == expected
    assert {(f, n) for _, f, n in one_by_one} == {("length", MAX_TOKENS)}
    batches_before = server.metric("cake_decode_batch_size_count")
    rows_before = server.metric("cake_decode_batch_size_sum")

    got: list = [None] * len(PROMPTS)
    go = threading.Barrier(len(PROMPTS))

    def ask(i: int) -> None:
        go.wait(10)
        got[i] = server.complete(PROMPTS[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [g and g[0] for g in got] == expected
    assert {(f, n) for _, f, n in got} == {("length", MAX_TOKENS)}
    # the requests really were batched: decode steps carried several sequences
    steps = server.metric("cake_decode_batch_size_count") - batches_before
    rows = server.metric("cake_decode_batch_size_sum") - rows_before
    assert rows / steps > 1.5, (rows, steps)
    server.wait_idle()


# --- under load -------------------------------------------------------------------

CLIENTS = 64


def _load_plan() -> list[dict]:
    """One request per client: its prompt (lengths 1..200), max_tokens, and how it
    is sent: whole, streamed, streamed and closed after 3 chunks, or whole and
    abandoned by a client that gives up after a few milliseconds."""
    rng = random.Random(8)
    kinds = [
        "whole",
        "stream",
        "leave",
        "stream",
        "whole",
        "give-up",
        "stream",
        "leave",
    ]
    plan = []
    for i in range(CLIENTS):
        kind = kinds[i % len(kinds)]
        n = rng.choice([1, 4, 9, 23, 40, 77, 130, 190])
        if kind == "leave":
            n = rng.choice([1, 4, 9, 23])
        # a client that leaves asks for far more than it reads
        tokens = CONTEXT - 1 - n if kind == "leave" else rng.choice([1, 8, 16, 24])
        plan.append(
            {"prompt": _prompt(n, 1000 + i), "max_tokens": tokens, "kind": kind}
        )
    return plan


async def _client(c: openai.AsyncOpenAI, job: dict) -> tuple[str, str | None]:
    """(the text received, the finish reason, or None if the client left)."""
    kw = dict(
        model="tiny", prompt=job["prompt"], max_tokens=job["max_tokens"], temperature=0
    )
    if job["kind"] == "whole":
        r = await c.completions.create(**kw)
        return r.choices[0].text, r.choices[0].finish_reason
    if job["kind"] == "give-up":
        try:
            r = await asyncio.wait_for(c.completions.create(**kw), 0.005)
        except TimeoutError:
            return "", None
        return r.choices[0].text, r.choices[0].finish_reason
    stream = await c.completions.create(**kw, stream=True)
    parts, finish, chunks = [], None, 0
    async for ch in stream:
        for choice in ch.choices:
            parts.append(choice.text)
            finish = choice.finish_reason or finish
        chunks += 1
        if job["kind"] == "leave" and chunks == 3:
            await stream.close()
            return "".join(parts), None
    return "".join(parts), finish


async def _load(url: str, plan: list[dict]) -> list:
    async with openai.AsyncOpenAI(base_url=url, api_key="-", max_retries=0) as c:
        return await asyncio.gather(
            *(_client(c, job) for job in plan), return_exceptions=True
        )


def test_64_clients_at_once_lose_and_mix_up_nothing(server, alone):
    plan = _load_plan()
    # the expected texts, and a warm server: what it holds before the load
    expected = [alone(j["prompt"], j["max_tokens"]) for j in plan]
    assert server.complete(plan[0]["prompt"], plan[0]["max_tokens"])[0] == expected[0]
    server.wait_idle()
    rss_before = server.rss_kb()
    cancelled_before = _count(server, 'finish="cancelled"')

    t0 = time.monotonic()
    results = asyncio.run(asyncio.wait_for(_load(server.url, plan), 50))
    took = time.monotonic() - t0

    errors = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    left = 0
    for i, ((text, finish), job, want) in enumerate(
        zip(results, plan, expected, strict=True)
    ):
        if finish is None:  # the client left: what it got is the start of the text
            left += 1
            assert want.startswith(text), (i, job["kind"], text, want)
        else:
            assert (text, finish) == (want, "length"), (i, job["kind"])
    assert left >= CLIENTS // 4  # every "leave" client left before its end

    # the server keeps serving, holds nothing of the load, and counted the leavers
    h = server.wait_idle()
    assert h["status"] == "ok"
    assert server.metric("cake_queue_depth") == 0
    assert server.metric("cake_running_sequences") == 0
    assert _count(server, 'finish="cancelled"') - cancelled_before >= CLIENTS // 4
    last = plan[1]
    assert server.complete(last["prompt"], last["max_tokens"])[0] == expected[1]
    grown = server.rss_kb() - rss_before
    assert grown < RSS_BOUND_KB, f"the server grew by {grown} kB under load"
    assert took < 50


def _count(server: Server, label: str) -> float:
    """The sum of cake_requests_total over the series carrying `label`."""
    total = 0.0
    for line in server.get("/metrics").splitlines():
        if line.startswith("cake_requests_total{") and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total
