"""MLX backend: Apple Metal on a Mac, the CPU elsewhere (`mlx[cpu]` on Linux).

Importing this package does not import MLX; `MlxBackend.is_available()` says
whether it is installed.
"""

from cake.backends.mlx.backend import MlxBackend

__all__ = ["MlxBackend"]
