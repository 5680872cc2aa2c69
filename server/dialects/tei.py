"""The rest of Hugging Face TEI's routes, so TEI clients (``huggingface_hub.InferenceClient`` with a
``base_url``) work unchanged: POST /predict, /similarity, /embed_all, and POST / dispatching by the
request.

    /predict    {"inputs": str | [str, str] | [[str] | [str, str], ...], "truncate"?, "raw_scores"?, "model"?}
      -> [{"score", "label"}] for one input, [[{"score", "label"}], ...] for a batch
    /similarity {"inputs": {"source_sentence": str, "sentences": [str]}, "truncate"?, "prompt_name"?, "model"?}
      -> [cosine of each sentence's embedding with the source sentence's]
    /embed_all  {"inputs": str | [str], "truncate"?, "truncation_direction"?, "prompt_name"?, "model"?}
      -> [[[float] per token] per input]: the encoder's last hidden state of every token (special
         and prompt tokens included), before pooling, Dense layers and normalisation
    /           TEI serves its model's task here; InferenceClient sends every task to this one URL, so
                the body decides: a ``query`` → /rerank (as TEI matches it first); ``inputs`` an
                object → /similarity; a ``parameters`` object (``text_classification``) →
                classification, answered as the HF Inference API does, ``[[{"label", "score"}]]``;
                anything else → what the default (first) model does: /embed (``feature_extraction``),
                /embed_sparse, or for a reranker /predict.

Classification runs a cross-encoder (the rerank models here) as TEI runs a one-label sequence
classifier: the logit of the text (or text pair), through a sigmoid unless ``raw_scores`` (TEI) or
``"function_to_apply": "none"`` (HF Inference API), labelled as the checkpoint labels it (LABEL_0).

Errors: TEI's ``{"error", "error_type"}``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import msgspec
import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..canonical import EmbedRequest, PredictRequest, RerankRequest, SparseEmbedRequest, as_list
from ..engine import Engine
from ..errors import InferenceError, ValidationError
from ..http import decode_json, endpoint, json_response, read_body, result_headers, scheduling_hints, until_disconnect

# A one-label classifier's label (cross-encoder checkpoints carry no id2label of their own).
LABEL = "LABEL_0"


class PredictBody(msgspec.Struct, forbid_unknown_fields=True):
    inputs: str | list[str | list[str]]
    truncate: bool | None = None
    raw_scores: bool = False
    truncation_direction: str = "right"
    model: str | None = None


class ClassificationParameters(msgspec.Struct):
    function_to_apply: Literal["sigmoid", "softmax", "none"] | None = None
    top_k: int | None = None


class ClassificationBody(msgspec.Struct, forbid_unknown_fields=True):
    inputs: str
    parameters: ClassificationParameters = msgspec.field(default_factory=ClassificationParameters)
    model: str | None = None


class SimilarityInputs(msgspec.Struct, forbid_unknown_fields=True):
    source_sentence: str
    sentences: list[str]


class SimilarityBody(msgspec.Struct, forbid_unknown_fields=True):
    inputs: SimilarityInputs
    truncate: bool | None = None
    truncation_direction: Literal["right", "left", "Right", "Left"] = "right"
    prompt_name: str | None = None
    parameters: dict[str, Any] | None = None  # InferenceClient's (empty) parameters object
    model: str | None = None


class EmbedAllBody(msgspec.Struct, forbid_unknown_fields=True):
    inputs: str | list[str]
    truncate: bool | None = None
    truncation_direction: Literal["right", "left", "Right", "Left"] = "right"
    prompt_name: str | None = None
    model: str | None = None


class RerankBody(msgspec.Struct, forbid_unknown_fields=True):
    query: str
    texts: list[str]
    top_n: int | None = None
    return_text: bool = False
    raw_scores: bool = False
    truncate: bool | None = None
    truncation_direction: Literal["right", "left", "Right", "Left"] = "right"
    model: str | None = None


class SparseBody(msgspec.Struct, forbid_unknown_fields=True):
    inputs: str | list[str]
    truncate: bool | None = None
    truncation_direction: Literal["right", "left", "Right", "Left"] = "right"
    model: str | None = None


class FeatureExtractionBody(msgspec.Struct, forbid_unknown_fields=True):
    inputs: str | list[str]
    normalize: bool = True
    truncate: bool | None = None
    truncation_direction: Literal["right", "left", "Right", "Left"] = "right"
    prompt_name: str | None = None
    dimensions: int | None = None
    model: str | None = None


def format_error(exc: InferenceError) -> dict:
    return {"error": exc.message, "error_type": exc.error_type}


def predict_inputs(inputs: str | list[str | list[str]]) -> tuple[list[str | tuple[str, str]], bool]:
    """(inputs, whether the request was a batch), TEI's reading: a string, a pair [a, b], or a batch
    of [a] / [a, b] lists."""
    if isinstance(inputs, str):
        return [inputs], False
    if inputs and all(isinstance(item, str) for item in inputs):
        if len(inputs) != 2:
            raise ValidationError("inputs must be a string, a pair [text, text_pair] or a batch of [text] / "
                                  f"[text, text_pair] lists; got a list of {len(inputs)} strings")
        return [(inputs[0], inputs[1])], False
    batch: list[str | tuple[str, str]] = []
    for i, item in enumerate(inputs):
        if isinstance(item, str) or len(item) not in (1, 2):
            raise ValidationError(f"inputs[{i}] must be [text] or [text, text_pair]")
        batch.append(item[0] if len(item) == 1 else (item[0], item[1]))
    return batch, True


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def routes(engine: Engine) -> list[Route]:
    limit = engine.config.payload_limit_bytes

    async def run_predict(request: Request, inputs: list, model: str | None, truncate: bool | None):
        priority, timeout_s = scheduling_hints(request)
        work = engine.predict(PredictRequest(inputs, model=model, truncate=truncate, priority=priority,
                                             timeout_s=timeout_s))
        return await until_disconnect(request, work)

    async def predict(request: Request, raw: bytes | None = None) -> Response:
        body = decode_json(raw if raw is not None else await read_body(request, limit), PredictBody)
        inputs, batch = predict_inputs(body.inputs)
        result = await run_predict(request, inputs, body.model, body.truncate)
        scores = [[{"score": x if body.raw_scores else sigmoid(x), "label": LABEL}] for x in result.vectors]
        return json_response(scores if batch else scores[0], headers=result_headers(result))

    async def classify(request: Request, raw: bytes) -> Response:
        body = decode_json(raw, ClassificationBody)
        if body.parameters.top_k is not None and body.parameters.top_k < 1:
            raise ValidationError(f"top_k must be a positive number of labels, got {body.parameters.top_k}")
        result = await run_predict(request, [body.inputs], body.model, None)
        # One label: softmax over it is 1; sigmoid (the default for one label) and none as named.
        function = body.parameters.function_to_apply or "sigmoid"
        logit = float(result.vectors[0])
        score = {"sigmoid": sigmoid(logit), "softmax": 1.0, "none": logit}[function]
        return json_response([[{"label": LABEL, "score": score}]], headers=result_headers(result))

    async def similarity(request: Request, raw: bytes | None = None) -> Response:
        body = decode_json(raw if raw is not None else await read_body(request, limit), SimilarityBody)
        if not body.inputs.sentences:
            raise ValidationError("inputs.sentences must not be empty")
        priority, timeout_s = scheduling_hints(request)
        work = engine.embed(
            EmbedRequest(
                inputs=[body.inputs.source_sentence, *body.inputs.sentences],
                model=body.model,
                truncate=body.truncate,
                truncate_left=body.truncation_direction.lower() == "left",
                prompt_name=body.prompt_name,
                priority=priority,
                timeout_s=timeout_s,
            )
        )
        result = await until_disconnect(request, work)
        source, *others = result.vectors
        return json_response([float(np.dot(source, v)) for v in others], headers=result_headers(result))

    async def feature_extraction(request: Request, raw: bytes) -> Response:
        body = decode_json(raw, FeatureExtractionBody)
        priority, timeout_s = scheduling_hints(request)
        work = engine.embed(
            EmbedRequest(
                inputs=as_list(body.inputs),
                model=body.model,
                normalize=body.normalize,
                truncate=body.truncate,
                truncate_left=body.truncation_direction.lower() == "left",
                prompt_name=body.prompt_name,
                dimensions=body.dimensions,
                priority=priority,
                timeout_s=timeout_s,
            )
        )
        result = await until_disconnect(request, work)
        return json_response([v.tolist() for v in result.vectors], headers=result_headers(result))

    async def embed_all(request: Request) -> Response:
        body = decode_json(await read_body(request, limit), EmbedAllBody)
        priority, timeout_s = scheduling_hints(request)
        work = engine.embed(
            EmbedRequest(
                inputs=as_list(body.inputs),
                model=body.model,
                truncate=body.truncate,
                truncate_left=body.truncation_direction.lower() == "left",
                prompt_name=body.prompt_name,
                per_token=True,
                priority=priority,
                timeout_s=timeout_s,
            )
        )
        result = await until_disconnect(request, work)
        return json_response([states.tolist() for states in result.vectors], headers=result_headers(result))

    async def rerank(request: Request, raw: bytes) -> Response:
        body = decode_json(raw, RerankBody)
        priority, timeout_s = scheduling_hints(request)
        work = engine.rerank(RerankRequest(body.query, body.texts, model=body.model, top_n=body.top_n,
                                           raw_scores=body.raw_scores, truncate=body.truncate, priority=priority,
                                           timeout_s=timeout_s))
        result = await until_disconnect(request, work)
        ranked = [{"index": r.index, "score": r.score} for r in result.ranked]
        if body.return_text:
            ranked = [{**r, "text": body.texts[r["index"]]} for r in ranked]
        return json_response(ranked, headers=result_headers(result))

    async def embed_sparse(request: Request, raw: bytes) -> Response:
        body = decode_json(raw, SparseBody)
        priority, timeout_s = scheduling_hints(request)
        work = engine.embed_sparse(SparseEmbedRequest(
            as_list(body.inputs), model=body.model, truncate=body.truncate,
            truncate_left=body.truncation_direction.lower() == "left", priority=priority, timeout_s=timeout_s,
        ))
        result = await until_disconnect(request, work)
        payload = [[{"index": i, "value": w} for i, w in zip(v.ids.tolist(), v.weights.tolist())]
                   for v in result.vectors]
        return json_response(payload, headers=result_headers(result))

    async def root(request: Request) -> Response:
        raw = await read_body(request, limit)
        # Only the members' names and kinds decide; their values are left undecoded (Raw) here, so
        # that the route the body goes to is the one that judges them.
        shape = decode_json(raw, dict[str, msgspec.Raw])

        def is_object(name: str) -> bool:
            return name in shape and bytes(shape[name]).lstrip().startswith(b"{")

        if "query" in shape:
            return await rerank(request, raw)
        if is_object("inputs"):
            return await similarity(request, raw)
        if is_object("parameters"):
            return await classify(request, raw)
        task = engine.info().default.task
        if task == "rerank":
            return await predict(request, raw)
        if task == "sparse_embedding":
            return await embed_sparse(request, raw)
        return await feature_extraction(request, raw)

    def route(path: str, handler) -> Route:
        return Route(path, endpoint(engine, path, format_error, handler), methods=["POST"])

    return [route("/", root), route("/predict", predict), route("/similarity", similarity),
            route("/embed_all", embed_all)]
