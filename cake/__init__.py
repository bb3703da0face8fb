"""cake: run large language models split by layers across ordinary devices.

import cake
m = cake.load("path/to/model-or.gguf", backend="auto")
for piece in m.generate("The capital of France is", max_tokens=16, temperature=0):
    print(piece, end="")
"""

from cake import heap as _heap

_heap.limit_arenas()  # before any thread has an arena of its own (see heap.py)

from cake.api import Model, load  # noqa: E402
from cake.backends.base import get_backend, register_backend  # noqa: E402
from cake.errors import CakeError  # noqa: E402
from cake.tokenizer import load_tokenizer  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "CakeError",
    "Model",
    "get_backend",
    "load",
    "load_tokenizer",
    "register_backend",
]
