"""cake: run large language models split by layers across ordinary devices."""

__version__ = "0.1.0"
