"""The client matrix: a real ``infercore serve`` process driven by the client libraries people already
use, each from its own venv as a user has it (``make clients``: ``.cache/clients/<name>/`` from the
pinned ``locks/clients/<name>.txt``, never the server's environment).

The server serves MiniLM (the default embedding model), a tiny XLM-R under multilingual-e5-large's
natural name (so its catalog prompts must follow the alias), a tiny cross-encoder, an API key and
gRPC. Each client runs one script (tests/clients/<name>_client.py) that makes every call of its part
of the matrix and prints what the client returned; the tests compare that with the server's native
routes on the same weights and check the error class the client raises for bad input.

Elasticsearch's request bodies are replayed by tests/test_api_sparse.py, tests/test_api_rerank.py and
tests/test_eis.py (no client library: Elasticsearch itself is the client there).

A missing client venv fails the tests, naming ``make clients``: a matrix that skips is no matrix.
"""

from __future__ import annotations

import os

import httpx
import numpy as np
import pytest

from tests import client_venvs, tiny_checkpoints, tiny_jina
from tests.client_venvs import ROOT, SCRIPTS, run_client
from tests.server_process import free_port, start_server

API_KEY = "sk-matrix-2c9d"
E5 = "multilingual-e5-large"

TEXTS = [
    "A heron waited in the reeds until the ferry had passed.",
    "Kaffee und Kuchen um drei, wie jeden Sonntag.",
    "雪が降ると町はとても静かになる。",
]
QUERY = "Which river runs through Vienna?"
DOCUMENTS = [
    "The Danube flows through Vienna on its way to the Black Sea.",
    "A heron waited in the reeds until the ferry had passed.",
    "Kaffee und Kuchen um drei, wie jeden Sonntag.",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, minilm_dir):
    root = tmp_path_factory.mktemp("matrix")
    e5_dir = tiny_jina.build_multilingual_e5(root / "e5-checkout")
    cross = tiny_checkpoints.build_bert_with_head(root / "cross", "BertForSequenceClassification", seed=5,
                                                  num_labels=1)
    grpc_port = free_port()
    server = start_server([
        "--model", f"minilm={minilm_dir}", "--model", f"{E5}={e5_dir}", "--model", f"cross={cross}",
        "--api-key", API_KEY, "--grpc-port", str(grpc_port),
    ], root, "matrix")
    server.api_key = API_KEY
    server.grpc_target = f"127.0.0.1:{grpc_port}"
    yield server
    server.stop()


@pytest.fixture(scope="module")
def native(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60.0,
                      trust_env=False) as client:
        yield client


def job(server, **extra) -> dict:
    return {"url": server.url, "api_key": API_KEY, "texts": TEXTS, "query": QUERY, "documents": DOCUMENTS,
            "e5": E5, **extra}


def embed(native, inputs, **fields) -> np.ndarray:
    response = native.post("/embed", json={"inputs": inputs, **fields})
    assert response.status_code == 200, response.text
    return np.asarray(response.json(), dtype=np.float32)


def scores(native, query: str, texts: list[str], **fields) -> dict[int, float]:
    response = native.post("/rerank", json={"query": query, "texts": texts, "model": "cross", **fields})
    assert response.status_code == 200, response.text
    return {r["index"]: r["score"] for r in response.json()}


def assert_ranked(got: list[list], expected: dict[int, float], top_n: int | None = None) -> None:
    order = sorted(expected, key=lambda i: (-expected[i], i))[:top_n]
    assert [index for index, _ in got] == order
    for index, score in got:
        assert score == pytest.approx(expected[index], abs=1e-5)


def assert_error(error: dict | None, cls: str, status, *fragments: str) -> None:
    assert error is not None, "the client raised nothing"
    assert (error["class"], error["status"]) == (cls, status), error
    for fragment in fragments:
        assert fragment in error["message"], (fragment, error["message"])


# ---- openai ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openai_run(server, native):
    token_ids = [[t["id"] for t in row] for row in native.post("/tokenize", json={"inputs": TEXTS}).json()]
    return run_client("openai", job(server, token_ids=token_ids))


