"""The native API, compatible with Hugging Face TEI where TEI has the route.

POST /embed, /embed_sparse, /rerank, /tokenize, /decode; GET /health, /info, /v1/models, /metrics.
``/embed`` also takes images for models that embed them: ``{"inputs": [{"image": "<base64 | data URI>"},
"text"]}`` answers one vector per input, in order, text and image vectors in one space.
Errors: ``{"error": "...", "error_type": "..."}``.

``/embed_sparse`` answers TEI's ``[[{"index", "value"}]]`` (term ids); with ``?format=tokens`` it
answers ``[{"<token>": weight}]``, the shape Elasticsearch's ``hugging_face`` service parses for
sparse embeddings, with tokens spelled as Elasticsearch stores them (``canonical.spell_token``).
"""

from __future__ import annotations

from typing import Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..canonical import (
    DecodeRequest,
    EmbedRequest,
    RerankRequest,
    SparseEmbedRequest,
    TokenizeRequest,
    as_list,
    text_or_image,
)
from ..engine import Engine
from ..errors import InferenceError, NotReady, ValidationError
from ..http import decode_json, endpoint, json_response, read_body, result_headers, scheduling_hints, until_disconnect
from ..info import BI_ENCODER, ModelInfo

TruncationDirection = Literal["right", "left", "Right", "Left"]


class EmbedBody(msgspec.Struct):
    # Texts, and for models that take images {"image": "<base64 | data URI | URL>"} items (or
    # {"text": "..."}), in any order.
    inputs: str | list[str | dict]
    normalize: bool = True
    truncate: bool | None = None
    truncation_direction: TruncationDirection = "right"
    prompt_name: str | None = None
    dimensions: int | None = None
    model: str | None = None
    priority: str | None = None
    task: str | None = None


class EmbedSparseBody(msgspec.Struct):
    inputs: str | list[str]
    truncate: bool | None = None
    truncation_direction: TruncationDirection = "right"
    top_k: int | None = None
    min_weight: float = 0.0
    model: str | None = None
    priority: str | None = None


class RerankBody(msgspec.Struct):
    query: str
    texts: list[str]
    top_n: int | None = None
    return_text: bool = False
    raw_scores: bool = False
    truncate: bool | None = None
    # TEI's field; only "right" is served: a pair over the limit loses the end of its document (or
    # the document is split into windows), never the query at its start.
    truncation_direction: TruncationDirection = "right"
    model: str | None = None
    priority: str | None = None


class TokenizeBody(msgspec.Struct):
    inputs: str | list[str]
    add_special_tokens: bool = True
    prompt_name: str | None = None
    model: str | None = None


class DecodeBody(msgspec.Struct):
    ids: list[int | list[int]]
    skip_special_tokens: bool = True
    model: str | None = None


SPARSE_FORMATS = ("ids", "tokens")


def format_error(exc: InferenceError) -> dict:
    return {"error": exc.message, "error_type": exc.error_type}


