"""The Open Inference Protocol v2 (KServe's V2 protocol, spoken by Triton Inference Server, KServe and
Seldon and their clients, e.g. ``tritonclient``), over REST (``routes``) and gRPC
(``OpenInferenceService``, ``inference.GRPCInferenceService`` on the gRPC port beside
``infercore.v1``).

REST routes: ``GET /v2/health/live``, ``/v2/health/ready``, ``GET /v2``, ``GET /v2/models/{name}``,
``/v2/models/{name}/ready``, ``POST /v2/models/{name}/infer`` (each model route also under
``/v2/models/{name}/versions/1/...``: every model has the one version ``"1"``).

Tensors, by the model's task (``GET /v2/models/{name}`` lists them):

- ``text_embedding``: input ``text`` BYTES ``[N]`` (or ``[N, 1]``) → output ``embedding`` FP32 ``[N, D]``.
- ``sparse_embedding``: input ``text`` BYTES ``[N]`` → outputs in CSR layout: ``indices`` INT64 ``[T]``
  (vocabulary ids), ``values`` FP32 ``[T]`` (weights, heaviest first per input) and ``offsets``
  INT64 ``[N + 1]`` (input ``i`` owns ``indices[offsets[i]:offsets[i+1]]``).
- ``rerank``: inputs ``query`` BYTES ``[1]`` and ``documents`` BYTES ``[M]`` → output ``scores``
  FP32 ``[M]``, in document order.

Request ``parameters`` carry the options of the other dialects: ``dimensions``, ``normalize``,
``prompt_name``, ``task`` (embedding); ``top_k``, ``min_weight`` (sparse); ``raw_scores`` (rerank);
``truncate``, ``truncation_direction`` and ``priority`` (lane) for all; Triton's ``timeout``
(microseconds) and ``binary_data_output``. An unknown parameter, input name, datatype or a shape that
does not match the data is a 400 naming it.

Binary tensor data (the protocol's extension, which ``tritonclient`` uses by default): with the
``Inference-Header-Content-Length`` header the body is that many bytes of JSON followed by the
inputs whose ``parameters.binary_data_size`` is set, in order; a BYTES element is a 4-byte
little-endian length and its bytes. Outputs are returned the same way when the request asks
(``binary_data_output`` or an output's ``binary_data``).

Errors: ``{"error": "<message>"}`` with the status every dialect uses for that error; gRPC statuses
as ``infercore.v1``'s (``grpc_status.grpc_code``).

gRPC: input tensors typed (``contents.bytes_contents``) or raw (``raw_input_contents``), outputs always
raw (``raw_output_contents``), as Triton answers. Liveness, readiness and metadata need no API key
(as the REST health routes); ModelInfer does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ... import __version__
from ...proto.inference import open_inference_v2_pb2 as pb
from ...proto.inference import open_inference_v2_pb2_grpc as pb_grpc
from ..auth import check_bearer
from ..canonical import EmbedRequest, EmbedResult, RerankRequest, RerankResult, SparseEmbedRequest
from ..engine import Engine
from ..errors import InferenceError, MalformedRequest, ModelNotFound
from ..grpc_status import grpc_code, retry_after_metadata
from ..http import decode_json, endpoint, json_response, read_body, result_headers, until_disconnect

log = logging.getLogger("infercore.oip")

GRPC_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

SERVER_NAME = "infercore"
MODEL_VERSION = "1"
PLATFORM = "infercore"
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "Inference-Header-Content-Length"

# Numeric datatypes this dialect writes (little-endian on the wire).
NUMPY_DTYPES = {"FP32": np.dtype("<f4"), "INT64": np.dtype("<i8")}

# Request parameters each task takes (besides the common ones).
COMMON_PARAMETERS = {"truncate", "truncation_direction", "priority", "timeout", "binary_data_output"}
TASK_PARAMETERS = {
    "text_embedding": {"dimensions", "normalize", "prompt_name", "task"},
    "sparse_embedding": {"top_k", "min_weight"},
    "rerank": {"raw_scores"},
}


@dataclass
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]


@dataclass
class Tensor:
    """One tensor of a request or response. ``data``: list of ``bytes`` for BYTES, else an array;
    flattened, row-major."""

    name: str
    datatype: str
    shape: list[int]
    data: Any
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferCall:
    """A transport-neutral inference call: what REST and gRPC both parse into."""

    model: str
    inputs: list[Tensor]
    parameters: dict[str, Any]
    requested_outputs: list[str] | None  # None: every output
    binary_outputs: set[str] = field(default_factory=set)  # outputs wanted as binary tensor data


def format_error(exc: InferenceError) -> dict:
    return {"error": exc.message}


# ---- what each model looks like as tensors --------------------------------------------------------

def model_task(engine: Engine, name: str, version: str | None = None) -> tuple[str, int | None]:
    """(task, dimensions) of a served model; 404 for a model or version not served."""
    if version not in (None, "", MODEL_VERSION):
        raise ModelNotFound(f"model {name!r} has no version {version!r}; its one version is {MODEL_VERSION!r}")
    info = engine.info().model(name)
    return info.task, info.dimensions


def tensor_specs(task: str, dimensions: int | None) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of a model of ``task``; -1 marks a dimension of variable size."""
    if task == "rerank":
        return ([TensorSpec("query", "BYTES", [1]), TensorSpec("documents", "BYTES", [-1])],
                [TensorSpec("scores", "FP32", [-1])])
    text = [TensorSpec("text", "BYTES", [-1])]
    if task == "sparse_embedding":
        return text, [TensorSpec("indices", "INT64", [-1]), TensorSpec("values", "FP32", [-1]),
                      TensorSpec("offsets", "INT64", [-1])]
    return text, [TensorSpec("embedding", "FP32", [-1, dimensions if dimensions else -1])]


