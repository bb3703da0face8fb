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


class CacheFullError(CakeError):
    """A stage holds as many sequences as its cache allows."""


class PositionError(CakeError):
    """A step that starts a sequence past the positions a stage holds of it."""

    def __init__(self, seq_id: int, held: int, position: int) -> None:
        super().__init__(f"sequence {seq_id} is at position {held}, not {position}")
        self.seq_id, self.held, self.position = seq_id, held, position


class PlanError(CakeError):
    """No placement fits, or a plan cannot become a topology."""


class TopologyError(CakeError):
    """A topology file that does not match the model or is malformed."""


class NetworkError(CakeError):
    """A worker that cannot be reached, refused, or was lost."""


class WorkerLost(NetworkError):
    """The connection to a worker dropped, or it stopped answering."""


class ServerError(CakeError):
    """A server that `cake chat` cannot reach, that refused it, or that failed."""