def test_openai_vectors_equal_the_native_route(openai_run, native):
    expected = embed(native, TEXTS)
    for kind in ("base64", "float", "token_ids"):
        np.testing.assert_allclose(np.asarray(openai_run[kind], dtype=np.float32), expected, atol=1e-6, err_msg=kind)
    # its default, base64, decodes to exactly the float reply
    np.testing.assert_array_equal(np.asarray(openai_run["base64"]), np.asarray(openai_run["float"]))
    np.testing.assert_allclose(np.asarray(openai_run["dimensions"]), embed(native, TEXTS, dimensions=128), atol=1e-6)
    np.testing.assert_allclose(np.asarray(openai_run["e5_query"]),
                               embed(native, [QUERY], model=E5, prompt_name="query"), atol=1e-6)


def test_openai_raises_its_own_error_classes(openai_run):
    errors = openai_run["errors"]
    assert_error(errors["unknown_model"], "openai.NotFoundError", 404, "text-embedding-3-large")
    assert_error(errors["empty_input"], "openai.UnprocessableEntityError", 422, "empty")
    assert_error(errors["unknown_field"], "openai.UnprocessableEntityError", 422, "dimension")
    assert_error(errors["outside_vocabulary"], "openai.UnprocessableEntityError", 422, "outside the vocabulary")
    assert_error(errors["wrong_key"], "openai.AuthenticationError", 401)


# ---- cohere ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cohere_run(server):
    return run_client("cohere", job(server))


def test_cohere_v1_and_v2_rerank_scores_equal_the_native_route(cohere_run, native):
    expected = scores(native, QUERY, DOCUMENTS)
    assert_ranked(cohere_run["v1_rerank"], expected, top_n=2)
    assert_ranked(cohere_run["v2_rerank"], expected)
    assert_ranked(cohere_run["v2_rerank_cut"], scores(native, QUERY, ["The Danube flows"]))  # max_tokens_per_doc=3


def test_cohere_v1_and_v2_embeddings_equal_the_native_route(cohere_run, native):
    expected = embed(native, TEXTS)
    np.testing.assert_allclose(np.asarray(cohere_run["v1_embed"]), expected, atol=1e-6)
    np.testing.assert_allclose(np.asarray(cohere_run["v2_embed_float"]), expected, atol=1e-6)
    scale = np.abs(expected).max(axis=1, keepdims=True) / 127
    np.testing.assert_array_equal(np.asarray(cohere_run["v2_embed_int8"]), np.rint(expected / scale))
    bits = np.unpackbits(np.asarray(cohere_run["v2_embed_ubinary"], dtype=np.uint8), axis=1)
    np.testing.assert_array_equal(bits, (expected > 0).astype(np.uint8))
    np.testing.assert_allclose(np.asarray(cohere_run["v2_embed_e5_query"]),
                               embed(native, [QUERY], model=E5, prompt_name="query"), atol=1e-6)


def test_cohere_raises_its_own_error_classes(cohere_run):
    errors = cohere_run["errors"]
    assert_error(errors["unknown_model"], "cohere.errors.not_found_error.NotFoundError", 404, "rerank-v3.5")
    assert_error(errors["v1_unknown_model"], "cohere.errors.not_found_error.NotFoundError", 404, "rerank-v3.5")
    assert_error(errors["empty_documents"], "cohere.errors.unprocessable_entity_error.UnprocessableEntityError",
                 422, "documents must not be empty")
    assert_error(errors["bad_embedding_type"], "cohere.errors.unprocessable_entity_error.UnprocessableEntityError",
                 422, "float16")
    assert_error(errors["wrong_key"], "cohere.errors.unauthorized_error.UnauthorizedError", 401)


# ---- huggingface_hub ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def huggingface_hub_run(server):
    return run_client("huggingface_hub", job(server))


def test_inference_client_tasks_equal_the_native_routes(huggingface_hub_run, native):
    run = huggingface_hub_run
    np.testing.assert_allclose(np.asarray(run["feature_extraction"], dtype=np.float32), embed(native, [QUERY]),
                               atol=1e-6)
    vectors = embed(native, [QUERY, *DOCUMENTS])
    assert run["sentence_similarity"] == pytest.approx((vectors[1:] @ vectors[0]).tolist(), abs=1e-5)
    single = native.post("/predict", json={"inputs": QUERY, "model": "cross"}).json()
    assert run["text_classification"] == [["LABEL_0", pytest.approx(single[0]["score"], abs=1e-6)]]


