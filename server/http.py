"""HTTP plumbing shared by the dialects: body limits, JSON decoding into msgspec structs, auth,
timing headers, per-route metrics, and turning engine errors into each dialect's error body."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from .access import access_log, json_string, trace_id
from .auth import check_bearer
from .canonical import EmbedResult
from .engine import Engine
from .errors import InferenceError, NotReady, PayloadTooLarge, ValidationError, retry_after_header
from .json_limits import JsonLimits, active_limits, decode_body

log = logging.getLogger("infercore.http")
QUIET_ROUTES = frozenset({"/health", "/metrics"})

T = TypeVar("T")
ErrorFormatter = Callable[[InferenceError], Any]
Handler = Callable[[Request], Awaitable[Response]]

_encoder = msgspec.json.Encoder()


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_encoder.encode(body), status_code=status, headers=headers, media_type="application/json")


async def read_body(request: Request, limit_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit_bytes:
        raise PayloadTooLarge(f"request body of {declared} bytes is larger than the limit of {limit_bytes} bytes")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit_bytes:
            raise PayloadTooLarge(f"request body is larger than the limit of {limit_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_json(body: bytes, struct: type[T]) -> T:
    """``body`` decoded into ``struct`` within the request's JSON limits (server/json_limits.py)."""
    return decode_body(body, struct)


def scheduling_hints(request: Request, body_priority: str | None = None) -> tuple[str | None, float | None]:
    """(lane, timeout in seconds) from the ``X-Priority`` and ``X-Request-Timeout`` headers; a
    ``priority`` field of the body, when the dialect has one, wins over the header."""
    priority = request.headers.get("x-priority")
    timeout = request.headers.get("x-request-timeout")
    timeout_s = None
    if timeout is not None:
        try:
            timeout_s = float(timeout)
        except ValueError:
            raise ValidationError(f"X-Request-Timeout must be a number of seconds, got {timeout!r}") from None
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValidationError(f"X-Request-Timeout must be a positive number of seconds, got {timeout!r}")
    if body_priority is not None:
        return body_priority.strip().lower(), timeout_s
    return (priority.strip().lower() if priority else None), timeout_s


async def until_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``; if the client disconnects first, cancel it (queued inputs are then dropped).

    Call after the body has been read: the only message the server sends afterwards is the
    disconnect.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise ClientDisconnected()
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ClientDisconnected(Exception):
    """The client went away before the answer was ready; there is nobody to answer."""


# What the access line and request metrics say about the request ``endpoint`` is serving: filled by
# ``result_headers`` (model, tokens, lane), which every dialect calls with its result in the same task.
_request_facts: ContextVar[dict[str, Any] | None] = ContextVar("infercore_request_facts", default=None)


def result_headers(result: EmbedResult) -> dict[str, str]:
    """TEI's per-request headers (durations in milliseconds) plus the lane the request ran in.

    x-compute-time is the sum of the three stages, which do not overlap in time and all lie inside
    x-total-time; it is capped at the total so that rounding of per-input maxima (queue and inference
    are the slowest input's) can never make compute exceed total."""
    timings = result.timings
    compute_s = min(timings.tokenization_s + timings.queue_s + timings.inference_s, timings.total_s)
    facts = _request_facts.get()
    if facts is not None:
        facts.update(model=result.model, tokens=result.input_tokens, lane=result.lane)
    return {
        "x-lane": result.lane,
        "x-compute-time": f"{compute_s * 1e3:.3f}",
        "x-compute-characters": str(result.input_chars),
        "x-compute-tokens": str(result.input_tokens),
        "x-total-time": f"{timings.total_s * 1e3:.3f}",
        "x-tokenization-time": f"{timings.tokenization_s * 1e3:.3f}",
        "x-queue-time": f"{timings.queue_s * 1e3:.3f}",
        "x-inference-time": f"{timings.inference_s * 1e3:.3f}",
    }


def endpoint(
    engine: Engine,
    route: str,
    format_error: ErrorFormatter,
    handler: Handler,
    authenticate: bool = True,
    status_of: Callable[[InferenceError], int] | None = None,
) -> Handler:
    """Wrap a dialect handler: auth, error mapping in the dialect's shape (and, with ``status_of``,
    the dialect's status for an error), metrics, access log with the W3C trace id when sent."""

    limits = JsonLimits(engine.config.json_max_depth, engine.config.json_max_elements)

    async def wrapped(request: Request) -> Response:
        started = time.perf_counter()
        limits_token = active_limits.set(limits)
        facts: dict[str, Any] = {}
        context = _request_facts.set(facts)
        try:
            if authenticate:
                check_bearer(request.headers.get("authorization"), engine.config.api_key,
                             "'Authorization: Bearer <key>'")
            response = await handler(request)
        except InferenceError as exc:
            response = error_response(exc, format_error, status_of)
        except ClientDisconnected:
            # 499 (nginx's "client closed request") only reaches metrics and logs.
            response = Response(status_code=499)
        except Exception:
            log.exception("unexpected error on %s", route)
            response = error_response(InferenceError("internal server error"), format_error, status_of)
        finally:
            active_limits.reset(limits_token)
            _request_facts.reset(context)
        duration = time.perf_counter() - started
        model = facts.get("model", "")
        engine.metrics.observe_request(route, response.status_code, duration, model)
        if engine.config.access_log:
            tenant = request.scope.get("state", {}).get("tenant")  # mutual TLS: the client certificate's subject
            # Probes and scrapes come every few seconds from machines, not users: DEBUG, not INFO.
            level = logging.DEBUG if route in QUIET_ROUTES else logging.INFO
            access_log.log(
                level, "%s %s status=%d model=%s tokens=%s duration_ms=%.1f lane=%s trace_id=%s tenant=%s",
                request.method, route, response.status_code, model or "-", facts.get("tokens", "-"), duration * 1e3,
                facts.get("lane", "-"), trace_id(request.headers.get("traceparent")) or "-",
                json_string(tenant) if tenant else "-",
            )
        return response

    return wrapped


def error_response(
    exc: InferenceError, format_error: ErrorFormatter, status_of: Callable[[InferenceError], int] | None = None
) -> Response:
    headers = {}
    retry_after = retry_after_header(exc)
    if retry_after is not None:
        headers["retry-after"] = retry_after
    if exc.status == 401:
        headers["www-authenticate"] = "Bearer"
    if exc.status >= 500 and not isinstance(exc, NotReady):
        log.warning("request failed: %s", exc.message)
    return json_response(format_error(exc), status_of(exc) if status_of else exc.status, headers)
