"""Real `cake worker` processes on loopback for the network tests.

Every wait is bounded. Workers are started as `python -m tests.netutil ARGS...`,
which is `cake ARGS...` with one extra backend registered: "slownumpy", the
NumPy backend sleeping CAKE_TEST_DELAY seconds per forward, so that a test can
kill a worker in the middle of a generation.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
WORDS = [f"w{i}" for i in range(128)]  # the tiny models' vocabulary


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999): a client retrying
    a port in that range while nobody listens can connect to itself."""
    for _ in range(1000):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def add_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer over the tiny vocab ("w0".."w127"), no EOS, no
    template: `cake run --raw` works on the folder and greedy runs never stop early."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, "w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({}))
    (folder / "generation_config.json").unlink(missing_ok=True)
    return folder


def tiny_model(folder: Path, arch: str = "llama", dtype: str = "float32", seed=0):
    from tests.models import make_checkpoint

    return add_tokenizer(make_checkpoint(arch, folder, dtype=dtype, seed=seed))


def greedy_text(model: Path, prompt: str, n: int) -> str:
    """The single-process NumPy greedy output: what every distributed run must equal."""
    import cake

    m = cake.load(model, backend="numpy")
    try:
        return "".join(m.generate(prompt, max_tokens=n, temperature=0))
    finally:
        m.close()


def write_topology(path: Path, workers: dict[str, tuple[int, str]], **extra) -> Path:
    """workers: name -> (port, "A-B" inclusive); extra: name -> {key: value}."""
    lines = []
    for name, (port, layers) in workers.items():
        lines += [f"{name}:", f"  host: '127.0.0.1:{port}'"]
        lines.append(f"  layers: ['model.layers.{layers}']")
        for k, v in extra.get(name, {}).items():
            lines.append(f"  {k}: '{v}'")
    path.write_text("\n".join(lines) + "\n")
    return path


class Proc:
    """A child process whose stdout and stderr are collected by threads."""

    def __init__(
        self, args: list[str], env: dict | None = None, stdin: int = subprocess.DEVNULL
    ) -> None:
        """stdin=subprocess.PIPE: write to self.proc.stdin."""
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env["PYTHONPATH"] = str(ROOT)
        self.args = args
        self.proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env=full_env,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.out, self.err = bytearray(), bytearray()
        self._threads = [
            threading.Thread(target=self._pump, args=(s, b), daemon=True)
            for s, b in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, buf: bytearray) -> None:
        for chunk in iter(lambda: stream.read1(65536), b""):
            buf.extend(chunk)

    @property
    def stdout(self) -> str:
        return self.out.decode(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err.decode(errors="replace")

    def wait_for(self, text: str, timeout: float, stream: str = "stderr") -> float:
        """Seconds until `text` shows up; AssertionError on timeout or exit."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if text in getattr(self, stream):
                return time.monotonic() - t0
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the pumps finish
                if text in getattr(self, stream):
                    return time.monotonic() - t0
                raise AssertionError(
                    f"process exited ({self.proc.returncode}) before {text!r}:\n"
                    f"{self.stderr[-3000:]}"
                )
            time.sleep(0.02)
        raise AssertionError(f"no {text!r} within {timeout} s:\n{self.stderr[-3000:]}")

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.args[:4]} still running after {timeout} s:\n"
                f"{self.stderr[-3000:]}"
            ) from None
        for t in self._threads:
            t.join(5)
        return rc

    def terminate(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_worker(
    model: Path | None,
    layers: str | None,
    port: int | None,
    *extra: str,
    backend: str = "numpy",
    delay: float = 0.0,
    ready_timeout: float = 120.0,
) -> Proc:
    """`cake worker` on 127.0.0.1:port, returned once it says it is ready.

    layers/port None: the caller's `extra` says where (--name, --topology);
    model None: a worker with no model (`extra` gives its --cache-dir)."""
    args = [PYTHON, "-m", "tests.netutil", "worker"]
    if model is not None:
        args += ["--model", str(model)]
    if layers is not None:
        args += ["--layers", layers]
    if port is not None:
        args += ["--bind", f"tcp://127.0.0.1:{port}"]
    args += ["--backend", backend, *extra]
    w = Proc(args, env={"CAKE_TEST_DELAY": str(delay)})
    try:
        w.wait_for("ready on", ready_timeout)
    except AssertionError:
        w.kill()
        raise
    return w


def cake(*args: str, env: dict | None = None) -> Proc:
    """`cake ARGS` as a process (with the test backend registered)."""
    return Proc([PYTHON, "-m", "tests.netutil", *args], env=env)


def _register_slow_backend() -> None:
    from cake.backends.base import register_backend
    from cake.backends.numpy import NumpyBackend

    delay = float(os.environ.get("CAKE_TEST_DELAY") or 0)

    class _Slow:
        def __init__(self, inner) -> None:
            self.inner = inner
            self.shard, self.dtype, self.device = inner.shard, inner.dtype, inner.device

        def forward(self, x, step):
            time.sleep(delay)
            return self.inner.forward(x, step)

        def release(self, seq_ids) -> None:
            self.inner.release(seq_ids)

    class SlowNumpyBackend(NumpyBackend):
        name = "slownumpy"

        def load(self, *args, **kwargs):
            return _Slow(super().load(*args, **kwargs))

    register_backend(SlowNumpyBackend)


if __name__ == "__main__":
    _register_slow_backend()
    from cake.cli import main

    sys.argv[0] = "cake"
    main()


class ForgetfulStage:
    """A stage that, at its calls numbered in `fail_at` (from 1), loses every
    sequence it holds and raises StageReset, as a worker that restarted does."""

    def __init__(self, inner, fail_at: set[int]) -> None:
        self.inner, self.shard, self.fail_at, self.calls = (
            inner,
            inner.shard,
            fail_at,
            0,
        )

    def forward(self, x, step):
        from cake.pipeline import StageReset

        self.calls += 1
        if self.calls in self.fail_at:
            self.inner.release(list(self.inner.seqs.slot))
            raise StageReset("restarted")
        return self.inner.forward(x, step)

    def release(self, seq_ids):
        self.inner.release(seq_ids)


def run_together(engine, reqs: list) -> list[list[int]]:
    """Each request's tokens, all submitted to `engine` and stepped to the end."""
    got = [[] for _ in reqs]
    for i, r in enumerate(reqs):
        r.on_event = lambda ev, i=i: got[i].extend(ev.tokens)
        engine.submit(r)
    while not all(r.done for r in reqs):
        engine.step()
    return got


def fresh(engine) -> None:
    """Forget the parked sequences, so a test starts from empty caches."""
    ids = [s.seq_id for s in engine.pool.parked]
    engine.pool.forget_parked()
    if ids:
        engine.pipeline.release(ids)
