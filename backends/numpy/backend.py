"""The NumPy Backend class: always available, CPU only."""

from __future__ import annotations

import os
from typing import ClassVar

from cake.backends.base import DeviceInfo
from cake.config import ModelConfig
from cake.shard import Shard
from cake.weights import TensorSource


class NumpyBackend:
    name: ClassVar[str] = "numpy"

    @classmethod
    def is_available(cls) -> bool:
        return True

    @classmethod
    def devices(cls) -> list[DeviceInfo]:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return [DeviceInfo("cpu", "numpy", mem)]

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
        from cake.backends.numpy.llama import NumpyLlamaStage

        return NumpyLlamaStage(
            config,
            shard,
            tensors,
            dtype,
            max_context,
            max_sequences,
            self.devices()[0],
        )
