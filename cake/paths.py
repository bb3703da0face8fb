"""Where cake keeps what it makes on this machine: `$CAKE_CACHE_DIR`, else
`~/.cache/cake` (compiled kernels, JAX's compiled steps, streamed weights'
digests)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$CAKE_CACHE_DIR`, else `~/.cache/cake`."""
    return Path(os.environ.get("CAKE_CACHE_DIR") or Path.home() / ".cache" / "cake")
