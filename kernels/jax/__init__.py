"""JAX kernels: packed weights decoded inside the jitted step (see dequant.py)."""

from cake.kernels.jax.dequant import dequantize, matmul

__all__ = ["dequantize", "matmul"]
