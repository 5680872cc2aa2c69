"""Errors the engine raises, each with the HTTP status it maps to.

Dialects turn these into their own error bodies; the status and the message stay the same in every
dialect. Messages name the problem and never include request text.
"""

from __future__ import annotations


class InferenceError(Exception):
    status = 500
    error_type = "Backend"
    # Seconds after which a retry may succeed; set by errors that say when (Overloaded).
    retry_after_s: float | None = None

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class MalformedRequest(InferenceError):
    """The body is not JSON at all."""

    status = 400
    error_type = "Validation"


class ValidationError(InferenceError):
    """Well-formed JSON that breaks the API's rules (wrong types, empty inputs, bad options)."""

    status = 422
    error_type = "Validation"


class PayloadTooLarge(InferenceError):
    """Too many inputs, too large a body, or an input over the token limit without truncation."""

    status = 413
    error_type = "Validation"


class ModelNotFound(InferenceError):
    status = 404
    error_type = "ModelNotFound"


class ModelRetired(InferenceError):
    """The model is past its end-of-life date."""

    status = 410
    error_type = "ModelRetired"


class RouteNotFound(InferenceError):
    status = 404
    error_type = "NotFound"


class MethodNotAllowed(InferenceError):
    status = 405
    error_type = "Validation"


class Unauthorized(InferenceError):
    status = 401
    error_type = "Unauthorized"


class Overloaded(InferenceError):
    status = 429
    error_type = "Overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(InferenceError):
    """Loading, draining or a model that failed its health check."""

    status = 503
    error_type = "Unhealthy"


class DeadlineExceeded(InferenceError):
    """The request's deadline passed before its inputs were computed (503: the server was too busy
    to answer in time; clients such as Elasticsearch retry a 503)."""

    status = 503
    error_type = "DeadlineExceeded"


class BackendError(InferenceError):
    """The model failed on valid input (a bug or a device fault), not the client's fault."""

    status = 500
    error_type = "Backend"


def retry_after_header(exc: InferenceError) -> str | None:
    """The ``Retry-After`` value of an error that says when to retry: whole seconds, at least 1
    (HTTP's header and gRPC's ``retry-after`` metadata); None for other errors."""
    if exc.retry_after_s is None:
        return None
    return str(max(1, round(exc.retry_after_s)))