def routes(engine: Engine) -> list[Route]:
    limit = engine.config.payload_limit_bytes

    async def embed(request: Request) -> Response:
        body = decode_json(await read_body(request, limit), EmbedBody)
        priority, timeout_s = scheduling_hints(request, body.priority)
        work = engine.embed(
            EmbedRequest(
                inputs=[text_or_image(x, f"inputs[{i}]") for i, x in enumerate(as_list(body.inputs))],
                model=body.model,
                normalize=body.normalize,
                truncate=body.truncate,
                truncate_left=body.truncation_direction.lower() == "left",
                prompt_name=body.prompt_name,
                dimensions=body.dimensions,
                task=body.task,
                priority=priority,
                timeout_s=timeout_s,
            )
        )
        result = await until_disconnect(request, work)
        vectors = [v.tolist() for v in result.vectors]
        return json_response(vectors, headers=result_headers(result))

    async def embed_sparse(request: Request) -> Response:
        output = request.query_params.get("format", "ids")
        if output not in SPARSE_FORMATS:
            raise ValidationError(f"format must be one of {', '.join(SPARSE_FORMATS)}, got {output!r}")
        body = decode_json(await read_body(request, limit), EmbedSparseBody)
        priority, timeout_s = scheduling_hints(request, body.priority)
        work = engine.embed_sparse(
            SparseEmbedRequest(
                inputs=as_list(body.inputs),
                model=body.model,
                truncate=body.truncate,
                truncate_left=body.truncation_direction.lower() == "left",
                top_k=body.top_k,
                min_weight=body.min_weight,
                priority=priority,
                timeout_s=timeout_s,
                return_terms=output == "tokens",
            )
        )
        result = await until_disconnect(request, work)
        if output == "tokens":
            payload = result.term_weights()
        else:
            payload = [
                [{"index": i, "value": w} for i, w in zip(v.ids.tolist(), v.weights.tolist())] for v in result.vectors
            ]
        return json_response(payload, headers=result_headers(result))

    async def rerank(request: Request) -> Response:
        body = decode_json(await read_body(request, limit), RerankBody)
        if body.truncation_direction.lower() != "right":
            raise ValidationError(
                "truncation_direction must be \"right\" for /rerank: a document over the limit is cut at its end "
                "or split into windows, never cut at its start"
            )
        priority, timeout_s = scheduling_hints(request, body.priority)
        work = engine.rerank(
            RerankRequest(
                query=body.query,
                documents=body.texts,
                model=body.model,
                top_n=body.top_n,
                raw_scores=body.raw_scores,
                truncate=body.truncate,
                priority=priority,
                timeout_s=timeout_s,
            )
        )
        result = await until_disconnect(request, work)
        # Exactly these keys: Elasticsearch's hugging_face rerank parser rejects any other.
        if body.return_text:
            payload = [{"index": r.index, "score": r.score, "text": body.texts[r.index]} for r in result.ranked]
        else:
            payload = [{"index": r.index, "score": r.score} for r in result.ranked]
        return json_response(payload, headers=result_headers(result))

    async def tokenize(request: Request) -> Response:
        body = decode_json(await read_body(request, limit), TokenizeBody)
        tokens = await engine.tokenize(
            TokenizeRequest(as_list(body.inputs), body.model, body.add_special_tokens, body.prompt_name)
        )
        return json_response(
            [[{"id": t.id, "text": t.text, "special": t.special, "start": t.start, "stop": t.stop} for t in row]
             for row in tokens]
        )

    async def decode(request: Request) -> Response:
        body = decode_json(await read_body(request, limit), DecodeBody)
        ids = body.ids
        if not ids:
            raise ValidationError("ids must not be empty")
        if all(isinstance(i, int) for i in ids):
            rows = [ids]
        elif all(isinstance(i, list) for i in ids):
            rows = ids
        else:
            raise ValidationError("ids must be a list of token ids or a list of such lists, not a mix")
        return json_response(engine.decode(DecodeRequest(rows, body.model, body.skip_special_tokens)))

    async def health(request: Request) -> Response:
        problem = await engine.check_health()
        if problem is not None:
            raise NotReady(problem)
        return json_response({"status": "ok"})

    async def info(request: Request) -> Response:
        server = engine.info()
        limits = server.limits
        first = server.default
        return json_response(
            {
                # TEI's fields, describing the default (first) model
                "model_id": first.id,
                "model_sha": None,
                "model_dtype": first.precision,  # the torch dtype, or onnx's float32 / int8
                "model_type": (
                    {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
                    if first.task == "rerank" else {"embedding": {"pooling": first.pooling}}
                ),
                "max_input_length": first.max_input_tokens,
                "max_batch_tokens": first.max_batch_tokens,
                "max_batch_requests": limits.max_batch_requests,
                "max_client_batch_size": limits.max_client_batch_size,
                "auto_truncate": limits.auto_truncate,
                "tokenization_workers": limits.tokenization_workers,
                # image input (models whose "modalities" include "image")
                "max_image_request_bytes": limits.max_image_request_bytes,
                "image_url_hosts": list(limits.image_url_hosts),
                "version": server.version,
                # what computes the models: "torch", "onnx" or both (each model says which in "backend")
                "backends": list(server.backends),
                # Triton kernels the start-up self-check switched off (their torch reference runs)
                "kernels_switched_off": server.kernels_switched_off,
                # every served model
                "models": [model_json(m) for m in server.models],
            }
        )

    async def list_models(request: Request) -> Response:
        models = [model_json(m) for m in engine.info().models]
        return json_response(
            {
                "object": "list",
                "data": [
                    {"id": m["model_id"], "object": "model", "created": 0, "owned_by": "infercore", **m} for m in models
                ],
            }
        )

    async def metrics(request: Request) -> Response:
        return Response(engine.metrics.render(), media_type=engine.metrics.content_type)

    def route(path: str, handler, methods: list[str], authenticate: bool = True) -> Route:
        return Route(path, endpoint(engine, path, format_error, handler, authenticate), methods=methods)

    return [
        route("/embed", embed, ["POST"]),
        route("/embed_sparse", embed_sparse, ["POST"]),
        route("/rerank", rerank, ["POST"]),
        route("/tokenize", tokenize, ["POST"]),
        route("/decode", decode, ["POST"]),
        route("/health", health, ["GET"], authenticate=False),
        route("/info", info, ["GET"]),
        route("/v1/models", list_models, ["GET"]),
        route("/metrics", metrics, ["GET"]),
    ]


def model_json(info: ModelInfo) -> dict:
    """A model as /info and /v1/models list it."""
    common = {
        "model_id": info.id,
        "task": info.task,
        "family": info.family,
        "description": info.description,
    }
    # What computes the model (torch | onnx) at which precision, its first replica's device and every
    # device it has a replica on.
    placement = {"dtype": info.dtype, "backend": info.backend, "precision": info.precision, "device": info.device,
                 "devices": list(info.devices)}
    if info.reranker_kind == BI_ENCODER:
        return {**common, "kind": BI_ENCODER, "embedding_model": info.embedding_model,
                "max_input_tokens": info.max_input_tokens, **placement}
    return {
        **common,
        # the catalog entry the model was matched to (by id, alias, config.json or directory name), or None
        "catalog_id": info.catalog_id,
        "dimensions": info.dimensions,
        "matryoshka_dimensions": list(info.matryoshka_dimensions),
        "max_input_tokens": info.max_input_tokens,
        "pooling": info.pooling,
        "prompts": info.prompts,
        "default_prompt_name": info.default_prompt_name,
        "tasks": list(info.tasks),
        "default_task": info.default_task,
        "end_of_life_date": info.end_of_life_date.isoformat() if info.end_of_life_date else None,
        "max_batch_tokens": info.max_batch_tokens,
        "modalities": list(info.modalities),
        **({"image_tokens": info.image_tokens} if info.image_input else {}),
        **placement,
        # the ONNX graph's parity figures against the torch path (null for torch)
        "quality": info.quality,
        **(
            {"kind": info.reranker_kind, "max_query_tokens": info.max_query_tokens,
             "rerank_windows": info.rerank_windows, "window_overlap_tokens": info.window_overlap_tokens}
            if info.task == "rerank" else {}
        ),
    }
