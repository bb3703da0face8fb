"""`cake run` on a tiny model: clean stdout, and one clear error line for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.models import make_checkpoint
from tests.smollm import hf_smollm

VOCAB = 49152  # SmolLM2's tokenizer drives the tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = make_checkpoint("llama", tmp_path_factory.mktemp("tiny"), vocab_size=VOCAB)
    _, tok = hf_smollm()
    tok.save_pretrained(folder)
    return folder


def cake(*args: str, stdin: str | None = None, timeout: float = 240):
    return subprocess.run(
        [sys.executable, "-m", "cake", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(r, *words: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("cake: error:")]
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_stdout_carries_only_the_generated_text(tiny, tmp_path):
    stats = tmp_path / "s.json"
    r = cake(
        "run",
        "--model",
        str(tiny),
        "--backend",
        "numpy",
        "--raw",
        "--temperature",
        "0",
        "--max-tokens",
        "5",
        "--stats-json",
        str(stats),
        "Hello world",
    )
    assert r.returncode == 0, r.stderr
    assert "Hello world" not in r.stdout and "tok/s" not in r.stdout
    assert "tok/s" in r.stderr
    s = json.loads(stats.read_text())
    assert s["decode_tokens"] == 5 and s["prompt_tokens"] == 2
    # same seed, same sampled output
    args = [
        "run",
        "--model",
        str(tiny),
        "--backend",
        "numpy",
        "--raw",
        "--seed",
        "3",
        "--temperature",
        "1.0",
        "--max-tokens",
        "6",
        "Hello world",
    ]
    assert cake(*args).stdout == cake(*args).stdout


def test_missing_model_path():
    assert_one_line_error(
        cake("run", "--model", "/nonexistent/model", "hi"),
        "/nonexistent/model",
        "does not exist",
    )


def test_unsupported_model_type(tiny, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (bad / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(cake("run", "--model", str(bad), "hi"), "gpt_neox")


def test_missing_tensor_and_wrong_shape(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tiny / "model.safetensors")
    for case, mutate, words in [
        (
            "missing",
            lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
            ["model.layers.1.mlp.up_proj.weight"],
        ),
        (
            "shape",
            lambda t: t.__setitem__(
                "model.layers.0.self_attn.k_proj.weight",
                t["model.layers.0.self_attn.k_proj.weight"][:-1],
            ),
            ["model.layers.0.self_attn.k_proj.weight", "shape"],
        ),
    ]:
        folder = tmp_path / case
        folder.mkdir()
        for f in tiny.iterdir():
            if f.name != "model.safetensors":
                (folder / f.name).write_bytes(f.read_bytes())
        t = dict(tensors)
        mutate(t)
        save_file(t, folder / "model.safetensors")
        r = cake("run", "--model", str(folder), "--backend", "numpy", "hi")
        assert_one_line_error(r, *words)


def test_prompt_longer_than_context(tiny):
    r = cake(
        "run",
        "--model",
        str(tiny),
        "--backend",
        "numpy",
        "--raw",
        "--context",
        "8",
        "one two three four five six seven eight nine ten",
    )
    assert_one_line_error(r, "context")


def test_bad_options_and_unknown_backend(tiny):
    r = cake("run", "--model", str(tiny), "--backend", "nosuch", "hi")
    assert_one_line_error(r, "nosuch")
    r = cake("run", "--model", str(tiny), "--temperature", "-1", "hi")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    r = cake("run", "--model", str(tiny), "--raw", "--chat", "hi")
    assert_one_line_error(r, "--raw")


def test_not_a_model_file(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_text("this is not a gguf file")
    assert_one_line_error(cake("run", "--model", str(f), "hi"))
    g = tmp_path / "weights.bin"
    g.write_bytes(b"\0" * 10)
    assert_one_line_error(cake("run", "--model", str(g), "hi"), "gguf")


def test_cached_prefix_reuse_gives_the_fresh_result(tiny):
    import cake

    m = cake.load(tiny, backend="numpy")
    "".join(m.generate("Hello world, this is", max_tokens=5, temperature=0))
    again = "".join(
        m.generate("Hello world, this is a test", max_tokens=5, temperature=0)
    )
    fresh = cake.load(tiny, backend="numpy")
    assert again == "".join(
        fresh.generate("Hello world, this is a test", max_tokens=5, temperature=0)
    )
