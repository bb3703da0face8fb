"""Replacing a function inside JAX's private modules, for the wrappers that
JAX has no public hook for (cache_writes, compile_threads)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def replace(
    module: str, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> Callable[..., Any] | None:
    """Put `wrap(original)` in the place of `module.name` and return the
    original; None where this JAX has no such function (nothing replaced).
    JAX looks such functions up on their module at each call, so the wrapper
    is what it calls from then on."""
    try:
        mod = importlib.import_module(module)
    except ImportError:  # pragma: no cover - a JAX laid out otherwise
        return None
    original = getattr(mod, name, None)
    if original is None:  # pragma: no cover
        return None
    setattr(mod, name, wrap(original))
    return original
