"""The ASGI application: every dialect's routes over one engine, plus the server's lifecycle."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from types import FrameType

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from .dialects import cohere, cohere_v2, eis, elasticsearch, native, oip, openai, tei
from .engine import Engine
from .errors import InferenceError, MalformedRequest, MethodNotAllowed, RouteNotFound
from .http import json_response
from .shutdown import CloseWhenDraining, answer_accepted, stop_accepting

log = logging.getLogger("infercore.app")

# At shutdown, after the drain: what gRPC calls are left (idle streams, health watches) get this long.
GRPC_STOP_GRACE_S = 2.0

# Every HTTP dialect, in route-matching order; each has routes(engine) and format_error(exc). No two
# share a (path, method): TEI's is POST /, the Open Inference Protocol's GET /v2 and /v2/models/...,
# /v2/health/..., Cohere v2's POST /v2/embed and /v2/rerank (tests/test_fuzz.py checks every route).
HTTP_DIALECTS = (native, openai, cohere, cohere_v2, tei, elasticsearch, eis, oip)
# A 404/405 under one of these prefixes answers in that dialect's error shape (a path a dialect
# serves answers in its own; any other path in the native shape).
ERROR_SHAPE_PREFIXES = {"/_inference/": elasticsearch, "/v2/models/": oip, "/v2/health/": oip}


def create_app(engine: Engine, on_load_failure: Callable[[], None] | None = None, load: bool = True) -> Starlette:
    """The app serves at once (answering 503 while models load) and loads models in a thread."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        grpc_server = None
        if engine.config.grpc_port is not None:
            # On this event loop, beside HTTP; the drain (DrainingServer) covers its requests too.
            # Started before loading, so a port that cannot be bound fails the start at once.
            from .grpc_server import GrpcServer

            grpc_server = GrpcServer(engine)
            await grpc_server.start()
        app.state.grpc_server = grpc_server
        if load:
            threading.Thread(target=_load, args=(engine, on_load_failure), name="model-loader", daemon=True).start()
        yield
        if grpc_server is not None:
            await grpc_server.stop(GRPC_STOP_GRACE_S)
        engine.shutdown()

    dialect_routes = [(dialect.format_error, dialect.routes(engine)) for dialect in HTTP_DIALECTS]
    # 404/405 answers come in the error shape of the dialect that owns the path.
    formatter_by_path = {route.path: fmt for fmt, routes in dialect_routes for route in routes}
    formatter_by_prefix = {prefix: dialect.format_error for prefix, dialect in ERROR_SHAPE_PREFIXES.items()}

    async def http_error(request: Request, exc: HTTPException) -> Response:
        path = request.url.path
        if exc.status_code == 404:
            error: InferenceError = RouteNotFound(f"no route {request.method} {path}")
        elif exc.status_code == 405:
            error = MethodNotAllowed(f"method {request.method} is not allowed on {path}")
        else:
            error = MalformedRequest(str(exc.detail))
        format_error = formatter_by_path.get(path) or next(
            (fmt for prefix, fmt in formatter_by_prefix.items() if path.startswith(prefix)), native.format_error
        )
        engine.metrics.observe_request("unmatched" if exc.status_code == 404 else path, exc.status_code, 0.0, "")
        return json_response(format_error(error), exc.status_code, exc.headers)

    return Starlette(
        routes=[route for _, routes in dialect_routes for route in routes],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error},
        middleware=[Middleware(CloseWhenDraining, engine=engine)],
    )


def _load(engine: Engine, on_failure: Callable[[], None] | None) -> None:
    try:
        engine.load()
        log.info("ready: serving %s", ", ".join(engine.models))
    except Exception:
        log.error("model loading failed: %s", engine.failure)
        if on_failure is not None:
            on_failure()


class DrainingServer(uvicorn.Server):
    """uvicorn with a drain on SIGTERM/SIGINT: readiness turns false and new requests get 503 at
    once (with ``Connection: close``), admitted requests finish (up to ``drain_timeout_s``), then the
    server stops accepting, answers every connection it accepted, and the process exits 0. A second
    SIGINT forces the exit, as in plain uvicorn."""

    def __init__(self, config: uvicorn.Config, engine: Engine, drain_timeout_s: float):
        super().__init__(config)
        self.engine = engine
        self.drain_timeout_s = drain_timeout_s
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining:
            if sig == signal.SIGINT:
                self.force_exit = True
                self.should_exit = True
            return
        self._draining = True
        self.engine.begin_drain()
        threading.Thread(target=self._exit_when_drained, name="drain", daemon=True).start()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Stop accepting before closing anything, and answer every connection accepted until then
        (server/shutdown.py); then uvicorn's shutdown finishes the requests in progress."""
        if not self.force_exit:
            await stop_accepting(self.servers)
            await answer_accepted(self.server_state.connections)
        await super().shutdown(sockets)

    def _exit_when_drained(self) -> None:
        deadline = time.monotonic() + self.drain_timeout_s
        while self.engine.admitted and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.engine.admitted:
            log.warning("drain timeout: %d requests still in progress", self.engine.admitted)
        self.should_exit = True
