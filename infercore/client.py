"""Python client of an infercore server, over gRPC or HTTP with the same methods and results.

    from infercore.client import AsyncClient, Client, Image

    with Client("grpc://127.0.0.1:8081", api_key="KEY") as client:    # or "http://127.0.0.1:8080"
        vectors = client.embed(["what is bm25", "a passage"])         # numpy float32 [2, d]
        client.embed([Image.from_file("boat.png"), "a red boat"], model="jina-clip-v2")  # one space
        for ids, weights in client.embed_sparse(["blood pressure"]):  # int32 / float32 arrays
            ...
        client.rerank("query", ["doc a", "doc b"])                    # [(index, score)], best first
        client.info(), client.list_models()

    async with AsyncClient("grpcs://host:8081", ca_cert="ca.pem") as client:
        vectors = await client.embed(["..."])

The URL's scheme picks the transport: ``grpc://`` (plaintext), ``grpcs://`` (TLS), ``http://``,
``https://``. TLS: ``ca_cert`` (PEM file; default: the system's roots), and for mutual TLS
``client_cert`` + ``client_key``. ``timeout_s`` (per client, or per call) is the gRPC deadline, or over
HTTP the ``X-Request-Timeout`` the server applies. Every failure raises ``InferenceClientError``
whose ``code`` is a gRPC status name over either transport (HTTP 422 → INVALID_ARGUMENT, 429 →
RESOURCE_EXHAUSTED, ...).

Over HTTP, ``embed_sparse(..., return_tokens=True)`` costs a second request (the HTTP API answers
ids or token strings, not both), and ``embed_stream`` sends its batches one after the other; over gRPC
it is one bidirectional stream that keeps up to the server's in-flight bound busy.
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import grpc.aio
import httpx
import numpy as np

from infercore.proto.v1 import inference_pb2 as pb
from infercore.proto.v1 import inference_pb2_grpc as pb_grpc

__all__ = ["AsyncClient", "Client", "Image", "InferenceClientError", "ModelDescription", "ServerInfo",
           "SparseEmbedding"]

DEFAULT_TIMEOUT_S = 60.0
# Over HTTP the server enforces the timeout; the connection waits this much longer for its answer.
HTTP_TIMEOUT_MARGIN_S = 5.0
ENCODINGS = {
    "float32": pb.VECTOR_ENCODING_FLOAT32,
    "float16": pb.VECTOR_ENCODING_FLOAT16,
    "bfloat16": pb.VECTOR_ENCODING_BFLOAT16,
}
LANES = {None: pb.LANE_UNSPECIFIED, "search": pb.LANE_SEARCH, "ingest": pb.LANE_INGEST, "batch": pb.LANE_BATCH}
TASK_NAMES = {
    pb.MODEL_TASK_TEXT_EMBEDDING: "text_embedding",
    pb.MODEL_TASK_SPARSE_EMBEDDING: "sparse_embedding",
    pb.MODEL_TASK_RERANK: "rerank",
}
# HTTP status → the gRPC status the server gives the same request (server/dialects/grpc.py).
HTTP_CODES = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 410: "FAILED_PRECONDITION",
    413: "INVALID_ARGUMENT", 422: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
    503: "UNAVAILABLE",
}
STATUS_NAMES = {status.value[0]: status.name for status in grpc.StatusCode}
GRPC_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


class InferenceClientError(Exception):
    """A request that failed. ``code``: gRPC status name (UNAVAILABLE, INVALID_ARGUMENT, ...);
    ``http_status`` over HTTP; ``retry_after_s`` when the server is overloaded."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None, http_status: int | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
        self.http_status = http_status


@dataclass(frozen=True)
class SparseEmbedding:
    """One input's terms, heaviest first. Unpacks as ``ids, weights``; ``tokens`` only when asked."""

    ids: np.ndarray  # int32 [k]
    weights: np.ndarray  # float32 [k]
    tokens: list[str] | None = None

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.ids, self.weights))


@dataclass(frozen=True)
class ModelDescription:
    id: str
    task: str  # text_embedding | sparse_embedding | rerank
    dimensions: int | None  # vector size (dense), vocabulary size (sparse), None for rerankers
    max_input_tokens: int
    description: str
    # The model a request of its task gets when it names none.
    is_default: bool
    # Whether ``embed`` takes ``Image`` inputs for this model (their vectors share the text space).
    image_input: bool = False