def test_inference_client_raises_its_http_error(huggingface_hub_run):
    errors = huggingface_hub_run["errors"]
    assert_error(errors["empty_text"], "huggingface_hub.errors.HfHubHTTPError", 422, "empty")
    assert_error(errors["wrong_key"], "huggingface_hub.errors.HfHubHTTPError", 401)


# ---- langchain-openai -----------------------------------------------------------------------------


def test_langchain_openai_embeddings_equal_the_native_route(server, native):
    run = run_client("langchain_openai", job(server))
    np.testing.assert_allclose(np.asarray(run["documents"]), embed(native, TEXTS), atol=1e-6)
    np.testing.assert_allclose(np.asarray(run["query"]), embed(native, [QUERY])[0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(run["dimensions"]), embed(native, TEXTS, dimensions=128), atol=1e-6)
    assert_error(run["errors"]["unknown_model"], "openai.NotFoundError", 404, "text-embedding-3-small")


# ---- llama-index ----------------------------------------------------------------------------------


def test_llama_index_openai_like_embeddings_equal_the_native_route(server, native):
    run = run_client("llama_index", job(server))
    np.testing.assert_allclose(np.asarray(run["documents"]), embed(native, TEXTS), atol=1e-6)
    np.testing.assert_allclose(np.asarray(run["query"]), embed(native, [QUERY])[0], atol=1e-6)
    assert_error(run["errors"]["unknown_model"], "openai.NotFoundError", 404, "text-embedding-3-small")


# ---- gRPC reflection ------------------------------------------------------------------------------


def test_a_reflection_client_lists_the_services_over_v1_and_embeds_like_http(server, native):
    run = run_client("grpc_reflection", job(server, grpc_target=server.grpc_target))
    services = {"infercore.v1.InferenceService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection"}
    assert services <= set(run["v1_services"]) and services <= set(run["v1alpha_services"])
    assert "InferenceService" in run["v1_service_files"]
    assert {"Embed", "Rerank", "EmbedStream"} <= set(run["methods"])
    np.testing.assert_allclose(np.asarray(run["embed"], dtype=np.float32), embed(native, TEXTS), atol=1e-6)
    assert_error(run["errors"]["unknown_model"], "grpc._channel._InactiveRpcError", "NOT_FOUND", "no-such-model")


def test_a_missing_or_stale_client_venv_fails_naming_make_clients(monkeypatch, tmp_path):
    monkeypatch.setattr(client_venvs, "CLIENT_VENVS", tmp_path)
    with pytest.raises(pytest.fail.Exception) as missing:
        run_client("openai", {})
    assert "is missing: run `make clients`" in str(missing.value)
    venv = tmp_path / "openai"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / ".installed").write_text("0" * 64 + "\n")  # built from some other lock
    with pytest.raises(pytest.fail.Exception) as stale:
        run_client("openai", {})
    assert "another lock" in str(stale.value) and "make clients" in str(stale.value)


def test_every_client_has_a_lock_a_script_and_a_make_target():
    lock_names = {p.stem for p in (ROOT / "locks" / "clients").glob("*.txt")}
    script_names = {p.name.removesuffix("_client.py") for p in SCRIPTS.glob("*_client.py")}
    makefile = (ROOT / "Makefile").read_text()
    clients_line = next(line for line in makefile.splitlines() if line.startswith("CLIENTS :="))
    assert lock_names == script_names == set(clients_line.split(":=")[1].split())
    assert os.path.isfile(ROOT / "locks" / "clients.py")
    for name in lock_names:
        pins = [line for line in (ROOT / "locks" / "clients" / f"{name}.txt").read_text().splitlines()
                if line and not line.startswith("#")]
        assert pins and all("==" in line for line in pins), name
        assert not any(line.lower().startswith(("torch==", "infercore")) for line in pins), name  # kept small

