"""`cake chat` as a process against a real `cake serve` on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import openai
import pytest

from tests.netutil import Proc, free_port
from tests.serving import get, greedy_chat, smollm_server

KEY = "chat-key"
NAME = "smol"
PARIS = "What is the capital of France? Answer in one sentence."
ITALY = "And of Italy?"


@pytest.fixture(scope="module")
def server():
    yield from smollm_server(KEY, NAME, context=1024, parallel=2)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key=KEY)


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}/v1"


def chat(*args: str, stdin: str | None = None, key: str | None = KEY):
    env = {k: v for k, v in os.environ.items() if k != "CAKE_API_KEY"}
    if key is not None:
        env["CAKE_API_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "cake", "chat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def assert_one_error_line(r, *words: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cake: error: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_a_prompt_prints_the_answer_of_the_first_model(server, client):
    r = chat(PARIS, "--url", url(server), "--temperature", "0", "--max-tokens", "32")
    assert r.returncode == 0, r.stderr
    assert r.stdout == greedy_chat(client, NAME, PARIS, max_tokens=32)[0] + "\n"
    assert "Paris" in r.stdout and r.stderr == ""


def test_piped_lines_are_a_conversation(server, client):
    # the key from --api-key this time; /reset forgets the first two turns,
    # /exit stops before the last line
    r = chat(
        "--url", url(server), "--api-key", KEY, "--model", NAME, "-t", "0", "-n", "32",
        stdin=f"{PARIS}\n\n{ITALY}\n/reset\n{ITALY}\n/exit\n{PARIS}\n",
        key=None,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    first, second = greedy_chat(client, NAME, PARIS, ITALY, max_tokens=32)
    (alone,) = greedy_chat(client, NAME, ITALY, max_tokens=32)
    assert second != alone  # the history matters for this question
    assert r.stdout == f"{first}\n{second}\n{alone}\n"
    assert r.stderr == ""


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(server):
    p = Proc(
        [sys.executable, "-m", "cake", "chat", "--url", url(server), "-t", "0"],
        env={"CAKE_API_KEY": KEY},
        stdin=subprocess.PIPE,
    )
    try:
        p.proc.stdin.write(b"Write a long story about a cat named Tom.\n")
        p.proc.stdin.flush()
        p.wait_for("Tom", 60, stream="stdout")
        p.proc.send_signal(signal.SIGINT)
        p.wait_for("cake: stopped", 30)
        t0 = time.monotonic()  # the server cancelled the request
        while (
            json.loads(get(server, "/health"))["running"] and time.monotonic() - t0 < 5
        ):
            time.sleep(0.05)
        assert json.loads(get(server, "/health"))["running"] == 0
        p.proc.stdin.write(b"/exit\n")
        p.proc.stdin.close()
        assert p.wait(30) == 0, p.stderr
    finally:
        p.kill()
    assert "Traceback" not in p.stderr, p.stderr
    assert 'finish="cancelled"' in get(server, "/metrics", KEY)


def test_errors_are_one_line_and_exit_1(server):
    nobody = url(free_port())
    assert_one_error_line(chat("hi", "--url", nobody), "cannot reach", nobody)
    assert_one_error_line(chat("--url", nobody, stdin="hi\n"), "cannot reach")
    assert_one_error_line(chat("hi", "--url", url(server), key="wrong"), "API key")
    assert_one_error_line(chat("hi", "--url", url(server), key=None), "API key")
    assert_one_error_line(
        chat("hi", "--url", url(server), "--model", "other"), "'other' does not exist"
    )
    # a REPL's first turn meets the unknown model: the chat ends there
    r = chat("--url", url(server), "--model", "other", stdin="hi\nhi again\n")
    assert_one_error_line(r, "does not exist")


def test_a_refused_turn_is_reported_and_the_conversation_goes_on(server, client):
    # a question longer than the context: a 400 for this turn only
    long = "word " * 1100
    r = chat("--url", url(server), "-t", "0", "-n", "32", stdin=f"{long}\n{PARIS}\n")
    assert r.returncode == 1  # a turn failed
    errors = r.stderr.splitlines()
    assert len(errors) == 1 and "context" in errors[0] and "/reset" in errors[0]
    assert r.stdout == greedy_chat(client, NAME, PARIS, max_tokens=32)[0] + "\n"
