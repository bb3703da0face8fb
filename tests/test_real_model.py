"""SmolLM2-135M through `cake run` gives HF transformers' greedy tokens."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cake.backends import available_backends
from tests.smollm import hf_greedy, hf_smollm, smollm_gguf

CAKE = [sys.executable, "-m", "cake"]
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
]
N = 24
BACKENDS = [b for b in ("numpy", "jax") if b in available_backends()]


def cake_run(*args: str, stdin: str | None = None, timeout: float = 300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [*CAKE, "run", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="module")
def expected() -> dict[str, str]:
    _, tok = hf_smollm()
    out = {}
    for p in PROMPTS:
        ids = tok(p).input_ids
        out[p] = tok.decode(hf_greedy(ids, N))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_greedy_matches_hf(backend, expected, tmp_path: Path):
    for p in PROMPTS:
        stats = tmp_path / "stats.json"
        r = cake_run(
            "--raw",
            "--temperature",
            "0",
            "--max-tokens",
            str(N),
            "--backend",
            backend,
            "--stats-json",
            str(stats),
            p,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout == expected[p] + "\n", (p, r.stdout, expected[p])
        import json

        s = json.loads(stats.read_text())
        assert s["backend"] == backend and s["decode_tokens"] == N
        for key in (
            "device",
            "dtype",
            "prompt_tokens",
            "prompt_tokens_per_s",
            "decode_tokens_per_s",
            "load_s",
            "first_token_s",
        ):
            assert key in s


def test_chat_answers_paris():
    r = cake_run(
        "--temperature", "0", "--max-tokens", "24", "What is the capital of France?"
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "backend auto -> " in r.stderr


def test_prompt_from_stdin_and_api_stream_match():
    import cake

    r = cake_run(
        "--raw",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--backend",
        "numpy",
        stdin="The capital of France is",
    )
    assert r.returncode == 0, r.stderr
    m = cake.load(smollm_gguf(), backend="numpy")
    pieces = list(m.generate("The capital of France is", max_tokens=8, temperature=0))
    assert "".join(pieces) + "\n" == r.stdout
    assert len(pieces) > 1  # streamed, not returned at once
