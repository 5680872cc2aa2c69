"""OpenAI-compatible embeddings: POST /v1/embeddings (and /embeddings).

Jina's embeddings API shares the route and the shape; its multimodal input is served too:
``"input": [{"text": "..."}, {"image": "<base64 | data URI>"}]`` (models that take images).

``encoding_format`` "float" returns lists of numbers; "base64" returns the little-endian float32
bytes base64-encoded, which is what the official ``openai`` client requests by default.
Errors: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import base64
from typing import Literal

import msgspec
import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..canonical import EmbedRequest, as_list, text_or_image
from ..engine import Engine
from ..errors import InferenceError, ModelNotFound, Overloaded, PayloadTooLarge, Unauthorized
from ..http import decode_json, endpoint, json_response, read_body, result_headers, scheduling_hints, until_disconnect


class EmbeddingsBody(msgspec.Struct):
    # Jina's API (same route) also takes {"text": ...} and {"image": "<base64 | data URI | URL>"} items.
    input: str | list[str | dict]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


def format_error(exc: InferenceError) -> dict:
    code = None
    if isinstance(exc, Unauthorized):
        error_type, code = "authentication_error", "invalid_api_key"
    elif isinstance(exc, ModelNotFound):
        error_type, code = "invalid_request_error", "model_not_found"
    elif isinstance(exc, Overloaded):
        error_type, code = "rate_limit_error", "rate_limit_exceeded"
    elif exc.status < 500:
        error_type = "invalid_request_error"
        if isinstance(exc, PayloadTooLarge):
            code = "context_length_exceeded"
    else:
        error_type = "server_error"
    return {"error": {"message": exc.message, "type": error_type, "param": None, "code": code}}


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def routes(engine: Engine) -> list[Route]:
    limit = engine.config.payload_limit_bytes

    async def embeddings(request: Request) -> Response:
        body = decode_json(await read_body(request, limit), EmbeddingsBody)
        priority, timeout_s = scheduling_hints(request)
        work = engine.embed(
            EmbedRequest(
                inputs=[text_or_image(x, f"input[{i}]") for i, x in enumerate(as_list(body.input))],
                model=body.model,
                dimensions=body.dimensions,
                priority=priority,
                timeout_s=timeout_s,
            )
        )
        result = await until_disconnect(request, work)
        data = [
            {"object": "embedding", "index": i, "embedding": encode_vector(v, body.encoding_format)}
            for i, v in enumerate(result.vectors)
        ]
        return json_response(
            {
                "object": "list",
                "data": data,
                "model": result.model,
                "usage": {"prompt_tokens": result.input_tokens, "total_tokens": result.input_tokens},
            },
            headers=result_headers(result),
        )

    handler = endpoint(engine, "/v1/embeddings", format_error, embeddings)
    return [
        Route("/v1/embeddings", handler, methods=["POST"]),
        Route("/embeddings", handler, methods=["POST"]),
    ]