@dataclass(frozen=True)
class Image:
    """An image input of ``embed``: its encoded bytes (PNG, JPEG, WebP or GIF), for models that take
    images; mixed with texts in one call, the vectors keep the inputs' order."""

    data: bytes

    def __repr__(self) -> str:
        return f"Image(<{len(self.data)} bytes>)"

    @classmethod
    def from_file(cls, path: str | Path) -> Image:
        return cls(Path(path).read_bytes())


@dataclass(frozen=True)
class ServerInfo:
    version: str
    max_client_batch_size: int
    models: list[ModelDescription] = field(default_factory=list)


# ---- calls: what to send and how to read the answer, independent of sync or async I/O -----------

@dataclass
class _Call:
    """Requests to make (gRPC: (method, message); HTTP: (verb, path, json body or None)) and the
    function that turns their answers, in order, into the result."""

    requests: list[tuple]
    parse: Callable[[list[Any]], Any]


def _vectors(message: pb.DenseVectors) -> np.ndarray:
    shape = (message.count, message.dimensions)
    if message.encoding in (pb.VECTOR_ENCODING_FLOAT32, pb.VECTOR_ENCODING_UNSPECIFIED):
        return np.frombuffer(message.data, dtype="<f4").reshape(shape).astype(np.float32)
    if message.encoding == pb.VECTOR_ENCODING_FLOAT16:
        return np.frombuffer(message.data, dtype="<f2").reshape(shape).astype(np.float32)
    if message.encoding == pb.VECTOR_ENCODING_BFLOAT16:
        bits = np.frombuffer(message.data, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    raise InferenceClientError("INTERNAL", f"unknown vector encoding {message.encoding} in the answer")


def _model_from_message(m: pb.ModelInfo) -> ModelDescription:
    task = TASK_NAMES.get(m.task, "unknown")
    return ModelDescription(m.id, task, m.dimensions if task != "rerank" else None, m.max_input_tokens,
                            m.description, m.is_default, m.image_input)


def _models_from_json(entries: list[dict]) -> list[ModelDescription]:
    seen: set[str] = set()
    models = []
    for e in entries:
        task = e["task"]
        models.append(ModelDescription(
            e["model_id"], task, e.get("dimensions") if task != "rerank" else None, e.get("max_input_tokens") or 0,
            e.get("description") or "", task not in seen, "image" in e.get("modalities", ()),
        ))
        seen.add(task)
    return models


def _lane(lane: str | None) -> int:
    try:
        return LANES[lane]
    except KeyError:
        raise ValueError(f"lane must be one of search, ingest, batch or None, got {lane!r}") from None


class _GrpcCalls:
    @staticmethod
    def embed(inputs: Sequence[str | Image], model: str | None, normalize: bool, dimensions: int | None,
              truncate: bool | None, prompt_name: str | None, task: str | None, lane: str | None,
              encoding: str) -> _Call:
        try:
            wire_encoding = ENCODINGS[encoding]
        except KeyError:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}") from None
        # Texts alone go in `inputs`, as before images existed; with an image, every input is an item.
        if any(isinstance(x, Image) for x in inputs):
            texts, items = [], [pb.EmbedInput(image=x.data) if isinstance(x, Image) else pb.EmbedInput(text=x)
                                for x in inputs]
        else:
            texts, items = list(inputs), []
        message = pb.EmbedRequest(inputs=texts, items=items, model=model or "", lane=_lane(lane), normalize=normalize,
                                  truncate=truncate, dimensions=dimensions, prompt_name=prompt_name, task=task,
                                  encoding=wire_encoding)
        return _Call([("Embed", message)], lambda answers: _vectors(answers[0].embeddings))

    @staticmethod
    def embed_sparse(inputs: Sequence[str], model: str | None, top_k: int | None, min_weight: float,
                     truncate: bool | None, lane: str | None, return_tokens: bool) -> _Call:
        message = pb.EmbedSparseRequest(inputs=list(inputs), model=model or "", lane=_lane(lane), top_k=top_k,
                                        min_weight=min_weight, truncate=truncate, return_tokens=return_tokens)
        return _Call([("EmbedSparse", message)], lambda answers: _GrpcCalls.sparse(answers[0], return_tokens))

    @staticmethod
    def sparse(answer: pb.EmbedSparseResponse, return_tokens: bool) -> list[SparseEmbedding]:
        return [
            SparseEmbedding(np.array(v.ids, dtype=np.int32), np.array(v.weights, dtype=np.float32),
                            list(v.tokens) if return_tokens else None)
            for v in answer.embeddings
        ]

    @staticmethod
    def rerank(query: str, documents: Sequence[str], model: str | None, top_n: int | None, raw_scores: bool,
               truncate: bool | None, lane: str | None) -> _Call:
        message = pb.RerankRequest(query=query, documents=list(documents), model=model or "", lane=_lane(lane),
                                   top_n=top_n, raw_scores=raw_scores, truncate=truncate)
        return _Call([("Rerank", message)], lambda answers: [(r.index, r.score) for r in answers[0].results])

    @staticmethod
    def info() -> _Call:
        def parse(answers: list) -> ServerInfo:
            answer = answers[0]
            return ServerInfo(answer.version, answer.limits.max_client_batch_size,
                              [_model_from_message(m) for m in answer.models])

        return _Call([("Info", pb.InfoRequest())], parse)

    @staticmethod
    def list_models() -> _Call:
        return _Call([("ListModels", pb.ListModelsRequest())],
                     lambda answers: [_model_from_message(m) for m in answers[0].models])


