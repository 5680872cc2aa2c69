"""Elasticsearch's inference API shapes, for direct use: POST /_inference/{task_type}/{inference_id}.

    POST /_inference/sparse_embedding/my-elser  {"input": ["text 1", "text 2"], "input_type": "ingest"}
    -> {"sparse_embedding": [{"is_truncated": false, "embedding": {"port": 2.12, "sky": 1.70}}, ...]}
    POST /_inference/text_embedding/my-e5       {"input": "hello"}
    -> {"text_embedding": [{"embedding": [0.01, -0.02, ...]}]}
    POST /_inference/embedding/my-clip  {"input": [{"content": {"type": "image", "value": "data:image/png;base64,..."}},
                                                  {"content": [{"type": "text", "value": "a red boat"}, {...}]}]}
    -> {"embeddings": [{"embedding": [0.01, ...]}, ...]}    (one vector per content group; images for models
                                                            that take them)
    POST /_inference/rerank/my-reranker  {"query": "q", "input": ["d1", "d2"], "top_n": 1, "return_documents": true}
    -> {"rerank": [{"index": 1, "relevance_score": 0.93, "text": "d2"}]}

The inference id names a served model. As in Elasticsearch, over-long inputs are truncated and
reported per input with ``is_truncated``; ``input_type`` search / ingest picks the scheduler lane;
``?timeout=30s`` bounds the wait. Errors come in Elasticsearch's shape:
``{"error": {"root_cause": [{"type", "reason"}], "type", "reason"}, "status": N}``.
"""

from __future__ import annotations

import re

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..canonical import EmbedRequest, RerankRequest, SparseEmbedRequest, as_list, content_groups
from ..engine import Engine
from ..errors import (
    InferenceError,
    ModelNotFound,
    Overloaded,
    Unauthorized,
    ValidationError,
)
from ..http import decode_json, endpoint, json_response, read_body, result_headers, scheduling_hints, until_disconnect
from ..info import TASKS, ModelInfo

