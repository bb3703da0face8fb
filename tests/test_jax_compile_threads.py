"""XLA's compiler threads are niced after a compile; the threads that run the
steps are not (backends/jax/compile_threads.py).

In a child process, since niceness raised cannot be lowered back without
privileges: JAX compiles a few programs, runs one between them, and the
test reads every thread's niceness and CPU time from /proc.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cake.backends import available_backends

pytestmark = [
    pytest.mark.skipif("jax" not in available_backends(), reason="jax not installed"),
    pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="Linux only"),
]

CHILD = r"""
import json, os, threading
import jax, jax.numpy as jnp
from cake.backends.jax import compile_threads as ct
assert ct.install()

def run_times():
    return {int(t): int(open(f"/proc/self/task/{t}/schedstat").read().split()[0])
            for t in os.listdir("/proc/self/task")}

def program(n):
    f = jax.jit(lambda x: jnp.tanh(x @ x.T) * n + jnp.sort(x, axis=0)[0])
    return f, jnp.ones((64, 64))

for n in range(4):  # a compile, then steps between it and the next one
    f, x = program(n)
    for _ in range(50):
        f(x).block_until_ready()
f, x = program(9)
f(x).block_until_ready()  # compiled: the niced threads are settled now
before = run_times()
for _ in range(300):  # steps only
    x = f(x)
x.block_until_ready()
after = run_times()
stepping = [t for t in after if after[t] > before.get(t, 0)]
nice = {t: os.getpriority(os.PRIO_PROCESS, t) for t in after}
names = {t: open(f"/proc/self/task/{t}/comm").read().strip() for t in after}
print(json.dumps({"niced": sorted(ct.niced), "stepping": stepping, "nice": nice,
                  "names": names, "main": threading.get_native_id()}))
"""


def test_compiler_threads_niced_and_step_threads_not():
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.splitlines()[-1])
    nice = {int(t): n for t, n in r["nice"].items()}
    names = {int(t): n for t, n in r["names"].items()}
    assert r["niced"], "no compiler thread was found"
    assert all(nice[t] == 10 for t in r["niced"] if t in nice)
    # what ran the steps, and XLA's execution pool, kept their niceness
    assert not set(r["niced"]) & set(r["stepping"])
    assert all(nice[t] == 0 for t in r["stepping"])
    assert nice[r["main"]] == 0
    assert all(nice[t] == 0 for t, n in names.items() if n == "tf_XLAEigen")