class _HttpCalls:
    """The native HTTP API (POST /embed, /embed_sparse, /rerank; GET /info, /v1/models)."""

    @staticmethod
    def embed(inputs: Sequence[str | Image], model: str | None, normalize: bool, dimensions: int | None,
              truncate: bool | None, prompt_name: str | None, task: str | None, lane: str | None,
              encoding: str) -> _Call:
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
        _lane(lane)
        wire = [{"image": base64.b64encode(x.data).decode("ascii")} if isinstance(x, Image) else x for x in inputs]
        body = {"inputs": wire, "normalize": normalize, "truncate": truncate, "dimensions": dimensions,
                "prompt_name": prompt_name, "task": task, "model": model, "priority": lane}
        # JSON carries float32 values exactly (as the shortest decimal of their double); the
        # encoding only shortens gRPC answers.
        return _Call([("POST", "/embed", _without_none(body))],
                     lambda answers: np.asarray(answers[0], dtype=np.float32))

    @staticmethod
    def embed_sparse(inputs: Sequence[str], model: str | None, top_k: int | None, min_weight: float,
                     truncate: bool | None, lane: str | None, return_tokens: bool) -> _Call:
        _lane(lane)
        body = _without_none({"inputs": list(inputs), "model": model, "top_k": top_k, "min_weight": min_weight,
                              "truncate": truncate, "priority": lane})
        requests = [("POST", "/embed_sparse", body)]
        if return_tokens:
            requests.append(("POST", "/embed_sparse?format=tokens", body))

        def parse(answers: list) -> list[SparseEmbedding]:
            embeddings = [
                SparseEmbedding(np.array([t["index"] for t in row], dtype=np.int32),
                                np.array([t["value"] for t in row], dtype=np.float32))
                for row in answers[0]
            ]
            if not return_tokens:
                return embeddings
            with_tokens = []
            for embedding, terms in zip(embeddings, answers[1]):
                weights = np.array(list(terms.values()), dtype=np.float32)
                if not np.array_equal(weights, embedding.weights):
                    raise InferenceClientError(
                        "INTERNAL", "the two HTTP answers (ids, tokens) of one sparse request disagree"
                    )
                with_tokens.append(SparseEmbedding(embedding.ids, embedding.weights, list(terms)))
            return with_tokens

        return _Call(requests, parse)

    @staticmethod
    def rerank(query: str, documents: Sequence[str], model: str | None, top_n: int | None, raw_scores: bool,
               truncate: bool | None, lane: str | None) -> _Call:
        _lane(lane)
        body = _without_none({"query": query, "texts": list(documents), "model": model, "top_n": top_n,
                              "raw_scores": raw_scores, "truncate": truncate, "priority": lane})
        return _Call([("POST", "/rerank", body)],
                     lambda answers: [(r["index"], float(r["score"])) for r in answers[0]])

    @staticmethod
    def info() -> _Call:
        def parse(answers: list) -> ServerInfo:
            answer = answers[0]
            return ServerInfo(answer["version"], answer["max_client_batch_size"], _models_from_json(answer["models"]))

        return _Call([("GET", "/info", None)], parse)

    @staticmethod
    def list_models() -> _Call:
        return _Call([("GET", "/v1/models", None)], lambda answers: _models_from_json(answers[0]["data"]))


def _without_none(body: dict) -> dict:
    return {k: v for k, v in body.items() if v is not None}


