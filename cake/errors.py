"""Errors a user can cause. The CLI prints them in one line and exits non-zero."""


class CakeError(Exception):
    """Base of every user-facing error: the message says what was wrong and what to do."""


class ModelError(CakeError):
    """A model folder, checkpoint or config that cake cannot use."""


class TokenizerError(CakeError):
    """A tokenizer file that cannot be loaded or used."""


class BackendError(CakeError):
    """An unknown, unavailable or failing backend."""


class ContextLengthError(CakeError):
    """A prompt or generation that does not fit in the model's context."""


class TopologyError(CakeError):
    """A topology file that does not match the model or is malformed."""


class NetworkError(CakeError):
    """A worker that cannot be reached, refused, or was lost."""