def model_metadata(engine: Engine, name: str, version: str | None = None) -> dict:
    inputs, outputs = tensor_specs(*model_task(engine, name, version))
    return {
        "name": name,
        "versions": [MODEL_VERSION],
        "platform": PLATFORM,
        "inputs": [spec.__dict__ for spec in inputs],
        "outputs": [spec.__dict__ for spec in outputs],
    }


def server_metadata() -> dict:
    return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}


async def model_ready(engine: Engine, name: str, version: str | None = None) -> bool:
    """Served, and the server ready with every model able to compute (404 for a model not served)."""
    model_task(engine, name, version)
    return engine.state == "ready" and await engine.check_health() is None


async def server_ready(engine: Engine) -> bool:
    return engine.state == "ready" and await engine.check_health() is None


# ---- inference --------------------------------------------------------------------------------------

def _texts(tensor: Tensor) -> list[str]:
    if tensor.datatype != "BYTES":
        raise MalformedRequest(f"input {tensor.name!r} must be BYTES (UTF-8 text), not {tensor.datatype}")
    if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise MalformedRequest(f"input {tensor.name!r} must have shape [N] or [N, 1], not {tensor.shape}")
    texts = []
    for i, item in enumerate(tensor.data):
        if isinstance(item, str):
            texts.append(item)
            continue
        try:
            texts.append(bytes(item).decode("utf-8"))
        except UnicodeDecodeError:
            raise MalformedRequest(f"input {tensor.name!r}: element {i} is not valid UTF-8") from None
    return texts


def _inputs_by_name(call: InferCall, expected: list[TensorSpec]) -> dict[str, Tensor]:
    names = [spec.name for spec in expected]
    given = {}
    for tensor in call.inputs:
        if tensor.name not in names:
            raise MalformedRequest(f"model {call.model!r} has no input {tensor.name!r}; its inputs are {names}")
        if tensor.name in given:
            raise MalformedRequest(f"input {tensor.name!r} is given twice")
        given[tensor.name] = tensor
    missing = [name for name in names if name not in given]
    if missing:
        raise MalformedRequest(f"model {call.model!r} needs the input(s) {missing}")
    return given


