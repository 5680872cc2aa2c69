"""The Elastic Inference Service wire protocol, so that an unmodified Elasticsearch node with
``xpack.inference.elastic.url`` pointing here uses this server as its inference service.

    POST /api/v1/embed/text/sparse   {"input": [...], "model", "usage_context"?}
         -> {"data": [{"token": weight, ...}, ...], "meta": {"usage": {"total_tokens"}}}
    POST /api/v1/embed/text/dense    {"input": [...], "model", "usage_context"?, "dimensions"?}
         -> {"data": [[...], ...], "meta": {"usage": {"total_tokens"}}}
    POST /api/v1/embed/dense         {"input": [{"content": [{"type": "image" | "text", "format", "value"}, ...]}],
                                      "model", "usage_context"?, "dimensions"?}
         -> {"data": [[...], ...], "meta": {"usage": {"total_tokens"}}}   (one vector per group)
    POST /api/v1/rerank/text/text-similarity
         {"query": str | {"type", "format", "value"}, "documents": [str | {...}], "model", "top_n"?}
         -> {"results": [{"index", "relevance_score"}]}
    GET  /api/v1/authorizations      -> {"models": [{"model_name", "task_types"}]}
    GET  /api/v2/authorizations      -> {"inference_endpoints": [{"id", "model_name", "task_types", ...}]}
                                        (a model that takes images: task_types embed/dense / embedding)

The lane comes from ``usage_context`` or the ``X-elastic-product-use-case`` header (which newer
Elasticsearch builds may send twice). Inputs longer than the model's window are truncated, as the
service does. Errors are ``{"error": "message"}`` with the statuses Elasticsearch retries on: 429
(with Retry-After) and 503 are retried, 400 is not; never 502/504. Only models this server really
serves are listed by the authorization endpoints.
"""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..canonical import EmbedRequest, RerankRequest, SparseEmbedRequest, as_list, content_groups
from ..engine import Engine
from ..errors import InferenceError, ModelNotFound, ValidationError
from ..http import (
    decode_json,
    endpoint,
    json_response,
    read_body,
    result_headers,
    scheduling_hints,
    until_disconnect,
)
from ..info import TASKS

# task → EIS task type (the Elasticsearch task type is the task's own name)
TASK_TYPES = {
    "sparse_embedding": "embed/text/sparse",
    "text_embedding": "embed/text/dense",
    "rerank": "rerank/text/text-similarity",
}
assert set(TASK_TYPES) == set(TASKS), "every task needs its EIS task type"
# Text-embedding models that also take images are Elasticsearch's multimodal ``embedding`` task,
# EIS task type ``embed/dense`` (route /api/v1/embed/dense), as Elastic serves .jina-clip-v2.
MULTIMODAL_TASK_TYPES = {"eis": "embed/dense", "elasticsearch": "embedding"}
# Catalog ids whose EIS model name or preconfigured endpoint id differ from the id itself.
EIS_NAMES: dict[str, tuple[str, str]] = {
    "elser_model_2": ("elser_model_2", ".elser-2-elastic"),
    "jina-reranker-v2-base-multilingual": ("jina-reranker-v2", ".jina-reranker-v2"),
}
RELEASE_DATE = "2024-05-01"  # required by the v2 parser; the catalog holds no per-model dates
SENTENCE_CHUNKING = {"strategy": "sentence", "max_chunk_size": 250, "sentence_overlap": 1}
USE_CASE_LANES = {"internal_search": "search", "search": "search", "internal_ingest": "ingest", "ingest": "ingest"}


class TypedString(msgspec.Struct):
    """Newest Elasticsearch builds send strings as ``{"type": "text", "format": "text", "value"}``."""

    value: str
    type: str = "text"
    format: str = "text"


class EmbedBody(msgspec.Struct):
    input: list[str] | str
    model: str
    usage_context: str | None = None
    dimensions: int | None = None


