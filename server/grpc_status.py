"""gRPC plumbing shared by the gRPC dialects (``infercore.v1`` and the Open Inference Protocol), as
``http.py`` is for the HTTP ones: engine errors as gRPC status codes, and an overload's retry hints."""

from __future__ import annotations

import grpc

from .errors import (
    BackendError,
    DeadlineExceeded,
    InferenceError,
    MalformedRequest,
    MethodNotAllowed,
    ModelNotFound,
    ModelRetired,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    RouteNotFound,
    Unauthorized,
    ValidationError,
    retry_after_header,
)

# Engine error → gRPC status. Too many inputs, or an input over the token limit without truncation,
# is INVALID_ARGUMENT, not RESOURCE_EXHAUSTED: retrying the same request can never succeed, and
# gateways retry RESOURCE_EXHAUSTED. (A message over the receive limit is refused by gRPC itself,
# with RESOURCE_EXHAUSTED, before it reaches this code.)
GRPC_CODES: dict[type[InferenceError], grpc.StatusCode] = {
    ValidationError: grpc.StatusCode.INVALID_ARGUMENT,
    MalformedRequest: grpc.StatusCode.INVALID_ARGUMENT,
    PayloadTooLarge: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    ModelRetired: grpc.StatusCode.FAILED_PRECONDITION,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unauthorized: grpc.StatusCode.UNAUTHENTICATED,
    RouteNotFound: grpc.StatusCode.UNIMPLEMENTED,
    MethodNotAllowed: grpc.StatusCode.UNIMPLEMENTED,
    BackendError: grpc.StatusCode.INTERNAL,
}


def grpc_code(exc: InferenceError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in GRPC_CODES:
            return GRPC_CODES[cls]
    return grpc.StatusCode.INTERNAL


def retry_after_metadata(exc: InferenceError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata of an overload: ``retry-after`` (seconds, as HTTP's header) and
    ``grpc-retry-pushback-ms``, which gRPC clients with a retry policy wait for."""
    retry_after = retry_after_header(exc)
    if retry_after is None:
        return ()
    return (("retry-after", retry_after), ("grpc-retry-pushback-ms", str(int(exc.retry_after_s * 1e3))))
