"""cake: run large language models split by layers across ordinary devices.

import cake
m = cake.load("path/to/model-or.gguf", backend="auto")
for piece in m.generate("The capital of France is", max_tokens=16, temperature=0):
    print(piece, end="")
"""

from cake.api import Model, load
from cake.backends.base import get_backend, register_backend
from cake.errors import CakeError
from cake.tokenizer import load_tokenizer

__version__ = "0.1.0"
__all__ = [
    "CakeError",
    "Model",
    "get_backend",
    "load",
    "load_tokenizer",
    "register_backend",
]
