"""NumPy backend: the readable reference every other backend is tested against."""

from cake.backends.numpy.backend import NumpyBackend

__all__ = ["NumpyBackend"]
