"""Jina / Cohere rerank: POST /v1/rerank.

    {"model", "query", "documents": [str | {"text": str}], "top_n", "return_documents"}
    -> {"model", "results": [{"index", "relevance_score", "document"?: {"text"}}], "usage": {"total_tokens"}}

Errors carry the message under the keys those clients read: ``{"message", "detail", "error"}``.

Long documents are truncated by default, as Cohere and Jina do: windowed where the model scores
windows, else cut to the model's limit. ``"truncation": false`` (the field Voyage and Jina-compatible
gateways use) makes a document too long for the model a 413 instead. ``rank_fields`` (Cohere v1) may
only name ``text``. Any other unknown field is a 422 naming it.
"""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..canonical import RerankRequest
from ..engine import Engine
from ..errors import InferenceError, ValidationError
from ..http import decode_json, endpoint, json_response, read_body, result_headers, scheduling_hints, until_disconnect


class TextDocument(msgspec.Struct):
    text: str


class RerankBody(msgspec.Struct, forbid_unknown_fields=True):
    query: str
    documents: list[str | TextDocument]
    model: str | None = None
    top_n: int | None = None
    return_documents: bool = False
    max_chunks_per_doc: int | None = None  # Cohere v1; windows are the model's setting here
    rank_fields: list[str] | None = None  # Cohere v1, for structured documents: only "text" here
    truncation: bool = True


def format_error(exc: InferenceError) -> dict:
    return {"message": exc.message, "detail": exc.message, "error": {"message": exc.message, "type": exc.error_type}}


def routes(engine: Engine) -> list[Route]:
    limit = engine.config.payload_limit_bytes

    async def rerank(request: Request) -> Response:
        body = decode_json(await read_body(request, limit), RerankBody)
        documents = [d if isinstance(d, str) else d.text for d in body.documents]
        if body.max_chunks_per_doc is not None and body.max_chunks_per_doc < 1:
            raise ValidationError("max_chunks_per_doc must be positive")
        if body.rank_fields is not None and body.rank_fields != ["text"]:
            raise ValidationError(f"rank_fields may only be [\"text\"] (documents are text), got {body.rank_fields}")
        priority, timeout_s = scheduling_hints(request)
        work = engine.rerank(
            RerankRequest(body.query, documents, model=body.model, top_n=body.top_n, truncate=body.truncation,
                          priority=priority, timeout_s=timeout_s)
        )
        result = await until_disconnect(request, work)
        results = []
        for ranked in result.ranked:
            entry: dict = {"index": ranked.index, "relevance_score": ranked.score}
            if body.return_documents:
                entry["document"] = {"text": documents[ranked.index]}
            results.append(entry)
        payload = {"model": result.model, "results": results, "usage": {"total_tokens": result.input_tokens}}
        return json_response(payload, headers=result_headers(result))

    return [Route("/v1/rerank", endpoint(engine, "/v1/rerank", format_error, rerank), methods=["POST"])]
