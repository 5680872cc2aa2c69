"""Shared by the hostile-input tests (tests/test_hostile_input.py) and the fuzz suite (tests/test_fuzz.py):
an in-process server over tiny dense, sparse and cross-encoder models with HTTP and gRPC, small
limits so that every limit is reachable with small inputs, a log capture, and the checks every
answer must pass.

- ``dialect_of(path)``: which dialect owns a path, from the dialects' own route tables (so a new route
  is covered without editing this file), and ``error_shape`` / ``assert_dialect_error``: an error body
  must have exactly the key structure of that dialect's ``format_error``.
- ``LogCapture``: every record any logger emits while a test runs, to prove that no request text (a
  canary planted in every generated input) and no traceback reached the log.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
from starlette.routing import Route

from infercore.models.repository import ModelSource
from infercore.server.app import ERROR_SHAPE_PREFIXES, HTTP_DIALECTS
from infercore.server.config import ServerConfig
from infercore.server.dialects import native
from infercore.server.engine import Engine
from infercore.server.errors import InferenceError
from tests.tiny_checkpoints import build_bert_with_head

API_KEY = "hostile-test-key-0b7c"
AUTH = {"authorization": f"Bearer {API_KEY}"}
MAX_CLIENT_BATCH = 8
PAYLOAD_LIMIT_BYTES = 64 * 1024
JSON_MAX_DEPTH = 16
JSON_MAX_ELEMENTS = 2000
# Planted in generated inputs: it must never show up in a log line.
CANARY = "qzxcanary"
DIALECTS: tuple[ModuleType, ...] = HTTP_DIALECTS
MODELS = ("dense", "sparse", "cross")


def build_engine(root: Path, tiny_bert_dir: Path, **config: Any) -> Engine:
    """A loaded engine serving a tiny dense model, a tiny SPLADE-style masked LM and a tiny
    cross-encoder, with this module's limits, the API key and a gRPC port (0: a free one)."""
    sparse = build_bert_with_head(root / "sparse", "BertForMaskedLM", "bert-tiny", seed=2)
    cross = build_bert_with_head(root / "cross", "BertForSequenceClassification", "bert-tiny", seed=1, num_labels=1)
    settings = dict(
        models=[ModelSource("dense", tiny_bert_dir), ModelSource("sparse", sparse), ModelSource("cross", cross)],
        api_key=API_KEY, max_client_batch_size=MAX_CLIENT_BATCH, payload_limit_bytes=PAYLOAD_LIMIT_BYTES,
        json_max_depth=JSON_MAX_DEPTH, json_max_elements=JSON_MAX_ELEMENTS, grpc_port=0,
        cpu_workers=1, tokenization_workers=1, auto_truncate=True,
    )
    engine = Engine(ServerConfig(**{**settings, **config}))
    engine.load()
    assert engine.state == "ready", engine.failure
    return engine


def route_table(engine: Engine) -> list[tuple[Route, ModuleType]]:
    """Every route every dialect serves, with its dialect."""
    return [(route, dialect) for dialect in DIALECTS for route in dialect.routes(engine)]


def dialect_of(engine: Engine, path: str) -> ModuleType:
    """The dialect whose error shape answers ``path``, as server/app.py picks it (a served path its
    dialect's, unknown paths under ``ERROR_SHAPE_PREFIXES`` that dialect's, others native)."""
    for route, dialect in route_table(engine):
        if route.path_regex.match(path):
            return dialect
    return next((d for prefix, d in ERROR_SHAPE_PREFIXES.items() if path.startswith(prefix)), native)


def error_shape(value: Any) -> Any:
    """The key structure of a JSON value: dicts by their keys (recursively), lists by their first
    element, anything else as ``None``."""
    if isinstance(value, dict):
        return {key: error_shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [error_shape(value[0])] if value else []
    return None


def assert_dialect_error(response: httpx.Response, dialect: ModuleType) -> None:
    """``response`` is JSON with exactly the key structure of ``dialect``'s error body, and carries
    a message."""
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    expected = error_shape(dialect.format_error(InferenceError("x")))
    assert error_shape(body) == expected, (dialect.__name__, body)
    assert "internal server error" not in response.text, response.text


# The test's own HTTP client logs request URLs; only what the server side logs counts.
CLIENT_LOGGERS = ("httpx", "httpcore", "hpack")


class LogCapture(logging.Handler):
    """Every record the server side logs (root logger, DEBUG and up, the test's HTTP client left out)
    while installed."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._previous_level = logging.root.level

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] not in CLIENT_LOGGERS:
            self.records.append(record)

    def __enter__(self) -> LogCapture:
        logging.root.addHandler(self)
        logging.root.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.root.removeHandler(self)
        logging.root.setLevel(self._previous_level)

    def text(self) -> str:
        lines = []
        for record in self.records:
            lines.append(record.getMessage())
            if record.exc_info:
                lines.append(logging.Formatter().formatException(record.exc_info))
        return "\n".join(lines)

    def tracebacks(self) -> list[str]:
        return [record.getMessage() for record in self.records if record.exc_info]

    def clear(self) -> None:
        self.records.clear()
