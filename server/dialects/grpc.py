"""The gRPC dialect: ``infercore.v1.InferenceService`` messages ↔ canonical requests and results.

The server that carries it (port, TLS, health, reflection) is server/grpc_server.py. Like the HTTP
dialects it only translates, with the same API key check (server/auth.py) and Retry-After
(errors.retry_after_header): it builds canonical requests, calls the engine and
formats its results (dense vectors as packed little-endian bytes). Engine errors become gRPC statuses
(unary) or ``RequestError`` slots (streams) through ``grpc_status.grpc_code``. Streams answer in request order
with at most ``max_in_flight`` requests in progress each; closing a stream cancels what it still
has queued (the engine then drops those inputs, counted as ``cancelled``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np

from ...proto.v1 import inference_pb2 as pb
from ...proto.v1 import inference_pb2_grpc as pb_grpc
from ..access import access_log, trace_id
from ..auth import check_bearer
from ..canonical import (
    DecodeRequest,
    EmbedRequest,
    ImageInput,
    RerankRequest,
    SparseEmbedRequest,
    Timings,
    TokenizeRequest,
)
from ..engine import Engine
from ..errors import (
    DeadlineExceeded,
    InferenceError,
    ValidationError,
)
from ..grpc_status import grpc_code, retry_after_metadata
from ..info import TASKS, ModelInfo

log = logging.getLogger("infercore.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name

LANES = {pb.LANE_UNSPECIFIED: None, pb.LANE_SEARCH: "search", pb.LANE_INGEST: "ingest", pb.LANE_BATCH: "batch"}
LANE_ENUMS = {name: value for value, name in LANES.items() if name is not None}
# task → ModelTask: MODEL_TASK_<TASK> for each of info.TASKS (a task missing from the proto fails here)
TASK_ENUMS = {task: pb.ModelTask.Value(f"MODEL_TASK_{task.upper()}") for task in TASKS}
NS_PER_S = 1_000_000_000

Request = TypeVar("Request")
Response = TypeVar("Response")


# ---- encoding -------------------------------------------------------------------------------

def encode_vectors(vectors: np.ndarray, encoding: int) -> pb.DenseVectors:
    """[n, d] float32 → packed little-endian bytes in ``encoding`` (binary32, binary16 or bfloat16)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if encoding in (pb.VECTOR_ENCODING_UNSPECIFIED, pb.VECTOR_ENCODING_FLOAT32):
        data = vectors.astype("<f4", copy=False).tobytes()
    elif encoding == pb.VECTOR_ENCODING_FLOAT16:
        data = vectors.astype("<f2").tobytes()
    elif encoding == pb.VECTOR_ENCODING_BFLOAT16:
        data = float32_to_bfloat16_bits(vectors).astype("<u2").tobytes()
    else:
        raise ValidationError(f"unknown vector encoding {encoding}; use FLOAT32, FLOAT16 or BFLOAT16")
    count, dimensions = vectors.shape
    return pb.DenseVectors(count=count, dimensions=dimensions, encoding=encoding or pb.VECTOR_ENCODING_FLOAT32,
                           data=data)


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """The bfloat16 bit patterns (uint16) of float32 ``values``, rounded to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)


def metadata(result: Any) -> pb.ResponseMetadata:
    timings: Timings = result.timings
    return pb.ResponseMetadata(
        input_tokens=result.input_tokens,
        input_chars=result.input_chars,
        lane=LANE_ENUMS.get(result.lane, pb.LANE_UNSPECIFIED),
        tokenization_time_ns=round(timings.tokenization_s * NS_PER_S),
        queue_time_ns=round(timings.queue_s * NS_PER_S),
        inference_time_ns=round(timings.inference_s * NS_PER_S),
        total_time_ns=round(timings.total_s * NS_PER_S),
    )


def model_info_message(info: ModelInfo) -> pb.ModelInfo:
    """The proto's ``ModelInfo`` of a served model (unset numbers and strings: 0 and "")."""
    message = pb.ModelInfo(
        id=info.id,
        task=TASK_ENUMS[info.task],
        is_default=info.is_default,
        family=info.family,
        description=info.description,
        dimensions=0 if info.task == "rerank" else info.dimensions or 0,
        matryoshka_dimensions=info.matryoshka_dimensions,
        max_input_tokens=info.max_input_tokens,
        pooling=info.pooling or "",
        prompts=info.prompts,
        tasks=info.tasks,
        max_batch_tokens=info.max_batch_tokens or 0,
        dtype=info.dtype,
        # Every device the model runs on, in --device's list form (one device: just its name).
        device=",".join(info.devices) or info.device,
        reranker_kind=info.reranker_kind or "",
        embedding_model=info.embedding_model or "",
        max_query_tokens=info.max_query_tokens or 0,
        rerank_windows=info.rerank_windows,
        image_input=info.image_input,
        image_tokens=info.image_tokens or 0,
    )
    if info.default_prompt_name is not None:
        message.default_prompt_name = info.default_prompt_name
    if info.default_task is not None:
        message.default_task = info.default_task
    if info.end_of_life_date is not None:
        message.end_of_life_date = info.end_of_life_date.isoformat()
    return message