class MultimodalEmbedBody(msgspec.Struct):
    """``ElasticInferenceServiceDenseEmbeddingsRequestEntity`` for the embedding task: ``input`` a
    list of ``{"content": [{"type", "format", "value"}, ...]}`` groups (``canonical.content_groups``)."""

    input: list | dict | str
    model: str
    usage_context: str | None = None
    dimensions: int | None = None


class RerankBody(msgspec.Struct):
    query: str | TypedString
    documents: list[str | TypedString]
    model: str
    top_n: int | None = None


def format_error(exc: InferenceError) -> dict:
    return {"error": exc.message}


def status_of(exc: InferenceError) -> int:
    """Elasticsearch retries 429/500/503 and gives up on 400; 422 means nothing special to it."""
    return 400 if exc.status == 422 else exc.status


def eis_names(model_id: str) -> tuple[str, str]:
    """(EIS model name, preconfigured endpoint id) of a served model."""
    return EIS_NAMES.get(model_id, (model_id, f".{model_id}"))


def text_of(value: str | TypedString) -> str:
    if isinstance(value, str):
        return value
    if value.type != "text":
        raise ValidationError(f"only text inputs are served here, got an input of type {value.type!r}")
    return value.value


def hints(request: Request, usage_context: str | None = None) -> tuple[str | None, float | None]:
    """(lane, timeout): the lane from usage_context, else X-elastic-product-use-case, else X-Priority."""
    priority, timeout_s = scheduling_hints(request)
    return lane_of(request, usage_context) or priority, timeout_s


def lane_of(request: Request, usage_context: str | None) -> str | None:
    if usage_context is not None:
        lane = USE_CASE_LANES.get(usage_context.strip().lower())
        if lane is not None:
            return lane
    for value in request.headers.getlist("x-elastic-product-use-case"):
        for part in value.split(","):  # a header sent twice may also arrive folded into one
            lane = USE_CASE_LANES.get(part.strip().lower())
            if lane is not None:
                return lane
    return None


def served(engine: Engine) -> list[tuple[str, str]]:
    """(model id, task) of every model a request may name, cross-encoders and stand-ins included."""
    return [(m.id, m.task) for m in engine.info().models]


