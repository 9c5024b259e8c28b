"""Error types of the contract and the service. They know nothing of HTTP: ``service/errors.py``
holds the one table that maps them to statuses, and the CLI prints :class:`UserError` as one line."""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit code 2."""


class BundleError(ValueError):
    """A bundle that must not be served; the message names the file and the field."""


class ServiceError(Exception):
    """Base class: an answer to the client, not a bug."""

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class UnknownTask(ServiceError):
    pass


class UnsupportedMediaType(ServiceError):
    pass


class InvalidInput(ServiceError):
    """Undecodable image, malformed JSON or tensor, bad parameter."""


class PayloadTooLarge(ServiceError):
    """Body, pixel count or image count over its limit."""


class QueueFull(ServiceError):
    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message, {"Retry-After": str(retry_after_s)})


class DeadlineExceeded(ServiceError):
    pass


class NotReady(ServiceError):
    pass


class ClientClosed(ServiceError):
    """The client went away before its answer was ready (nobody reads the response)."""


class Unauthorized(ServiceError):
    """Admin route without the right bearer token (answered with ``WWW-Authenticate``)."""


class Forbidden(ServiceError):
    """Admin request for something outside what it may touch (a path outside the model directory)."""


class Conflict(ServiceError):
    """The request conflicts with the server's state (a reload already in progress)."""


class IncompatibleBundle(ServiceError):
    """A valid bundle that cannot replace the one served; the message names the field."""
