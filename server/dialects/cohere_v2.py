"""Cohere's embed and v2 rerank APIs: POST /v2/embed, /v1/embed and /v2/rerank, as ``cohere.ClientV2``
and ``cohere.Client`` call them (Cohere's v1 rerank is /v1/rerank, server/dialects/cohere.py).

    /v2/embed  {"model", "texts", "input_type", "embedding_types"?, "output_dimension"?, "truncate"?,
                "max_tokens"?, "priority"?}
      -> {"id", "response_type": "embeddings_by_type", "embeddings": {"float": [[...]], "int8": ...},
          "texts", "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens"}}}
    /v2/rerank {"model", "query", "documents": [str], "top_n"?, "max_tokens_per_doc"?, "return_documents"?,
                "truncation"?, "priority"?}
      -> {"id", "results": [{"index", "relevance_score", "document"?: {"text"}}], "meta": {...}}

Embed: ``input_type`` (required by Cohere, optional here) picks the model's prompt and task for that
use (server/input_types.py). ``embedding_types`` (default ``["float"]``) are float, int8, uint8, binary,
ubinary (server/quantize.py) and base64 (little-endian float32). ``output_dimension`` is a Matryoshka
cut, renormalised. ``truncate``: ``END`` (the default here, as in Cohere's API) cuts the end of a long
input, ``START`` its start, ``NONE`` answers 413. ``max_tokens`` caps each input's tokens below the
model's limit (the cut follows ``truncate``).

/v1/embed takes the same body; without ``embedding_types`` it answers v1's ``"response_type":
"embeddings_floats"`` with ``"embeddings": [[...]]``, with them the by-type shape above.

Rerank: documents are cut to ``max_tokens_per_doc`` tokens when it is sent; otherwise long documents
are windowed or cut as the model does by default (Cohere truncates by default too). ``truncation``
false (Voyage's and Portkey's name for it) makes a document too long for the model a 413 instead.
``return_documents`` (earlier v2 clients) adds each document's text. Cohere's ``priority`` is accepted
and ignored (lanes are chosen by the X-Priority header); every other unknown field is a 422.

Errors: ``{"message": "..."}``, which the Cohere clients read into their error classes by status.
"""

from __future__ import annotations

import base64
import uuid
from typing import Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..canonical import EmbedRequest, RerankRequest
from ..engine import Engine
from ..errors import InferenceError, ValidationError
from ..http import decode_json, endpoint, json_response, read_body, result_headers, scheduling_hints, until_disconnect
from ..input_types import cohere_input_type
from ..quantize import quantize

V2_EMBEDDING_TYPES = ("float", "int8", "uint8", "binary", "ubinary", "base64")


class EmbedBody(msgspec.Struct, forbid_unknown_fields=True):
    texts: list[str]
    model: str | None = None
    input_type: str | None = None
    embedding_types: list[str] | None = None
    output_dimension: int | None = None
    truncate: Literal["NONE", "START", "END"] = "END"
    max_tokens: int | None = None
    priority: int | None = None


class RerankBody(msgspec.Struct, forbid_unknown_fields=True):
    query: str
    documents: list[str]
    model: str | None = None
    top_n: int | None = None
    max_tokens_per_doc: int | None = None
    return_documents: bool = False
    truncation: bool = True
    priority: int | None = None


def format_error(exc: InferenceError) -> dict:
    return {"message": exc.message}


def meta(tokens: int) -> dict:
    return {"api_version": {"version": "2"}, "billed_units": {"input_tokens": tokens}}


def embeddings_of_type(vectors: list, embedding_type: str) -> list:
    if embedding_type == "base64":
        return [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
    return [quantize(v, embedding_type) for v in vectors]


def routes(engine: Engine) -> list[Route]:
    limit = engine.config.payload_limit_bytes

    async def embed(request: Request, v1: bool = False) -> Response:
        body = decode_json(await read_body(request, limit), EmbedBody)
        types = body.embedding_types or ["float"]
        unknown = [t for t in types if t not in V2_EMBEDDING_TYPES]
        if unknown:
            raise ValidationError(
                f"embedding_types must be among {', '.join(V2_EMBEDDING_TYPES)}, got {unknown[0]!r}"
            )
        model = engine.info().serving(body.model, "text_embedding")
        task, prompt = (None, None) if body.input_type is None else cohere_input_type(model, body.input_type)
        texts = body.texts
        if body.max_tokens is not None:
            texts = await engine.cut_to_tokens(model.id, texts, body.max_tokens, keep_end=body.truncate == "START")
        priority, timeout_s = scheduling_hints(request)
        work = engine.embed(
            EmbedRequest(
                inputs=texts,
                model=model.id,
                truncate=body.truncate != "NONE",
                truncate_left=body.truncate == "START",
                prompt_name=prompt,
                dimensions=body.output_dimension,
                task=task,
                priority=priority,
                timeout_s=timeout_s,
            )
        )
        result = await until_disconnect(request, work)
        if v1 and body.embedding_types is None:
            response_type, embeddings = "embeddings_floats", [v.tolist() for v in result.vectors]
        else:
            response_type = "embeddings_by_type"
            embeddings = {t: embeddings_of_type(result.vectors, t) for t in dict.fromkeys(types)}
        payload = {
            "id": uuid.uuid4().hex,
            "response_type": response_type,
            "embeddings": embeddings,
            "texts": body.texts,
            "meta": meta(result.input_tokens),
        }
        return json_response(payload, headers=result_headers(result))

    async def rerank(request: Request) -> Response:
        body = decode_json(await read_body(request, limit), RerankBody)
        documents = body.documents
        if body.max_tokens_per_doc is not None and documents:
            reranker = engine.info().serving(body.model, "rerank")
            # the bi-encoder stand-in reads the documents with its embedding model's tokenizer
            tokenizer_of = reranker.embedding_model or reranker.id
            documents = await engine.cut_to_tokens(tokenizer_of, documents, body.max_tokens_per_doc, keep_end=False)
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
                entry["document"] = {"text": body.documents[ranked.index]}
            results.append(entry)
        payload = {"id": uuid.uuid4().hex, "results": results, "meta": meta(result.input_tokens)}
        return json_response(payload, headers=result_headers(result))

    async def embed_v1(request: Request) -> Response:
        return await embed(request, v1=True)

    return [
        Route("/v2/embed", endpoint(engine, "/v2/embed", format_error, embed), methods=["POST"]),
        Route("/v1/embed", endpoint(engine, "/v1/embed", format_error, embed_v1), methods=["POST"]),
        Route("/v2/rerank", endpoint(engine, "/v2/rerank", format_error, rerank), methods=["POST"]),
    ]
