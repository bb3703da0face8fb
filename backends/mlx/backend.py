"""The MLX Backend class: Metal when MLX has it, else MLX's CPU device."""

from __future__ import annotations

import importlib.util
import os
from typing import ClassVar

from cake.backends.base import DeviceInfo
from cake.config import ModelConfig
from cake.shard import Shard
from cake.weights import TensorSource


class MlxBackend:
    name: ClassVar[str] = "mlx"

    @classmethod
    def is_available(cls) -> bool:
        if importlib.util.find_spec("mlx") is None:
            return False
        try:
            import mlx.core  # noqa: F401
        except ImportError:
            return False
        return True

    @classmethod
    def devices(cls) -> list[DeviceInfo]:
        """The device MLX computes on by default: one Metal GPU, or the CPU."""
        import mlx.core as mx

        # mx.device_info() is new (0.2x); older releases only have mx.metal's.
        info_fn = getattr(mx, "device_info", None) or mx.metal.device_info
        try:
            info = dict(info_fn())
        except Exception:
            info = {}
        if mx.metal.is_available() and mx.default_device().type == mx.gpu:
            mem = info.get("memory_size")
            name = str(info.get("device_name", "metal"))
            return [DeviceInfo("metal", name, int(mem) if mem else None)]
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return [DeviceInfo("cpu", f"mlx cpu ({info.get('device_name', 'cpu')})", mem)]

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
        """Load layers [shard.start, shard.end) onto MLX's default device."""
        from cake.backends.mlx.llama import MlxLlamaStage

        return MlxLlamaStage(
            config,
            shard,
            tensors,
            dtype,
            max_context,
            max_sequences,
            self.devices()[0],
        )
