"""The access log both transports write (HTTP in ``http.endpoint``, gRPC in ``dialects/grpc.py``): one
line per request at INFO, metadata only (never inputs or outputs), on a logger of its own so that it
can be routed apart; ``--no-access-log`` turns it off."""

from __future__ import annotations

import logging

import msgspec

access_log = logging.getLogger("infercore.access")


def trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` header (``00-<32 hex>-<16 hex>-<2 hex>``), None when the
    header is absent or malformed (nothing the client wrote reaches the log unchecked)."""
    if traceparent is None:
        return None
    parts = traceparent.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or not all(c in "0123456789abcdef" for c in parts[1]):
        return None
    return parts[1]


def json_string(value: str) -> str:
    """``value`` quoted and escaped as a JSON string: one log line, whatever characters it holds."""
    return msgspec.json.encode(value).decode()