def _parameter(parameters: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = parameters.get(name, default)
    if value is default:
        return value
    # bool is an int in Python: keep flags and numbers apart.
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise MalformedRequest(f"parameter {name!r} must be {expected}, not {type(value).__name__}")
    return value


def _common_options(parameters: dict[str, Any]) -> dict[str, Any]:
    direction = _parameter(parameters, "truncation_direction", str, "right")
    if direction.lower() not in ("left", "right"):
        raise MalformedRequest(f"parameter 'truncation_direction' must be 'left' or 'right', not {direction!r}")
    timeout_us = _parameter(parameters, "timeout", int)
    if timeout_us is not None and timeout_us <= 0:
        raise MalformedRequest("parameter 'timeout' (microseconds) must be positive")
    _parameter(parameters, "binary_data_output", bool)
    return {
        "truncate": _parameter(parameters, "truncate", bool),
        "truncate_left": direction.lower() == "left",
        "priority": _parameter(parameters, "priority", str),
        "timeout_s": timeout_us / 1e6 if timeout_us is not None else None,
    }


async def infer(engine: Engine, call: InferCall) -> tuple[str, list[Tensor], EmbedResult | RerankResult]:
    """Run ``call``; returns (model id, output tensors in the model's output order, the result)."""
    task, dimensions = model_task(engine, call.model)
    expected_inputs, expected_outputs = tensor_specs(task, dimensions)
    unknown = sorted(set(call.parameters) - COMMON_PARAMETERS - TASK_PARAMETERS[task])
    if unknown:
        allowed = sorted(COMMON_PARAMETERS | TASK_PARAMETERS[task])
        raise MalformedRequest(f"unknown parameter(s) {unknown} for a {task} model; known: {allowed}")
    output_names = [spec.name for spec in expected_outputs]
    for name in call.requested_outputs or []:
        if name not in output_names:
            raise MalformedRequest(f"model {call.model!r} has no output {name!r}; its outputs are {output_names}")
    inputs = _inputs_by_name(call, expected_inputs)
    options = _common_options(call.parameters)
    params = call.parameters

    if task == "rerank":
        queries = _texts(inputs["query"])
        if len(queries) != 1:
            raise MalformedRequest(f"input 'query' must hold exactly one text, not {len(queries)}")
        result = await engine.rerank(RerankRequest(
            query=queries[0], documents=_texts(inputs["documents"]), model=call.model,
            raw_scores=_parameter(params, "raw_scores", bool, False), truncate=options["truncate"],
            priority=options["priority"], timeout_s=options["timeout_s"],
        ))
        scores = np.zeros(len(result.ranked), dtype=np.float32)
        for ranked in result.ranked:
            scores[ranked.index] = ranked.score
        outputs = [Tensor("scores", "FP32", [len(scores)], scores)]
    elif task == "sparse_embedding":
        texts = _texts(inputs["text"])
        result = await engine.embed_sparse(SparseEmbedRequest(
            inputs=texts, model=call.model, top_k=_parameter(params, "top_k", int),
            min_weight=float(_parameter(params, "min_weight", (int, float), 0.0)), **options,
        ))
        lengths = [len(vector.ids) for vector in result.vectors]
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        indices = np.concatenate([np.zeros(0, np.int64), *(np.asarray(v.ids, np.int64) for v in result.vectors)])
        values = np.concatenate([np.zeros(0, np.float32), *(np.asarray(v.weights, np.float32) for v in result.vectors)])
        outputs = [Tensor("indices", "INT64", [len(indices)], indices), Tensor("values", "FP32", [len(values)], values),
                   Tensor("offsets", "INT64", [len(offsets)], offsets)]
    else:
        texts = _texts(inputs["text"])
        result = await engine.embed(EmbedRequest(
            inputs=texts, model=call.model, normalize=_parameter(params, "normalize", bool, True),
            prompt_name=_parameter(params, "prompt_name", str), dimensions=_parameter(params, "dimensions", int),
            task=_parameter(params, "task", str), **options,
        ))
        matrix = np.stack([np.asarray(v, dtype=np.float32) for v in result.vectors])
        outputs = [Tensor("embedding", "FP32", list(matrix.shape), matrix.reshape(-1))]
    if call.requested_outputs:
        outputs = [tensor for tensor in outputs if tensor.name in call.requested_outputs]
    return result.model, outputs, result


# ---- the wire: JSON with optional binary tensor data ------------------------------------------------

def encode_bytes_elements(elements: list[bytes]) -> bytes:
    """BYTES tensor contents as raw data: each element a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


def decode_bytes_elements(raw: bytes, count: int, name: str) -> list[bytes]:
    elements, offset = [], 0
    for i in range(count):
        if offset + 4 > len(raw):
            raise MalformedRequest(f"input {name!r}: binary data ends before element {i} of {count}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise MalformedRequest(f"input {name!r}: element {i} claims {length} bytes past the end of its data")
        elements.append(raw[offset:offset + length])
        offset += length
    if offset != len(raw):
        raise MalformedRequest(f"input {name!r}: {len(raw) - offset} bytes of binary data left after {count} elements")
    return elements


def element_count(shape: list[int], name: str) -> int:
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise MalformedRequest(f"input {name!r}: shape must be a list of non-negative integers, not {shape}")
    return math.prod(shape)


def check_element_count(name: str, shape: list[int], expected: int, sent: int) -> None:
    if sent != expected:
        raise MalformedRequest(f"input {name!r}: shape {shape} holds {expected} elements but {sent} were sent")


def _flatten(data: Any, name: str) -> list:
    """JSON tensor data may be flat or nested row-major; every leaf must be a string here."""
    flat: list = []
    stack = [iter(data if isinstance(data, list) else [data])]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        elif isinstance(item, str):
            flat.append(item)
        else:
            raise MalformedRequest(f"input {name!r}: BYTES data must be strings, not {type(item).__name__}")
    return flat


_END = object()


def parse_rest_request(model: str, body: bytes, header_length: str | None) -> tuple[InferCall, str | None, bool]:
    """(call, request id, whether every output is wanted as binary data) from a REST infer body."""
    binary = b""
    if header_length is not None:
        try:
            json_length = int(header_length)
        except ValueError:
            raise MalformedRequest(f"{HEADER_LENGTH} must be an integer, not {header_length!r}") from None
        if not 0 <= json_length <= len(body):
            raise MalformedRequest(f"{HEADER_LENGTH} {json_length} is outside the body's {len(body)} bytes")
        body, binary = body[:json_length], body[json_length:]
    document = decode_json(body, dict[str, Any])
    unknown = sorted(set(document) - {"id", "parameters", "inputs", "outputs"})
    if unknown:
        raise MalformedRequest(f"unknown field(s) {unknown} in the inference request")
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise MalformedRequest("'id' must be a string")
    parameters = _object(document.get("parameters", {}), "parameters")
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise MalformedRequest("'inputs' must be a non-empty list of tensors")
    inputs, offset = [], 0
    for position, raw in enumerate(raw_inputs):
        raw = _object(raw, f"inputs[{position}]")
        name, datatype, shape = raw.get("name"), raw.get("datatype"), raw.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list):
            raise MalformedRequest(f"inputs[{position}] needs 'name' (string), 'datatype' (string) and 'shape' (list)")
        tensor_parameters = _object(raw.get("parameters", {}), f"input {name!r} parameters")
        count = element_count(shape, name)
        binary_size = tensor_parameters.get("binary_data_size")
        if binary_size is not None:
            if not isinstance(binary_size, int) or isinstance(binary_size, bool) or binary_size < 0:
                raise MalformedRequest(f"input {name!r}: binary_data_size must be a non-negative integer")
            if offset + binary_size > len(binary):
                raise MalformedRequest(f"input {name!r}: binary_data_size {binary_size} runs past the binary data")
            if datatype != "BYTES":
                raise MalformedRequest(f"input {name!r} must be BYTES (UTF-8 text), not {datatype}")
            data = decode_bytes_elements(binary[offset:offset + binary_size], count, name)
            offset += binary_size
        else:
            if "data" not in raw:
                raise MalformedRequest(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
            if datatype != "BYTES":
                raise MalformedRequest(f"input {name!r} must be BYTES (UTF-8 text), not {datatype}")
            data = _flatten(raw["data"], name)
        check_element_count(name, shape, count, len(data))
        inputs.append(Tensor(name, datatype, shape, data, tensor_parameters))
    if offset != len(binary):
        raise MalformedRequest(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    requested, binary_outputs = None, set()
    if "outputs" in document:
        raw_outputs = document["outputs"]
        if not isinstance(raw_outputs, list):
            raise MalformedRequest("'outputs' must be a list")
        requested = []
        for position, raw in enumerate(raw_outputs):
            raw = _object(raw, f"outputs[{position}]")
            if not isinstance(raw.get("name"), str):
                raise MalformedRequest(f"outputs[{position}] needs a 'name'")
            requested.append(raw["name"])
            wants_binary = _object(raw.get("parameters", {}), f"output {raw['name']!r} parameters").get("binary_data")
            if wants_binary:
                binary_outputs.add(raw["name"])
    all_binary = parameters.get("binary_data_output") is True
    return InferCall(model, inputs, parameters, requested or None, binary_outputs), request_id, all_binary


def _object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise MalformedRequest(f"{what} must be a JSON object")
    return value


def rest_response(model: str, request_id: str | None, outputs: list[Tensor], binary: set[str] | bool,
                  headers: dict[str, str]) -> Response:
    """The infer response; outputs named in ``binary`` (or all, for True) as binary tensor data."""
    described, chunks = [], []
    for tensor in outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if binary is True or tensor.name in binary:
            raw = np.ascontiguousarray(tensor.data, dtype=NUMPY_DTYPES[tensor.datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = np.asarray(tensor.data).tolist()
        described.append(entry)
    document: dict[str, Any] = {"model_name": model, "model_version": MODEL_VERSION, "outputs": described}
    if request_id is not None:
        document["id"] = request_id
    header = json.dumps(document, separators=(",", ":")).encode()
    if not chunks:
        return Response(header, media_type="application/json", headers=headers)
    return Response(header + b"".join(chunks), media_type="application/octet-stream",
                    headers={**headers, HEADER_LENGTH: str(len(header))})


# ---- routes ---------------------------------------------------------------------------------------

def routes(engine: Engine) -> list[Route]:
    limit = engine.config.payload_limit_bytes

    async def live(request: Request) -> Response:
        return json_response({"live": True})

    async def ready(request: Request) -> Response:
        is_ready = await server_ready(engine)
        return json_response({"ready": is_ready}, 200 if is_ready else 503)

    async def metadata(request: Request) -> Response:
        return json_response(server_metadata())

    async def model(request: Request) -> Response:
        params = request.path_params
        return json_response(model_metadata(engine, params["name"], params.get("version")))

    async def model_is_ready(request: Request) -> Response:
        params = request.path_params
        is_ready = await model_ready(engine, params["name"], params.get("version"))
        return json_response({"name": params["name"], "ready": is_ready}, 200 if is_ready else 503)

    async def model_infer(request: Request) -> Response:
        params = request.path_params
        model_task(engine, params["name"], params.get("version"))
        body = await read_body(request, limit)
        call, request_id, all_binary = parse_rest_request(params["name"], body, request.headers.get(HEADER_LENGTH))
        model_id, outputs, result = await until_disconnect(request, infer(engine, call))
        return rest_response(model_id, request_id, outputs, True if all_binary else call.binary_outputs,
                             result_headers(result))

    def route(path: str, handler, methods: list[str], authenticate: bool = True) -> list[Route]:
        # Metrics and logs name the route by its template, never by a model name taken from the path.
        wrapped = endpoint(engine, path, format_error, handler, authenticate)
        paths = [path]
        if path.startswith("/v2/models/{name}"):
            paths.append(path.replace("/v2/models/{name}", "/v2/models/{name}/versions/{version}"))
        return [Route(p, wrapped, methods=methods) for p in paths]

    return [
        *route("/v2/health/live", live, ["GET"], authenticate=False),
        *route("/v2/health/ready", ready, ["GET"], authenticate=False),
        *route("/v2", metadata, ["GET"]),
        *route("/v2/models/{name}", model, ["GET"]),
        *route("/v2/models/{name}/ready", model_is_ready, ["GET"], authenticate=False),
        *route("/v2/models/{name}/infer", model_infer, ["POST"]),
    ]


# ---- gRPC: inference.GRPCInferenceService ------------------------------------------------------------

def _parameter_value(parameter: pb.InferParameter) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


def _parameters(parameters) -> dict[str, Any]:
    return {name: _parameter_value(value) for name, value in parameters.items()}


def parse_infer_request(request: pb.ModelInferRequest) -> InferCall:
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise MalformedRequest(
            f"raw_input_contents has {len(request.raw_input_contents)} entries for {len(request.inputs)} inputs"
        )
    inputs = []
    for position, tensor in enumerate(request.inputs):
        shape = list(tensor.shape)
        count = element_count(shape, tensor.name)
        if tensor.datatype != "BYTES":
            raise MalformedRequest(f"input {tensor.name!r} must be BYTES (UTF-8 text), not {tensor.datatype}")
        if request.raw_input_contents:
            data = decode_bytes_elements(request.raw_input_contents[position], count, tensor.name)
        else:
            data = list(tensor.contents.bytes_contents)
        check_element_count(tensor.name, shape, count, len(data))
        inputs.append(Tensor(tensor.name, tensor.datatype, shape, data, _parameters(tensor.parameters)))
    requested = [output.name for output in request.outputs] or None
    return InferCall(request.model_name, inputs, _parameters(request.parameters), requested)


def infer_response(model: str, request_id: str, outputs: list[Tensor]) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model, model_version=MODEL_VERSION, id=request_id)
    for tensor in outputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.append(
            np.ascontiguousarray(tensor.data, dtype=NUMPY_DTYPES[tensor.datatype]).tobytes()
        )
    return response


class OpenInferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, engine: Engine, api_key: str | None = None):
        self.engine = engine
        self.api_key = api_key

    async def _call(self, method: str, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[Any]],
                    authenticate: bool = False) -> Any:
        """Authenticate (for inference), run ``work``, turn an engine error into the call's status;
        metrics as infercore.v1's calls (route ``/<service>/<method>``, status code name)."""
        started = time.perf_counter()
        route = f"/{GRPC_SERVICE_NAME}/{method}"
        code = grpc.StatusCode.OK
        model = ""  # the served model that answered: ModelInfer's, once it has
        try:
            if authenticate:
                header = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)
                check_bearer(header, self.api_key, "metadata 'authorization: Bearer <key>'")
            response = await work()
            if isinstance(response, pb.ModelInferResponse):
                model = response.model_name
            return response
        except InferenceError as exc:
            code = grpc_code(exc)
            await context.abort(code, exc.message, trailing_metadata=retry_after_metadata(exc))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("unexpected error in %s", method)
            await context.abort(code, "internal server error")
        finally:
            self.engine.metrics.observe_request(route, code.name, time.perf_counter() - started, model)

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=await server_ready(self.engine))

    async def ModelReady(self, request, context):
        async def work():
            return pb.ModelReadyResponse(ready=await model_ready(self.engine, request.name, request.version))

        return await self._call("ModelReady", context, work)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(**server_metadata())

    async def ModelMetadata(self, request, context):
        async def work():
            described = model_metadata(self.engine, request.name, request.version)
            response = pb.ModelMetadataResponse(name=described["name"], versions=described["versions"],
                                                platform=described["platform"])
            for spec in described["inputs"]:
                response.inputs.add(**spec)
            for spec in described["outputs"]:
                response.outputs.add(**spec)
            return response

        return await self._call("ModelMetadata", context, work)

    async def ModelInfer(self, request, context):
        async def work():
            if request.model_version not in ("", MODEL_VERSION):
                model_task(self.engine, request.model_name, request.model_version)  # raises NOT_FOUND
            call = parse_infer_request(request)
            remaining_s = context.time_remaining()
            if remaining_s is not None and "timeout" not in call.parameters:  # the client's deadline
                call.parameters["timeout"] = max(1, int(remaining_s * 1e6))
            model, outputs, _ = await infer(self.engine, call)
            return infer_response(model, request.id, outputs)

        return await self._call("ModelInfer", context, work, authenticate=True)
