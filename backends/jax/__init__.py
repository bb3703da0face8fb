"""JAX backend: the whole stage step jitted by XLA, on CPU, GPU or TPU."""

from cake.backends.jax.backend import JaxBackend

__all__ = ["JaxBackend"]
