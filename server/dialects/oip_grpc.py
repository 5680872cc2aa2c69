"""The Open Inference Protocol v2 over gRPC: ``inference.GRPCInferenceService`` (ServerLive,
ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer) on the gRPC port, beside
``infercore.v1.InferenceService``. Same tensors, parameters and errors as the REST side (oip.py);
input tensors may come typed (``contents.bytes_contents``) or raw (``raw_input_contents``), outputs
are always raw (``raw_output_contents``), as Triton answers.

Liveness, readiness and metadata need no API key (as HTTP's health routes); ModelInfer does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np

from ...proto.inference import open_inference_v2_pb2 as pb
from ...proto.inference import open_inference_v2_pb2_grpc as pb_grpc
from ..engine import Engine
from ..errors import InferenceError, MalformedRequest, Unauthorized
from ..grpc_service import grpc_code, retry_after_metadata
from ..http import bearer_token_matches
from . import oip

log = logging.getLogger("infercore.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def _parameter_value(parameter: pb.InferParameter) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


def _parameters(parameters) -> dict[str, Any]:
    return {name: _parameter_value(value) for name, value in parameters.items()}


def parse_infer_request(request: pb.ModelInferRequest) -> oip.InferCall:
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise MalformedRequest(
            f"raw_input_contents has {len(request.raw_input_contents)} entries for {len(request.inputs)} inputs"
        )
    inputs = []
    for position, tensor in enumerate(request.inputs):
        shape = list(tensor.shape)
        count = oip.element_count(shape, tensor.name)
        if tensor.datatype != "BYTES":
            raise MalformedRequest(f"input {tensor.name!r} must be BYTES (UTF-8 text), not {tensor.datatype}")
        if request.raw_input_contents:
            data = oip.decode_bytes_elements(request.raw_input_contents[position], count, tensor.name)
        else:
            data = list(tensor.contents.bytes_contents)
        oip.check_element_count(tensor.name, shape, count, len(data))
        inputs.append(oip.Tensor(tensor.name, tensor.datatype, shape, data, _parameters(tensor.parameters)))
    requested = [output.name for output in request.outputs] or None
    return oip.InferCall(request.model_name, inputs, _parameters(request.parameters), requested)


def infer_response(model: str, request_id: str, outputs: list[oip.Tensor]) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model, model_version=oip.MODEL_VERSION, id=request_id)
    for tensor in outputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.append(
            np.ascontiguousarray(tensor.data, dtype=oip.NUMPY_DTYPES[tensor.datatype]).tobytes()
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
        route = f"/{SERVICE_NAME}/{method}"
        code = grpc.StatusCode.OK
        try:
            if authenticate and self.api_key is not None:
                header = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), "")
                if not bearer_token_matches(header, self.api_key):
                    raise Unauthorized("missing or invalid API key: send metadata 'authorization: Bearer <key>'")
            return await work()
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
            self.engine.metrics.requests.labels(route, code.name).inc()
            self.engine.metrics.request_duration.labels(route).observe(time.perf_counter() - started)

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        ready = self.engine.state == "ready" and await self.engine.check_health() is None
        return pb.ServerReadyResponse(ready=ready)

    async def ModelReady(self, request, context):
        async def work():
            oip.model_task(self.engine, request.name, request.version)
            return pb.ModelReadyResponse(ready=oip.model_ready(self.engine, request.name, request.version))

        return await self._call("ModelReady", context, work)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(**oip.server_metadata())

    async def ModelMetadata(self, request, context):
        async def work():
            described = oip.model_metadata(self.engine, request.name, request.version)
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
            if request.model_version not in ("", oip.MODEL_VERSION):
                oip.model_task(self.engine, request.model_name, request.model_version)  # raises NOT_FOUND
            call = parse_infer_request(request)
            remaining_s = context.time_remaining()
            if remaining_s is not None and "timeout" not in call.parameters:  # the client's deadline
                call.parameters["timeout"] = max(1, int(remaining_s * 1e6))
            model, outputs, _ = await oip.infer(self.engine, call)
            return infer_response(model, request.id, outputs)

        return await self._call("ModelInfer", context, work, authenticate=True)