# ---- transports ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Target:
    transport: str  # grpc | http
    address: str  # host:port (gRPC) or base URL (HTTP)
    tls: bool


def _parse_url(url: str) -> _Target:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("grpc", "grpcs", "http", "https") or not parts.netloc:
        raise ValueError(f"url must look like grpc://HOST:PORT, grpcs://, http:// or https://, got {url!r}")
    if scheme.startswith("grpc"):
        if parts.port is None:
            raise ValueError(f"a gRPC url needs a port, got {url!r}")
        return _Target("grpc", parts.netloc, scheme == "grpcs")
    return _Target("http", f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}", scheme == "https")


def _read(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None


def _grpc_credentials(ca_cert, client_cert, client_key) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(_read(ca_cert), _read(client_key), _read(client_cert))


def _http_verify(target: _Target, ca_cert, client_cert, client_key) -> ssl.SSLContext | bool:
    if not target.tls:
        return True
    context = ssl.create_default_context(cafile=str(ca_cert) if ca_cert is not None else None)
    if client_cert is not None:
        context.load_cert_chain(str(client_cert), str(client_key) if client_key is not None else None)
    return context


def _grpc_error(exc: grpc.RpcError) -> InferenceClientError:
    retry_after = None
    for key, value in exc.trailing_metadata() or ():
        if key == "retry-after":
            retry_after = float(value)
    return InferenceClientError(exc.code().name, exc.details() or "", retry_after)


def _http_error(response: httpx.Response) -> InferenceClientError:
    try:
        body = response.json()
        message, error_type = body.get("error", response.text), body.get("error_type")
    except ValueError:
        message, error_type = response.text, None
    code = HTTP_CODES.get(response.status_code, "UNKNOWN")
    if error_type == "DeadlineExceeded":
        code = "DEADLINE_EXCEEDED"
    retry_after = response.headers.get("retry-after")
    return InferenceClientError(code, str(message), float(retry_after) if retry_after else None, response.status_code)


def _transport_error(exc: httpx.TransportError) -> InferenceClientError:
    if isinstance(exc, httpx.TimeoutException):
        return InferenceClientError("DEADLINE_EXCEEDED", f"no answer in time: {exc}")
    return InferenceClientError("UNAVAILABLE", f"cannot reach the server: {exc}")


def _stream_answer(message: Any) -> Any:
    """The response in one slot of a stream, or the error that slot carries, raised."""
    if message.HasField("error"):
        error = message.error
        retry_after = error.retry_after_ms / 1e3 if error.retry_after_ms else None
        raise InferenceClientError(STATUS_NAMES.get(error.code, "UNKNOWN"), error.message, retry_after)
    return message.response


class _Base:
    def __init__(self, url: str, *, api_key: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 ca_cert: str | Path | None = None, client_cert: str | Path | None = None,
                 client_key: str | Path | None = None):
        self.target = _parse_url(url)
        if (client_cert is None) != (client_key is None):
            raise ValueError("client_cert and client_key go together (mutual TLS)")
        if not self.target.tls and (ca_cert or client_cert):
            raise ValueError("TLS options need a grpcs:// or https:// url")
        self.api_key = api_key
        self.timeout_s = timeout_s
        self._tls_files = (ca_cert, client_cert, client_key)
        self._calls = _GrpcCalls if self.target.transport == "grpc" else _HttpCalls

    @property
    def transport(self) -> str:
        return self.target.transport

    def _metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.api_key}")] if self.api_key else []

    def _headers(self, timeout_s: float) -> dict[str, str]:
        headers = {"x-request-timeout": f"{timeout_s:g}"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        return headers

    def _grpc_channel_args(self) -> tuple[str, grpc.ChannelCredentials | None]:
        credentials = _grpc_credentials(*self._tls_files) if self.target.tls else None
        return self.target.address, credentials


class Client(_Base):
    """Blocking client; a context manager (or call ``close()``). Thread-safe like its channel."""

    def __init__(self, url: str, **options: Any):
        super().__init__(url, **options)
        if self.transport == "grpc":
            address, credentials = self._grpc_channel_args()
            self._channel = (grpc.secure_channel(address, credentials, GRPC_CHANNEL_OPTIONS) if credentials
                             else grpc.insecure_channel(address, GRPC_CHANNEL_OPTIONS))
            self._stub = pb_grpc.InferenceServiceStub(self._channel)
        else:
            self._http = httpx.Client(base_url=self.target.address, trust_env=False,
                                      verify=_http_verify(self.target, *self._tls_files))

    def close(self) -> None:
        if self.transport == "grpc":
            self._channel.close()
        else:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, call: _Call, timeout_s: float | None) -> Any:
        timeout_s = timeout_s or self.timeout_s
        answers = []
        for request in call.requests:
            if self.transport == "grpc":
                method, message = request
                try:
                    answers.append(getattr(self._stub, method)(message, timeout=timeout_s, metadata=self._metadata()))
                except grpc.RpcError as exc:
                    raise _grpc_error(exc) from None
            else:
                verb, path, body = request
                try:
                    response = self._http.request(verb, path, json=body, headers=self._headers(timeout_s),
                                                  timeout=timeout_s + HTTP_TIMEOUT_MARGIN_S)
                except httpx.TransportError as exc:
                    raise _transport_error(exc) from None
                if response.status_code != 200:
                    raise _http_error(response)
                answers.append(response.json())
        return call.parse(answers)

    def embed(self, inputs: Sequence[str | Image], *, model: str | None = None, normalize: bool = True,
              dimensions: int | None = None, truncate: bool | None = None, prompt_name: str | None = None,
              task: str | None = None, lane: str | None = None, encoding: str = "float32",
              timeout_s: float | None = None) -> np.ndarray:
        """Dense vectors, float32 [len(inputs), d], in the inputs' order; ``Image`` inputs for models that
        take images. ``encoding`` (float16/bfloat16) shortens gRPC answers; the values come back as
        float32 either way."""
        call = self._calls.embed(inputs, model, normalize, dimensions, truncate, prompt_name, task, lane, encoding)
        return self._run(call, timeout_s)

    def embed_sparse(self, inputs: Sequence[str], *, model: str | None = None, top_k: int | None = None,
                     min_weight: float = 0.0, truncate: bool | None = None, lane: str | None = None,
                     return_tokens: bool = False, timeout_s: float | None = None) -> list[SparseEmbedding]:
        call = self._calls.embed_sparse(inputs, model, top_k, min_weight, truncate, lane, return_tokens)
        return self._run(call, timeout_s)

    def rerank(self, query: str, documents: Sequence[str], *, model: str | None = None, top_n: int | None = None,
               raw_scores: bool = False, truncate: bool | None = None, lane: str | None = None,
               timeout_s: float | None = None) -> list[tuple[int, float]]:
        """(document index, score), best first."""
        return self._run(self._calls.rerank(query, documents, model, top_n, raw_scores, truncate, lane), timeout_s)

    def info(self, *, timeout_s: float | None = None) -> ServerInfo:
        return self._run(self._calls.info(), timeout_s)

    def list_models(self, *, timeout_s: float | None = None) -> list[ModelDescription]:
        return self._run(self._calls.list_models(), timeout_s)

    def embed_stream(self, batches: Iterable[Sequence[str | Image]], *, timeout_s: float | None = None,
                     **options: Any) -> Iterator[np.ndarray]:
        """One float32 array per batch, in order. gRPC: one ``EmbedStream`` (``timeout_s`` bounds the
        whole stream; None: no deadline); HTTP: one request per batch. A failed batch raises there."""
        if self.transport == "http":
            for batch in batches:
                yield self.embed(batch, timeout_s=timeout_s, **options)
            return
        defaults = _embed_defaults(options)
        self._calls.embed([], **defaults)  # bad options fail here, not in gRPC's request thread
        messages = (self._calls.embed(batch, **defaults).requests[0][1] for batch in batches)
        responses = self._stub.EmbedStream(messages, timeout=timeout_s, metadata=self._metadata())
        try:
            for message in responses:
                yield _vectors(_stream_answer(message).embeddings)
        except grpc.RpcError as exc:
            raise _grpc_error(exc) from None
        finally:
            responses.cancel()


