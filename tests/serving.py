"""`cake serve` as a real process on loopback, for the tests that talk to it."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator

from tests.netutil import Proc, cake, free_port
from tests.smollm import smollm_gguf


def start_server(*args: str, timeout: float = 180) -> tuple[Proc, int]:
    """`cake serve ARGS` on a free port, returned once /health answers."""
    port = free_port()
    p = cake("serve", "--port", str(port), *args)
    try:
        p.wait_for("cake: serving", timeout)
        wait_health(port, 30)
    except AssertionError:
        p.kill()
        raise
    return p, port


def smollm_server(key: str, name: str, context: int, parallel: int) -> Iterator[int]:
    """A module fixture's body: `cake serve` of the real small model on jax,
    its port, then stopped."""
    p, port = start_server(
        "--model", str(smollm_gguf()), "--backend", "jax", "--context", str(context),
        "--parallel", str(parallel), "--api-key", key, "--served-model-name", name,
    )  # fmt: skip
    yield port
    stop_server(p)


def stop_server(p: Proc) -> None:
    """SIGTERM; uvicorn shuts down, then re-raises SIGTERM as its exit status."""
    assert p.terminate(30) in (0, -15), p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]


def wait_health(port: int, timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            get(port, "/health")
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the server never answered /health")


def get(port: int, path: str, key: str | None = None) -> str:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read().decode()


def greedy_chat(client, model: str, *turns: str, max_tokens: int) -> list[str]:
    """The API's greedy answer to each user turn, the earlier turns as history:
    what a chat client must show for the same turns at temperature 0."""
    messages, answers = [], []
    for t in turns:
        messages.append({"role": "user", "content": t})
        r = client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=max_tokens
        )
        answers.append(r.choices[0].message.content)
        messages.append({"role": "assistant", "content": answers[-1]})
    return answers
