"""The API key check every front end (HTTP and gRPC) runs before a request reaches the engine."""

from __future__ import annotations

import hmac

from .errors import Unauthorized


def check_bearer(authorization: str | bytes | None, api_key: str | None, hint: str) -> None:
    """Pass when the server has no API key, or when ``authorization`` (the HTTP header or the gRPC
    metadata value) is ``Bearer <api_key>``: scheme case-insensitive, key compared in constant time.
    Otherwise raise ``Unauthorized``; ``hint`` says how to send the key (``'Authorization: Bearer <key>'``)."""
    if api_key is None:
        return
    if isinstance(authorization, bytes):
        authorization = authorization.decode("latin-1")
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise Unauthorized(f"missing or invalid API key: send {hint}")