class AsyncClient(_Base):
    """The asyncio client: the same methods as ``Client``, as coroutines (``embed_stream``: an async
    iterator). Use it on one event loop; ``async with`` or ``await close()``."""

    def __init__(self, url: str, **options: Any):
        super().__init__(url, **options)
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.InferenceServiceStub | None = None
        self._http: httpx.AsyncClient | None = None

    def _grpc_stub(self) -> pb_grpc.InferenceServiceStub:
        # The channel belongs to the running loop, so it is made on first use.
        if self._stub is None:
            address, credentials = self._grpc_channel_args()
            self._channel = (grpc.aio.secure_channel(address, credentials, GRPC_CHANNEL_OPTIONS) if credentials
                             else grpc.aio.insecure_channel(address, GRPC_CHANNEL_OPTIONS))
            self._stub = pb_grpc.InferenceServiceStub(self._channel)
        return self._stub

    def _http_client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(base_url=self.target.address, trust_env=False,
                                           verify=_http_verify(self.target, *self._tls_files))
        return self._http

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        if self._http is not None:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self, call: _Call, timeout_s: float | None) -> Any:
        timeout_s = timeout_s or self.timeout_s
        answers = []
        for request in call.requests:
            if self.transport == "grpc":
                method, message = request
                try:
                    answers.append(await getattr(self._grpc_stub(), method)(
                        message, timeout=timeout_s, metadata=self._metadata()))
                except grpc.RpcError as exc:
                    raise _grpc_error(exc) from None
            else:
                verb, path, body = request
                try:
                    response = await self._http_client().request(
                        verb, path, json=body, headers=self._headers(timeout_s),
                        timeout=timeout_s + HTTP_TIMEOUT_MARGIN_S)
                except httpx.TransportError as exc:
                    raise _transport_error(exc) from None
                if response.status_code != 200:
                    raise _http_error(response)
                answers.append(response.json())
        return call.parse(answers)

    async def embed(self, inputs: Sequence[str | Image], *, model: str | None = None, normalize: bool = True,
                    dimensions: int | None = None, truncate: bool | None = None, prompt_name: str | None = None,
                    task: str | None = None, lane: str | None = None, encoding: str = "float32",
                    timeout_s: float | None = None) -> np.ndarray:
        call = self._calls.embed(inputs, model, normalize, dimensions, truncate, prompt_name, task, lane, encoding)
        return await self._run(call, timeout_s)

    async def embed_sparse(self, inputs: Sequence[str], *, model: str | None = None, top_k: int | None = None,
                           min_weight: float = 0.0, truncate: bool | None = None, lane: str | None = None,
                           return_tokens: bool = False, timeout_s: float | None = None) -> list[SparseEmbedding]:
        call = self._calls.embed_sparse(inputs, model, top_k, min_weight, truncate, lane, return_tokens)
        return await self._run(call, timeout_s)

    async def rerank(self, query: str, documents: Sequence[str], *, model: str | None = None,
                     top_n: int | None = None, raw_scores: bool = False, truncate: bool | None = None,
                     lane: str | None = None, timeout_s: float | None = None) -> list[tuple[int, float]]:
        call = self._calls.rerank(query, documents, model, top_n, raw_scores, truncate, lane)
        return await self._run(call, timeout_s)

    async def info(self, *, timeout_s: float | None = None) -> ServerInfo:
        return await self._run(self._calls.info(), timeout_s)

    async def list_models(self, *, timeout_s: float | None = None) -> list[ModelDescription]:
        return await self._run(self._calls.list_models(), timeout_s)

    async def embed_stream(self, batches: Iterable[Sequence[str | Image]] | AsyncIterable[Sequence[str | Image]],
                           *, timeout_s: float | None = None, **options: Any) -> AsyncIterator[np.ndarray]:
        """As ``Client.embed_stream``; ``batches`` may be an async iterable."""
        if self.transport == "http":
            async for batch in _aiter(batches):
                yield await self.embed(batch, timeout_s=timeout_s, **options)
            return
        defaults = _embed_defaults(options)
        self._calls.embed([], **defaults)  # bad options fail here, not inside the stream

        async def messages() -> AsyncIterator[pb.EmbedRequest]:
            async for batch in _aiter(batches):
                yield self._calls.embed(batch, **defaults).requests[0][1]

        call = self._grpc_stub().EmbedStream(messages(), timeout=timeout_s, metadata=self._metadata())
        try:
            async for message in call:
                yield _vectors(_stream_answer(message).embeddings)
        except grpc.RpcError as exc:
            raise _grpc_error(exc) from None
        finally:
            call.cancel()


def _embed_defaults(options: dict[str, Any]) -> dict[str, Any]:
    defaults = {"model": None, "normalize": True, "dimensions": None, "truncate": None, "prompt_name": None,
                "task": None, "lane": None, "encoding": "float32"}
    unknown = set(options) - set(defaults)
    if unknown:
        raise TypeError(f"unknown embed options: {', '.join(sorted(unknown))}")
    return {**defaults, **options}


async def _aiter(items: Iterable | AsyncIterable) -> AsyncIterator:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
