"""The native API, compatible with Hugging Face TEI where TEI has the route.

POST /embed, /embed_sparse, /rerank, /tokenize, /decode; GET /health, /info, /v1/models, /metrics.
Errors: ``{"error": "...", "error_type": "..."}``.

``/embed_sparse`` answers TEI's ``[[{"index", "value"}]]`` (term ids); with ``?format=tokens`` it
answers ``[{"<token>": weight}]``, the shape Elasticsearch's ``hugging_face`` service parses for
sparse embeddings, with tokens spelled as Elasticsearch stores them (see ``sparse_terms``).
"""

from __future__ import annotations

from typing import Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ... import __version__
from ...kernels import triton_support
from ...models.sparse import SparseVector
from ..canonical import DecodeRequest, EmbedRequest, RerankRequest, SparseEmbedRequest, TokenizeRequest
from ..engine import BiEncoderReranker, Engine, ModelHandle
from ..errors import InferenceError, NotReady, ValidationError
from ..http import decode_json, endpoint, json_response, read_body, result_headers, scheduling_hints, until_disconnect

TruncationDirection = Literal["right", "left", "Right", "Left"]


class EmbedBody(msgspec.Struct):
    inputs: str | list[str]
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


def sparse_terms(vector: SparseVector, vocabulary: list[str]) -> dict[str, float]:
    """{token: weight}, heaviest first, tokens as Elasticsearch stores them: the WordPiece string
    with every "." written "__" (a dot would be a field path separator in a sparse_vector field)."""
    return {vocabulary[i].replace(".", "__"): w for i, w in zip(vector.ids.tolist(), vector.weights.tolist())}


def format_error(exc: InferenceError) -> dict:
    return {"error": exc.message, "error_type": exc.error_type}


def as_list(inputs: str | list[str]) -> list[str]:
    return [inputs] if isinstance(inputs, str) else inputs


def routes(engine: Engine) -> list[Route]:
    limit = engine.config.payload_limit_bytes

    async def embed(request: Request) -> Response:
        body = decode_json(await read_body(request, limit), EmbedBody)
        priority, timeout_s = scheduling_hints(request, body.priority)
        work = engine.embed(
            EmbedRequest(
                inputs=as_list(body.inputs),
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
            )
        )
        result = await until_disconnect(request, work)
        if output == "tokens":
            vocabulary = engine.models[result.model].model.tokenizer.vocabulary
            payload = [sparse_terms(v, vocabulary) for v in result.vectors]
        else:
            payload = [
                [{"index": i, "value": w} for i, w in zip(v.ids.tolist(), v.weights.tolist())] for v in result.vectors
            ]
        return json_response(payload, headers=result_headers(result))

    async def rerank(request: Request) -> Response:
        body = decode_json(await read_body(request, limit), RerankBody)
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
        engine.require_ready()
        cfg = engine.config
        handles = list(engine.models.values())
        bi_encoders = list(engine.bi_encoder_rerankers.values())
        first = handles[0].model
        return json_response(
            {
                # TEI's fields, describing the default (first) model
                "model_id": first.id,
                "model_sha": None,
                "model_dtype": first.backend.precision,  # the torch dtype, or onnx's float32 / int8
                "model_type": (
                    {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
                    if first.task == "rerank" else {"embedding": {"pooling": first.runner.pooling}}
                ),
                "max_input_length": first.max_input_tokens,
                "max_batch_tokens": handles[0].scheduler.max_batch_tokens,
                "max_batch_requests": cfg.max_batch_requests,
                "max_client_batch_size": cfg.max_client_batch_size,
                "auto_truncate": cfg.auto_truncate,
                "tokenization_workers": cfg.tokenization_workers,
                "version": __version__,
                # Triton kernels the start-up self-check switched off (their torch reference runs)
                "kernels_switched_off": triton_support.disabled(),
                # every served model
                "models": [model_info(h) for h in handles] + [bi_encoder_info(r) for r in bi_encoders],
            }
        )

    async def list_models(request: Request) -> Response:
        engine.require_ready()
        return json_response(
            {
                "object": "list",
                "data": [
                    {"id": info["model_id"], "object": "model", "created": 0, "owned_by": "infercore", **info}
                    for info in [
                        *(model_info(h) for h in engine.models.values()),
                        *(bi_encoder_info(r) for r in engine.bi_encoder_rerankers.values()),
                    ]
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


def model_info(handle: ModelHandle) -> dict:
    model = handle.model
    return {
        "model_id": model.id,
        "task": model.task,
        "family": model.family,
        "description": model.description,
        "dimensions": model.dimensions,
        "matryoshka_dimensions": list(model.matryoshka_dimensions),
        "max_input_tokens": model.max_input_tokens,
        "pooling": model.runner.pooling,
        "prompts": model.prompts,
        "default_prompt_name": model.default_prompt_name,
        "tasks": sorted(model.tasks),
        "default_task": model.default_task,
        "end_of_life_date": model.end_of_life_date.isoformat() if model.end_of_life_date else None,
        "max_batch_tokens": handle.scheduler.max_batch_tokens,
        "dtype": str(model.dtype).removeprefix("torch."),
        # What computes the model (torch | onnx), at which precision, and the ONNX graph's parity
        # figures against the torch path (null for torch).
        "backend": model.backend.name,
        "precision": model.backend.precision,
        "quality": model.quality,
        # The first replica's device, and every device the model has a replica on.
        "device": str(model.device),
        "devices": handle.devices,
        **(
            {"kind": model.runner.kind, "max_query_tokens": model.max_query_tokens,
             "rerank_windows": model.rerank_windows, "window_overlap_tokens": model.window_overlap_tokens}
            if model.task == "rerank" else {}
        ),
    }


def bi_encoder_info(reranker: BiEncoderReranker) -> dict:
    embedder = reranker.embedder.model
    return {
        "model_id": reranker.id,
        "task": "rerank",
        "family": embedder.family,
        "description": reranker.description,
        "kind": "bi-encoder",
        "embedding_model": embedder.id,
        "max_input_tokens": embedder.max_input_tokens,
        "dtype": str(embedder.dtype).removeprefix("torch."),
        "device": str(embedder.device),
        "devices": reranker.embedder.devices,
    }