# Elasticsearch's InputType values (case-insensitive) → the lane; None keeps the server's default.
INPUT_TYPE_LANES = {
    "search": "search",
    "internal_search": "search",
    "ingest": "ingest",
    "internal_ingest": "ingest",
    "classification": None,
    "clustering": None,
    "unspecified": None,
}
_TIME_UNITS = {"nanos": 1e-9, "micros": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TIME_VALUE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(nanos|micros|ms|s|m|h|d)\s*$")


# Elasticsearch's multimodal task (TaskType.EMBEDDING): served by text-embedding models, with images
# for those that take them.
EMBEDDING_TASK = "embedding"


class EmbeddingBody(msgspec.Struct):
    """``EmbeddingRequest``: ``input`` is a string, a content group or a list of them
    (``canonical.content_groups``)."""

    input: str | list | dict
    input_type: str | None = None
    task_settings: dict | None = None


class InferenceBody(msgspec.Struct):
    input: str | list[str]
    input_type: str | None = None
    task_settings: dict | None = None
    query: str | None = None
    top_n: int | None = None
    return_documents: bool | None = None


def format_error(exc: InferenceError) -> dict:
    if isinstance(exc, ModelNotFound):
        kind = "resource_not_found_exception"
    elif isinstance(exc, Unauthorized):
        kind = "security_exception"
    elif isinstance(exc, Overloaded):
        kind = "es_rejected_execution_exception"
    elif exc.status in (400, 413, 422):
        kind = "illegal_argument_exception"
    else:
        kind = "status_exception"
    cause = {"type": kind, "reason": exc.message}
    return {"error": {"root_cause": [cause], **cause}, "status": exc.status}


def parse_timeout(value: str | None) -> float | None:
    """Elasticsearch time values: "30s", "500ms", "1m" ... (None when absent)."""
    if value is None:
        return None
    match = _TIME_VALUE.match(value)
    if match is None:
        raise ValidationError(f"failed to parse timeout [{value}]: expected a number with a unit (ms, s, m, h, d)")
    return float(match.group(1)) * _TIME_UNITS[match.group(2)]


def lane_of(input_type: str | None, header_priority: str | None) -> str | None:
    if input_type is None:
        return header_priority
    try:
        return INPUT_TYPE_LANES[input_type.strip().lower()] or header_priority
    except KeyError:
        raise ValidationError(
            f"invalid input_type [{input_type}]; expected one of {', '.join(INPUT_TYPE_LANES)}"
        ) from None


def routes(engine: Engine) -> list[Route]:
    limit = engine.config.payload_limit_bytes

    def resolve(task_type: str, inference_id: str) -> ModelInfo:
        model = engine.info().find(inference_id)
        if model is None:
            raise ModelNotFound(f"Inference endpoint not found [{inference_id}]")
        # The multimodal task is served by the text-embedding models (images by those that take them).
        served_as = "text_embedding" if task_type == EMBEDDING_TASK else task_type
        if model.task != served_as:
            raise ValidationError(
                f"Incompatible task_type, the requested type [{task_type}] does not match the model type [{model.task}]"
            )
        return model

    async def infer(request: Request) -> Response:
        task_type = request.path_params["task_type"]
        inference_id = request.path_params["inference_id"]
        if task_type == EMBEDDING_TASK:
            return await embedding(request, resolve(EMBEDDING_TASK, inference_id))
        if task_type not in TASKS:
            served = ", ".join((*TASKS, EMBEDDING_TASK))
            raise ValidationError(f"task_type [{task_type}] is not served here (served: {served})")
        model = resolve(task_type, inference_id)
        model_id = model.id
        body = decode_json(await read_body(request, limit), InferenceBody)
        header_priority, header_timeout_s = scheduling_hints(request)
        timeout_s = parse_timeout(request.query_params.get("timeout")) or header_timeout_s
        inputs = as_list(body.input)
        lane = lane_of(body.input_type, header_priority)
        if task_type == "rerank":
            return await rerank(request, body, model_id, inputs, lane, timeout_s)
        common = {"model": model_id, "truncate": True, "priority": lane, "timeout_s": timeout_s}
        if task_type == "sparse_embedding":
            work = engine.embed_sparse(SparseEmbedRequest(inputs, return_terms=True, **common))
        else:
            task, prompt = model.lane_defaults(lane)
            work = engine.embed(EmbedRequest(inputs, task=task, prompt_name=prompt, **common))
        result = await until_disconnect(request, work)
        if task_type == "sparse_embedding":
            payload = {
                "sparse_embedding": [
                    {"is_truncated": truncated, "embedding": terms}
                    for terms, truncated in zip(result.term_weights(), result.truncated)
                ]
            }
        else:
            payload = {"text_embedding": [{"embedding": vector.tolist()} for vector in result.vectors]}
        return json_response(payload, headers=result_headers(result))

    async def embedding(request: Request, model: ModelInfo) -> Response:
        """The multimodal task: one vector per content group, ``{"embeddings": [{"embedding": [...]}]}``
        (GenericDenseEmbeddingFloatResults)."""
        body = decode_json(await read_body(request, limit), EmbeddingBody)
        header_priority, header_timeout_s = scheduling_hints(request)
        timeout_s = parse_timeout(request.query_params.get("timeout")) or header_timeout_s
        lane = lane_of(body.input_type, header_priority)
        task, prompt = model.lane_defaults(lane)
        work = engine.embed(EmbedRequest(content_groups(body.input), model=model.id, truncate=True, priority=lane,
                                         timeout_s=timeout_s, task=task, prompt_name=prompt))
        result = await until_disconnect(request, work)
        payload = {"embeddings": [{"embedding": vector.tolist()} for vector in result.vectors]}
        return json_response(payload, headers=result_headers(result))

    async def rerank(request: Request, body: InferenceBody, model_id: str, documents: list[str], lane: str | None,
                     timeout_s: float | None) -> Response:
        if body.query is None:
            raise ValidationError("rerank requires a [query]")
        settings = body.task_settings or {}
        top_n = body.top_n if body.top_n is not None else settings.get("top_n")
        return_documents = body.return_documents
        if return_documents is None:
            return_documents = bool(settings.get("return_documents", False))
        if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool)):
            raise ValidationError(f"top_n must be an integer, got {top_n!r}")
        work = engine.rerank(
            RerankRequest(body.query, documents, model=model_id, top_n=top_n, priority=lane, timeout_s=timeout_s)
        )
        result = await until_disconnect(request, work)
        entries = []
        for ranked in result.ranked:
            entry: dict = {"index": ranked.index, "relevance_score": ranked.score}
            if return_documents:
                entry["text"] = documents[ranked.index]
            entries.append(entry)
        return json_response({"rerank": entries}, headers=result_headers(result))

    path = "/_inference/{task_type}/{inference_id}"
    return [Route(path, endpoint(engine, "/_inference", format_error, infer), methods=["POST"])]
