"""Tensor backends (installed as `cake.backends`): one package per backend."""

from cake.backends.base import (
    Backend,
    DeviceInfo,
    StageModel,
    Step,
    auto_backend,
    available_backends,
    get_backend,
    register_backend,
)

__all__ = [
    "Backend",
    "DeviceInfo",
    "StageModel",
    "Step",
    "auto_backend",
    "available_backends",
    "get_backend",
    "register_backend",
]