# ---- the service ------------------------------------------------------------------------------

class InferenceService(pb_grpc.InferenceServiceServicer):
    """``infercore.v1.InferenceService`` over an engine. ``max_in_flight`` bounds each stream; with an
    ``api_key``, every call must bring it."""

    def __init__(self, engine: Engine, max_in_flight: int, api_key: str | None = None):
        self.engine = engine
        self.max_in_flight = max_in_flight
        self.api_key = api_key

    # ---- plumbing ------------------------------------------------------------------------

    def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        """``authorization: Bearer KEY`` in the call's metadata when the server has an API key
        (compared in constant time)."""
        if self.api_key is None:
            return
        header = next((value for key, value in context.invocation_metadata() or () if key == "authorization"), None)
        check_bearer(header, self.api_key, "metadata 'authorization: Bearer <key>'")

    @staticmethod
    def _timeout_s(context: grpc.aio.ServicerContext, timeout_ms: int = 0) -> float | None:
        """The request's timeout: the RPC's remaining deadline, shortened by ``timeout_ms``."""
        remaining = context.time_remaining()
        limits = [t for t in (remaining, timeout_ms / 1e3 if timeout_ms else None) if t is not None]
        if not limits:
            return None
        timeout_s = min(limits)
        if timeout_s <= 0:
            raise DeadlineExceeded("the request's deadline passed before it reached the server")
        return timeout_s

    def _observe(self, method: str, code: grpc.StatusCode, started: float,
                 context: grpc.aio.ServicerContext | None = None, response: Any = None) -> None:
        """Metrics and the access line (as HTTP's: metadata only) of one call; a stream is one call."""
        route = f"/{SERVICE_NAME}/{method}"
        duration = time.perf_counter() - started
        model = getattr(response, "model", "") if response is not None else ""
        self.engine.metrics.observe_request(route, code.name, duration, model)
        if not self.engine.config.access_log:
            return
        facts = getattr(response, "metadata", None) if response is not None else None
        sent = (context.invocation_metadata() or ()) if context is not None else ()
        traceparent = next((value for key, value in sent if key == "traceparent"), None)
        access_log.info(
            "GRPC %s status=%s model=%s tokens=%s duration_ms=%.1f lane=%s trace_id=%s",
            route, code.name, model or "-", facts.input_tokens if facts is not None else "-", duration * 1e3,
            LANES.get(facts.lane) or "-" if facts is not None else "-",
            trace_id(traceparent if isinstance(traceparent, str) else None) or "-",
        )

    async def _unary(self, method: str, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[Response]]
                     ) -> Response:
        """Authenticate, run ``work``, and turn an engine error into the call's status."""
        started = time.perf_counter()
        try:
            self._authenticate(context)
            response = await work()
        except InferenceError as exc:
            code = grpc_code(exc)
            self._observe(method, code, started, context)
            if code == grpc.StatusCode.INTERNAL:
                log.warning("%s failed: %s", method, exc.message)
            await context.abort(code, exc.message, trailing_metadata=retry_after_metadata(exc))
        except asyncio.CancelledError:
            self._observe(method, grpc.StatusCode.CANCELLED, started, context)
            raise
        except Exception:
            log.exception("unexpected error in %s", method)
            self._observe(method, grpc.StatusCode.INTERNAL, started, context)
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
        self._observe(method, grpc.StatusCode.OK, started, context, response)
        return response

    async def _stream(
        self,
        method: str,
        requests: AsyncIterator[Request],
        context: grpc.aio.ServicerContext,
        answer: Callable[[Request, grpc.aio.ServicerContext], Awaitable[Any]],
        wrap: Callable[..., Response],
    ) -> AsyncIterator[Response]:
        """One response per request, in request order, at most ``max_in_flight`` in progress.

        A reader task takes requests off the stream and starts each as a task, after taking a slot
        of the window; responses are written in order and free their slot once written. A request
        that fails gets ``wrap(error=...)``; the stream goes on. When the stream ends early (the
        client cancelled, the deadline passed) every request still in progress is cancelled.
        """
        started = time.perf_counter()
        try:
            self._authenticate(context)
        except InferenceError as exc:
            self._observe(method, grpc_code(exc), started, context)
            await context.abort(grpc_code(exc), exc.message)
        window = asyncio.Semaphore(self.max_in_flight)
        in_progress: asyncio.Queue[asyncio.Future | None] = asyncio.Queue()

        async def one(request: Request) -> Response:
            try:
                return wrap(response=await answer(request, context))
            except InferenceError as exc:
                retry_after = exc.retry_after_s
                return wrap(error=pb.RequestError(
                    code=grpc_code(exc).value[0], message=exc.message,
                    retry_after_ms=round(retry_after * 1e3) if retry_after else 0,
                ))
            except Exception:
                log.exception("unexpected error in %s", method)
                return wrap(error=pb.RequestError(code=grpc.StatusCode.INTERNAL.value[0],
                                                  message="internal server error"))

        async def read() -> None:
            try:
                async for request in requests:
                    await window.acquire()
                    in_progress.put_nowait(asyncio.ensure_future(one(request)))
            finally:
                in_progress.put_nowait(None)

        reader = asyncio.ensure_future(read())
        current: asyncio.Future | None = None
        code = grpc.StatusCode.CANCELLED
        try:
            while (current := await in_progress.get()) is not None:
                response = await current
                yield response
                window.release()
            await reader  # a failed read fails the call
            code = grpc.StatusCode.OK
        except Exception:
            code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            reader.cancel()
            cancelled = [current] if current is not None else []
            while not in_progress.empty():
                task = in_progress.get_nowait()
                if task is not None:
                    cancelled.append(task)
            for task in cancelled:
                task.cancel()
            self._observe(method, code, started, context)

    # ---- requests ↔ canonical ------------------------------------------------------------

    @staticmethod
    def _lane(value: int) -> str | None:
        try:
            return LANES[value]
        except KeyError:
            raise ValidationError(f"unknown lane {value}; use LANE_SEARCH, LANE_INGEST or LANE_BATCH") from None

    @staticmethod
    def _truncate_left(value: int) -> bool:
        if value not in (pb.TRUNCATION_DIRECTION_UNSPECIFIED, pb.TRUNCATION_DIRECTION_RIGHT,
                         pb.TRUNCATION_DIRECTION_LEFT):
            raise ValidationError(f"unknown truncation_direction {value}; use RIGHT or LEFT")
        return value == pb.TRUNCATION_DIRECTION_LEFT

    @staticmethod
    def _optional(message: Any, field: str) -> Any:
        return getattr(message, field) if message.HasField(field) else None

    async def _embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        if request.encoding not in pb.VectorEncoding.values():
            raise ValidationError(f"unknown vector encoding {request.encoding}; use FLOAT32, FLOAT16 or BFLOAT16")
        result = await self.engine.embed(EmbedRequest(
            inputs=self._embed_inputs(request),
            model=request.model or None,
            normalize=request.normalize if request.HasField("normalize") else True,
            truncate=self._optional(request, "truncate"),
            truncate_left=self._truncate_left(request.truncation_direction),
            prompt_name=self._optional(request, "prompt_name"),
            dimensions=self._optional(request, "dimensions"),
            task=self._optional(request, "task"),
            priority=self._lane(request.lane),
            timeout_s=self._timeout_s(context, request.timeout_ms),
        ))
        return pb.EmbedResponse(
            model=result.model,
            embeddings=encode_vectors(np.stack(result.vectors), request.encoding),
            truncated=result.truncated,
            metadata=metadata(result),
        )

    @staticmethod
    def _embed_inputs(request: pb.EmbedRequest) -> list[str | ImageInput]:
        """``inputs`` (texts), or ``items`` (texts and image bytes, in order); not both."""
        if not request.items:
            return list(request.inputs)
        if request.inputs:
            raise ValidationError("send either inputs (texts) or items (texts and images), not both")
        out: list[str | ImageInput] = []
        for i, item in enumerate(request.items):
            kind = item.WhichOneof("content")
            if kind is None:
                raise ValidationError(f"items[{i}] has neither text nor image")
            out.append(item.text if kind == "text" else ImageInput(bytes(item.image)))
        return out

    async def _embed_sparse(self, request: pb.EmbedSparseRequest, context: grpc.aio.ServicerContext
                            ) -> pb.EmbedSparseResponse:
        if not math.isfinite(request.min_weight):
            raise ValidationError(f"min_weight must be a finite non-negative number, got {request.min_weight}")
        result = await self.engine.embed_sparse(SparseEmbedRequest(
            inputs=list(request.inputs),
            model=request.model or None,
            truncate=self._optional(request, "truncate"),
            truncate_left=self._truncate_left(request.truncation_direction),
            top_k=self._optional(request, "top_k"),
            min_weight=request.min_weight,
            priority=self._lane(request.lane),
            timeout_s=self._timeout_s(context, request.timeout_ms),
            return_terms=request.return_tokens,
        ))
        terms = result.terms or [[] for _ in result.vectors]
        embeddings = [
            pb.SparseVector(ids=vector.ids.tolist(), weights=vector.weights.tolist(), tokens=tokens)
            for vector, tokens in zip(result.vectors, terms)
        ]
        return pb.EmbedSparseResponse(
            model=result.model, embeddings=embeddings, truncated=result.truncated, metadata=metadata(result)
        )

    async def _rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        documents = list(request.documents)
        result = await self.engine.rerank(RerankRequest(
            query=request.query,
            documents=documents,
            model=request.model or None,
            top_n=self._optional(request, "top_n"),
            raw_scores=request.raw_scores,
            truncate=self._optional(request, "truncate"),
            priority=self._lane(request.lane),
            timeout_s=self._timeout_s(context, request.timeout_ms),
        ))
        results = [
            pb.RankedDocument(index=r.index, score=r.score, truncated=result.truncated[r.index],
                              document=documents[r.index] if request.return_documents else None)
            for r in result.ranked
        ]
        return pb.RerankResponse(model=result.model, results=results, metadata=metadata(result))

    # ---- unary RPCs ----------------------------------------------------------------------

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        return await self._unary("Embed", context, lambda: self._embed(request, context))

    async def EmbedSparse(self, request: pb.EmbedSparseRequest, context: grpc.aio.ServicerContext
                          ) -> pb.EmbedSparseResponse:
        return await self._unary("EmbedSparse", context, lambda: self._embed_sparse(request, context))

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        return await self._unary("Rerank", context, lambda: self._rerank(request, context))

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        async def work() -> pb.TokenizeResponse:
            model = request.model or None
            rows = await self.engine.tokenize(TokenizeRequest(
                list(request.inputs), model,
                request.add_special_tokens if request.HasField("add_special_tokens") else True,
                self._optional(request, "prompt_name"),
            ))
            return pb.TokenizeResponse(
                model=model or self.engine.info().default.id,
                inputs=[pb.TokenizedInput(tokens=[
                    pb.Token(id=t.id, text=t.text, special=t.special, start=t.start, stop=t.stop) for t in row
                ]) for row in rows],
            )

        return await self._unary("Tokenize", context, work)

    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext) -> pb.DecodeResponse:
        async def work() -> pb.DecodeResponse:
            if not request.inputs:
                raise ValidationError("inputs must not be empty")
            skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
            texts = self.engine.decode(DecodeRequest([list(row.ids) for row in request.inputs],
                                                     request.model or None, skip))
            return pb.DecodeResponse(texts=texts)

        return await self._unary("Decode", context, work)

    def _model_infos(self, task: int = pb.MODEL_TASK_UNSPECIFIED) -> list[pb.ModelInfo]:
        messages = [model_info_message(info) for info in self.engine.info().models]
        return [m for m in messages if task in (pb.MODEL_TASK_UNSPECIFIED, m.task)]

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        async def work() -> pb.InfoResponse:
            server = self.engine.info()
            limits = server.limits
            return pb.InfoResponse(
                version=server.version,
                limits=pb.ServerLimits(
                    max_client_batch_size=limits.max_client_batch_size,
                    max_concurrent_requests=limits.max_concurrent_requests,
                    max_stream_in_flight=self.max_in_flight,
                    max_receive_message_bytes=limits.payload_limit_bytes,
                    auto_truncate=limits.auto_truncate,
                    default_timeout_ms=round(limits.request_timeout_s * 1e3),
                ),
                models=self._model_infos(),
            )

        return await self._unary("Info", context, work)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListModelsResponse:
        async def work() -> pb.ListModelsResponse:
            if request.task not in pb.ModelTask.values():
                raise ValidationError(f"unknown task {request.task}")
            return pb.ListModelsResponse(models=self._model_infos(request.task))

        return await self._unary("ListModels", context, work)

    # ---- streams -------------------------------------------------------------------------

    async def EmbedStream(self, requests: AsyncIterator[pb.EmbedRequest], context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[pb.EmbedStreamResponse]:
        async with contextlib.aclosing(
            self._stream("EmbedStream", requests, context, self._embed, pb.EmbedStreamResponse)
        ) as responses:
            async for response in responses:
                yield response

    async def EmbedSparseStream(self, requests: AsyncIterator[pb.EmbedSparseRequest],
                                context: grpc.aio.ServicerContext) -> AsyncIterator[pb.EmbedSparseStreamResponse]:
        async with contextlib.aclosing(
            self._stream("EmbedSparseStream", requests, context, self._embed_sparse, pb.EmbedSparseStreamResponse)
        ) as responses:
            async for response in responses:
                yield response

    async def RerankStream(self, requests: AsyncIterator[pb.RerankRequest], context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[pb.RerankStreamResponse]:
        async with contextlib.aclosing(
            self._stream("RerankStream", requests, context, self._rerank, pb.RerankStreamResponse)
        ) as responses:
            async for response in responses:
                yield response
