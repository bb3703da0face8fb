"""weights.packed.release_pages drops a copied tensor's file pages from the
process, for the views of both readers: GGUF's np.memmap and safetensors'
np.frombuffer over an mmap.mmap (a memoryview between the array and the map)."""

from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest

from cake.weights.packed import release_pages

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="/proc/self/smaps: Linux"
)


def resident_kib(a: np.ndarray) -> int:
    """Rss of the mapping holding `a`, from /proc/self/smaps."""
    at, inside = a.ctypes.data, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:  # a mapping's first line
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= at < hi
            elif inside and head == "Rss:":
                return int(line.split()[1])
    raise AssertionError("no mapping holds the array")


@pytest.mark.parametrize("reader", ["memmap", "frombuffer"])
def test_release_pages_of_a_file_view(tmp_path, reader):
    path = tmp_path / "t.bin"
    np.arange(1 << 20, dtype=np.float32).tofile(path)  # 4 MiB
    if reader == "memmap":
        a = np.memmap(path, np.float32, "r", offset=40, shape=((1 << 20) - 16,))
    else:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        a = np.frombuffer(mm, np.float32, (1 << 20) - 16, 40)  # as safetensors
    a = a.reshape(-1, 16)  # a view of the view, as a tensor of the file
    assert float(a.sum()) > 0  # read: resident
    assert resident_kib(a) >= 4000
    release_pages(a)
    assert resident_kib(a) <= 8  # the two part pages at its ends at most
