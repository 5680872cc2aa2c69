"""OpenAI-compatible embeddings: POST /v1/embeddings (and /embeddings).

Jina's embeddings API shares the route and the shape; its multimodal input is served too:
``"input": [{"text": "..."}, {"image": "<base64 | data URI>"}]`` (models that take images).

``encoding_format`` "float" returns lists of numbers; "base64" returns the little-endian float32
bytes base64-encoded, which is what the official ``openai`` client requests by default.
Errors: ``{"error": {"message", "type", "param", "code"}}``.

``input`` is a string, a list of strings, or token ids: a list of ints (one input) or a list of such
lists, in the served model's own vocabulary (``POST /tokenize``), as TEI and vLLM take them. Each
row is the model's whole input, special tokens included; no prompt is added.

Extensions beside OpenAI's fields (``input``, ``model``, ``encoding_format``, ``dimensions``, ``user``,
which is all the ``openai`` client, LangChain's ``OpenAIEmbeddings`` and LlamaIndex's
``OpenAILikeEmbedding`` send):

- ``task`` (Jina): the model's task (jina-embeddings-v3 ``retrieval.query`` ...; GET /info lists them).
- ``prompt_name``: one of the model's prompts (e5 ``query``/``passage``).
- ``input_type`` (Cohere): ``search_query`` | ``search_document`` | ``classification`` | ``clustering``,
  mapped to the model's task and prompt for that use (server/input_types.py); an explicit ``task`` or
  ``prompt_name`` wins.
- ``truncate`` (Jina, TEI): cut inputs longer than the model's limit instead of a 413; unset: the
  server's ``--auto-truncate``.
- ``normalized`` (Jina): false returns the unnormalised vectors.
- ``embedding_type`` (Jina): ``float`` | ``base64`` (as ``encoding_format``) | ``int8`` | ``uint8`` |
  ``binary`` | ``ubinary`` (server/quantize.py).

Any other field is a 422 naming it: a typo must not become a silent no-op.
"""

from __future__ import annotations

import base64
from typing import Literal

import msgspec
import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..canonical import EmbedInput, EmbedRequest, text_or_image
from ..engine import Engine
from ..errors import InferenceError, ModelNotFound, Overloaded, PayloadTooLarge, Unauthorized, ValidationError
from ..http import decode_json, endpoint, json_response, read_body, result_headers, scheduling_hints, until_disconnect
from ..input_types import cohere_input_type
from ..quantize import EMBEDDING_TYPES, quantize


class EmbeddingsBody(msgspec.Struct, forbid_unknown_fields=True):
    # Texts, token ids, or Jina's items (same route): {"text": ...} and {"image": "<base64 | data URI | URL>"}.
    input: str | list[str | int | list[int] | dict]
    model: str | None = None
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = None
    user: str | None = None
    task: str | None = None
    prompt_name: str | None = None
    input_type: str | None = None
    truncate: bool | None = None
    normalized: bool = True
    embedding_type: str | None = None


def split_input(value: str | list[str | int | list[int] | dict]) -> tuple[list[EmbedInput], list[list[int]] | None]:
    """(items, None) for text input (strings, or Jina's text and image items), ([], rows of token ids)
    for token-id input; a mix of ids and texts is a 422."""
    if isinstance(value, str):
        return [value], None
    if all(isinstance(item, (str, dict)) for item in value):
        return [text_or_image(item, f"input[{i}]") for i, item in enumerate(value)], None
    if all(isinstance(item, int) for item in value):
        return [], [value]  # type: ignore[list-item]
    if all(isinstance(item, list) for item in value):
        return [], value  # type: ignore[return-value]
    raise ValidationError(
        "input must be a string, a list of strings or {\"text\"} / {\"image\"} items, a list of token ids or a "
        "list of lists of token ids, not a mix"
    )


def output_type(body: EmbeddingsBody) -> str:
    """What each embedding is sent as: ``embedding_type`` or else ``encoding_format`` (default float)."""
    if body.embedding_type is None:
        return body.encoding_format or "float"
    if body.encoding_format is not None and body.encoding_format != body.embedding_type:
        raise ValidationError(
            f"encoding_format {body.encoding_format!r} and embedding_type {body.embedding_type!r} disagree; send one"
        )
    if body.embedding_type != "base64" and body.embedding_type not in EMBEDDING_TYPES:
        raise ValidationError(
            f"embedding_type must be one of base64, {', '.join(EMBEDDING_TYPES)}, got {body.embedding_type!r}"
        )
    return body.embedding_type


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


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | list[int] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return quantize(vector, encoding_format)


def routes(engine: Engine) -> list[Route]:
    limit = engine.config.payload_limit_bytes

    async def embeddings(request: Request) -> Response:
        body = decode_json(await read_body(request, limit), EmbeddingsBody)
        texts, input_ids = split_input(body.input)
        encoding = output_type(body)
        priority, timeout_s = scheduling_hints(request)
        task, prompt_name = body.task, body.prompt_name
        if body.input_type is not None:
            implied_task, implied_prompt = cohere_input_type(engine.info().serving(body.model, "text_embedding"),
                                                             body.input_type)
            task = task if task is not None else implied_task
            # token ids are embedded as given: input_type then only picks the task's adapter
            if input_ids is None:
                prompt_name = prompt_name if prompt_name is not None else implied_prompt
        work = engine.embed(
            EmbedRequest(
                inputs=texts,
                input_ids=input_ids,
                model=body.model,
                normalize=body.normalized,
                truncate=body.truncate,
                prompt_name=prompt_name,
                dimensions=body.dimensions,
                task=task,
                priority=priority,
                timeout_s=timeout_s,
            )
        )
        result = await until_disconnect(request, work)
        data = [
            {"object": "embedding", "index": i, "embedding": encode_vector(v, encoding)}
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
