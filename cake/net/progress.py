"""Progress of a byte transfer on stderr (the weight stream, on both sides):
a rich bar on a terminal, else a line per 10 %."""

from __future__ import annotations

import sys


class ByteBar:
    """`done` bytes of `total`; lines read "<prefix>: <label>: X of Y MB"."""

    def __init__(self, label: str, total: int, prefix: str = "cake") -> None:
        self.label, self.total, self.done, self._next = label, total, 0, 0.1
        self.prefix = prefix
        self._rich = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

            self._rich = Progress(
                *Progress.get_default_columns(), DownloadColumn(),
                TransferSpeedColumn(), console=Console(stderr=True), transient=True,
            )  # fmt: skip
            self._rich.start()
            self._task = self._rich.add_task(label, total=total)

    def advance(self, n: int) -> None:
        self.done += n
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done)
        elif self.total and self.done / self.total >= self._next:
            print(
                f"{self.prefix}: {self.label}: {self.done / 1e6:.1f} of "
                f"{self.total / 1e6:.1f} MB",
                file=sys.stderr,
                flush=True,
            )
            self._next += 0.1

    def grow(self, n: int) -> None:
        """n more bytes to come (a transfer whose size is learnt as it goes)."""
        self.total += n
        if self._rich is not None:
            self._rich.update(self._task, total=self.total)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
