"""Errors the service reports to callers; the transport maps each class to one gRPC status."""


class ServiceError(Exception):
    """Base class: `str(exc)` is the message the caller sees and should say what to change."""


class InvalidInput(ServiceError):
    """The request is malformed (INVALID_ARGUMENT)."""


class NotFound(ServiceError):
    """A named thing (a classification head) does not exist (NOT_FOUND)."""


class TooLarge(ServiceError):
    """The request is larger than the server's limits or capacity (RESOURCE_EXHAUSTED)."""


class NotReady(ServiceError):
    """The model is not loaded yet, or the server is shutting down (UNAVAILABLE)."""


class Unsupported(ServiceError):
    """The loaded model cannot do this, e.g. fill-mask without an LM head (FAILED_PRECONDITION)."""


class Overloaded(ServiceError):
    """The queue or the in-flight limit is full; retry after `retry_after_ms`
    (RESOURCE_EXHAUSTED, with the hint in the `retry-after-ms` trailer)."""

    def __init__(self, message: str, retry_after_ms: int):
        super().__init__(f"{message}; retry in about {retry_after_ms} ms")
        self.retry_after_ms = retry_after_ms


class Forbidden(ServiceError):
    """The operator switched this operation off (PERMISSION_DENIED)."""
