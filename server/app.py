"""The ASGI application: every dialect's routes over one engine, plus the server's lifecycle."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from .dialects import native, openai
from .engine import Engine
from .http import json_response

log = logging.getLogger("infercore.app")


def create_app(engine: Engine, on_load_failure: Callable[[], None] | None = None, load: bool = True) -> Starlette:
    """The app serves at once (answering 503 while models load) and loads models in a thread."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if load:
            threading.Thread(target=_load, args=(engine, on_load_failure), name="model-loader", daemon=True).start()
        yield
        engine.shutdown()

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        detail = getattr(exc, "detail", "error")
        if status == 404:
            detail = f"no route {request.method} {request.url.path}"
        elif status == 405:
            detail = f"method {request.method} is not allowed on {request.url.path}"
        return json_response({"error": detail, "error_type": "Validation"}, status)

    return Starlette(
        routes=native.routes(engine) + openai.routes(engine),
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error},
    )


def _load(engine: Engine, on_failure: Callable[[], None] | None) -> None:
    try:
        engine.load()
        log.info("ready: serving %s", ", ".join(engine.models))
    except Exception:
        log.error("model loading failed: %s", engine.failure)
        if on_failure is not None:
            on_failure()