def routes(engine: Engine) -> list[Route]:
    limit = engine.config.payload_limit_bytes

    def resolve(name: str, task: str) -> str:
        """The served model that the EIS model name ``name`` means."""
        for model_id, model_task in served(engine):
            if name in (model_id, eis_names(model_id)[0]):
                if model_task != task:
                    raise ValidationError(f"model {name!r} serves {model_task}, not {task}")
                return model_id
        names = sorted(eis_names(model_id)[0] for model_id, model_task in served(engine) if model_task == task)
        raise ModelNotFound(f"model {name!r} is not served here; {task} models served: {names}")

    async def sparse(request: Request) -> Response:
        body = decode_json(await read_body(request, limit), EmbedBody)
        model_id = resolve(body.model, "sparse_embedding")
        lane, timeout_s = hints(request, body.usage_context)
        work = engine.embed_sparse(SparseEmbedRequest(
            as_list(body.input), model=model_id, truncate=True, priority=lane, timeout_s=timeout_s, return_terms=True,
        ))
        result = await until_disconnect(request, work)
        payload = {
            "data": result.term_weights(),
            "meta": {"usage": {"total_tokens": result.input_tokens}},
        }
        return json_response(payload, headers=result_headers(result))

    async def dense(request: Request) -> Response:
        body = decode_json(await read_body(request, limit), EmbedBody)
        model_id = resolve(body.model, "text_embedding")
        lane, timeout_s = hints(request, body.usage_context)
        task, prompt = engine.info().model(model_id).lane_defaults(lane)
        work = engine.embed(EmbedRequest(
            as_list(body.input), model=model_id, truncate=True, dimensions=body.dimensions, priority=lane,
            timeout_s=timeout_s, task=task, prompt_name=prompt,
        ))
        result = await until_disconnect(request, work)
        headers = result_headers(result)
        headers["x-truncated-inputs"] = str(sum(result.truncated))
        payload = {
            "data": [vector.tolist() for vector in result.vectors],
            "meta": {"usage": {"total_tokens": result.input_tokens}},
        }
        return json_response(payload, headers=headers)

    async def multimodal(request: Request) -> Response:
        """One vector per content group, ``{"data": [[...], ...]}`` (the dense response entity). A
        group of several items is the normalised mean of their vectors (canonical.InputGroup);
        Elasticsearch itself refuses such groups for every service today."""
        body = decode_json(await read_body(request, limit), MultimodalEmbedBody)
        model_id = resolve(body.model, "text_embedding")
        lane, timeout_s = hints(request, body.usage_context)
        task, prompt = engine.info().model(model_id).lane_defaults(lane)
        work = engine.embed(EmbedRequest(
            content_groups(body.input), model=model_id, truncate=True, dimensions=body.dimensions, priority=lane,
            timeout_s=timeout_s, task=task, prompt_name=prompt,
        ))
        result = await until_disconnect(request, work)
        payload = {
            "data": [vector.tolist() for vector in result.vectors],
            "meta": {"usage": {"total_tokens": result.input_tokens}},
        }
        return json_response(payload, headers=result_headers(result))

    async def rerank(request: Request) -> Response:
        body = decode_json(await read_body(request, limit), RerankBody)
        model_id = resolve(body.model, "rerank")
        lane, timeout_s = hints(request)
        work = engine.rerank(RerankRequest(
            text_of(body.query), [text_of(d) for d in body.documents], model=model_id, top_n=body.top_n,
            priority=lane, timeout_s=timeout_s,
        ))
        result = await until_disconnect(request, work)
        # Elasticsearch's per-entry parser is strict: index and relevance_score only.
        payload = {"results": [{"index": r.index, "relevance_score": r.score} for r in result.ranked]}
        return json_response(payload, headers=result_headers(result))

    async def authorizations_v1(request: Request) -> Response:
        # Strict parser on Elasticsearch's side: exactly these keys.
        models = [
            {"model_name": eis_names(model_id)[0], "task_types": [TASK_TYPES[task]]}
            for model_id, task in served(engine) if task in TASK_TYPES
        ]
        return json_response({"models": models})

    async def authorizations_v2(request: Request) -> Response:
        endpoints = []
        for model in engine.info().models:
            name, endpoint_id = eis_names(model.id)
            task = model.task
            multimodal = task == "text_embedding" and model.image_input
            entry: dict = {
                "id": endpoint_id,
                "model_name": name,
                "task_types": dict(MULTIMODAL_TASK_TYPES) if multimodal else {"eis": TASK_TYPES[task],
                                                                              "elasticsearch": task},
                "status": "ga",
                "release_date": RELEASE_DATE,
                "properties": ["multimodal"] if multimodal else [],
            }
            if model.end_of_life_date is not None:
                entry["end_of_life_date"] = model.end_of_life_date.isoformat()
            if task == "text_embedding":
                entry["configuration"] = {"similarity": model.similarity, "dimensions": model.dimensions,
                                          "element_type": "float", "chunking_settings": SENTENCE_CHUNKING}
            elif task == "sparse_embedding":
                entry["configuration"] = {"chunking_settings": SENTENCE_CHUNKING}
            endpoints.append(entry)
        return json_response({"inference_endpoints": endpoints})

    def route(path: str, handler, methods: list[str]) -> Route:
        return Route(path, endpoint(engine, path, format_error, handler, status_of=status_of), methods=methods)

    return [
        route("/api/v1/embed/text/sparse", sparse, ["POST"]),
        route("/api/v1/embed/text/dense", dense, ["POST"]),
        route("/api/v1/embed/dense", multimodal, ["POST"]),
        route("/api/v1/rerank/text/text-similarity", rerank, ["POST"]),
        route("/api/v1/authorizations", authorizations_v1, ["GET"]),
        route("/api/v2/authorizations", authorizations_v2, ["GET"]),
    ]
