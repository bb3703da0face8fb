"""The JAX Backend class: CPU, CUDA/ROCm GPUs and TPUs through XLA."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import ClassVar

from cake.backends.base import DeviceInfo
from cake.config import ModelConfig
from cake.paths import cache_dir
from cake.shard import Shard
from cake.weights import TensorSource

_KINDS = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}


def compilation_cache_dir() -> Path:
    """`$CAKE_CACHE_DIR/jax`, else `~/.cache/cake/jax`."""
    return cache_dir() / "jax"


def enable_compilation_cache() -> None:
    """Persist compiled steps on disk so that restarts skip XLA compilation.

    A directory the user already configured for JAX is kept.
    """
    import jax

    if jax.config.jax_compilation_cache_dir:
        return
    path = compilation_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # a read-only home only costs compile time
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Keep every step, not only those that took 1 s (JAX's default): SmolLM2's
    # take 0.1-0.3 s each, and cake serve's 13 warm-up shapes took 2.4 s
    # compiled against 1.3 s read back (428 KB on disk)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:  # a compile before this point left the cache switched off: reconsider
        from jax._src import compilation_cache

        if compilation_cache._cache_checked and not compilation_cache._cache_used:
            compilation_cache.reset_cache()
    except Exception:  # private API: without it only restarts get slower
        pass


class JaxBackend:
    name: ClassVar[str] = "jax"

    @classmethod
    def is_available(cls) -> bool:
        return importlib.util.find_spec("jax") is not None

    @classmethod
    def devices(cls) -> list[DeviceInfo]:
        """JAX's default devices; memory is what the runtime reports (host RAM on CPU)."""
        import jax

        out = []
        for d in jax.devices():
            kind = _KINDS.get(d.platform, d.platform)
            mem = None
            try:
                stats = d.memory_stats()
                mem = int(stats["bytes_limit"]) if stats else None
            except Exception:  # not every runtime implements memory_stats
                mem = None
            if mem is None and kind == "cpu":
                mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            out.append(DeviceInfo(kind, str(d.device_kind), mem))
        return out

    def load(
        self,
        config: ModelConfig,
        shard: Shard,
        tensors: TensorSource,
        dtype: str,
        *,
        max_context: int,
        max_sequences: int,
    ):
        """A JaxLlamaStage for `shard` on JAX's first default device."""
        import jax

        from cake.backends.jax.stage import JaxLlamaStage

        enable_compilation_cache()
        return JaxLlamaStage(
            config,
            shard,
            tensors,
            dtype,
            max_context,
            max_sequences,
            self.devices()[0],
            jax.devices()[0],
        )
