"""The Elastic Inference Service protocol against `make serve`'s starter set: request bodies and
headers replayed as Elasticsearch sends them (older and newer builds), responses checked with
Elasticsearch's parsing rules (strict keys where its parsers are strict, types, input order)."""

from __future__ import annotations

import pytest

SPARSE = "splade-tiny"
DENSE = "all-minilm-l6-v2"
RERANK = "all-minilm-l6-v2-bi-encoder-rerank"
TEXTS = ["the harbour master logged three ferries", "Quarterly revenue rose 4.2% on strong demand."]
LONG = " ".join(["breakwater lanterns guide the night ferries"] * 120)


def parse_error(response) -> str:
    """ElasticInferenceServiceErrorResponseEntity: {"error": "<string>"}."""
    body = response.json()
    assert isinstance(body, dict) and isinstance(body["error"], str) and body["error"]
    return body["error"]


def parse_sparse(body, inputs: int) -> list[dict[str, float]]:
    data = body["data"]
    assert isinstance(data, list) and len(data) == inputs
    for entry in data:
        assert isinstance(entry, dict)
        assert all(isinstance(k, str) and isinstance(v, float) for k, v in entry.items())
    return data


def parse_dense(body, inputs: int, dims: int) -> list[list[float]]:
    data = body["data"]
    assert isinstance(data, list) and len(data) == inputs
    assert all(isinstance(row, list) and len(row) == dims and all(isinstance(x, float) for x in row) for row in data)
    return data


def parse_rerank(body) -> list[tuple[int, float]]:
    """RerankResultEntry is strict: index, relevance_score and optionally document.text only."""
    out = []
    for entry in body["results"]:
        assert set(entry) <= {"index", "relevance_score", "document"}
        if "document" in entry:
            assert set(entry["document"]) == {"text"}
        out.append((entry["index"], entry["relevance_score"]))
    return out


@pytest.mark.parametrize(
    "headers",
    [
        [("X-elastic-product-use-case", "internal_ingest")],
        # newest builds: set by the entity, then added again by the base class
        [("X-elastic-product-use-case", "internal_ingest"), ("X-elastic-product-use-case", "internal_ingest"),
         ("X-elastic-es-version", "9.3.0"), ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")],
    ],
)
def test_sparse_embeddings_are_token_maps_in_input_order(starter_client, headers):
    body = {"input": TEXTS, "model": SPARSE, "usage_context": "ingest"}
    response = starter_client.post("/api/v1/embed/text/sparse", json=body, headers=headers)
    assert response.status_code == 200, response.text
    data = parse_sparse(response.json(), len(TEXTS))
    native = starter_client.post("/embed_sparse?format=tokens", json={"inputs": TEXTS}).json()
    assert data == native
    assert response.headers["x-lane"] == "ingest"


def test_sparse_without_usage_context_follows_the_use_case_header(starter_client):
    body = {"input": [TEXTS[0], TEXTS[1]], "model": SPARSE}
    response = starter_client.post("/api/v1/embed/text/sparse", json=body,
                                   headers={"X-elastic-product-use-case": "internal_search"})
    assert response.status_code == 200 and response.headers["x-lane"] == "search"


def test_an_over_long_sparse_input_is_truncated_not_refused(starter_client):
    response = starter_client.post("/api/v1/embed/text/sparse", json={"input": [LONG], "model": SPARSE})
    assert response.status_code == 200, response.text
    assert parse_sparse(response.json(), 1)[0]


def test_dense_embeddings_with_dimensions(starter_client):
    body = {"input": TEXTS, "model": DENSE, "usage_context": "search", "dimensions": 128}
    response = starter_client.post("/api/v1/embed/text/dense", json=body)
    assert response.status_code == 200, response.text
    data = parse_dense(response.json(), len(TEXTS), 128)
    native = starter_client.post("/embed", json={"inputs": TEXTS, "dimensions": 128}).json()
    assert data == native
    assert response.json()["meta"]["usage"]["total_tokens"] > 0


@pytest.mark.parametrize("typed", [False, True])
def test_rerank_accepts_strings_and_typed_objects_and_answers_strictly(starter_client, typed):
    query = "what is the capital of france"
    documents = ["Bananas are yellow.", "Paris is the capital of France.", "The Seine flows through Paris."]

    def wrap(text: str):
        return {"type": "text", "format": "text", "value": text} if typed else text

    body = {"query": wrap(query), "documents": [wrap(d) for d in documents], "model": RERANK, "top_n": 2}
    response = starter_client.post("/api/v1/rerank/text/text-similarity", json=body)
    assert response.status_code == 200, response.text
    ranked = parse_rerank(response.json())
    assert len(ranked) == 2 and ranked[0][0] == 1
    assert ranked[0][1] >= ranked[1][1]


def test_authorizations_v1_lists_exactly_the_served_models_with_strict_keys(starter_client):
    response = starter_client.get("/api/v1/authorizations")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"models"}
    assert all(set(m) == {"model_name", "task_types"} for m in body["models"])
    assert {m["model_name"]: m["task_types"] for m in body["models"]} == {
        DENSE: ["embed/text/dense"], SPARSE: ["embed/text/sparse"], RERANK: ["rerank/text/text-similarity"],
    }


def test_authorizations_v2_describes_each_served_endpoint(starter_client):
    endpoints = {e["model_name"]: e for e in starter_client.get("/api/v2/authorizations").json()["inference_endpoints"]}
    assert set(endpoints) == {DENSE, SPARSE, RERANK}
    for entry in endpoints.values():
        assert {"id", "model_name", "task_types", "status", "release_date"} <= set(entry)
        assert entry["id"].startswith(".")
    assert endpoints[SPARSE]["task_types"] == {"eis": "embed/text/sparse", "elasticsearch": "sparse_embedding"}
    dense = endpoints[DENSE]
    assert dense["task_types"] == {"eis": "embed/text/dense", "elasticsearch": "text_embedding"}
    assert dense["configuration"]["dimensions"] == 384 and dense["configuration"]["similarity"] == "cosine"
    assert dense["configuration"]["element_type"] == "float"


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/api/v1/embed/text/sparse", {"input": ["x"], "model": "elser_model_2"}, 404, "elser_model_2"),
        ("/api/v1/embed/text/sparse", {"input": [], "model": SPARSE}, 400, "empty"),
        ("/api/v1/embed/text/sparse", {"input": ["x"], "model": DENSE}, 400, "text_embedding"),
        ("/api/v1/embed/text/dense", {"input": ["x"], "model": DENSE, "dimensions": 4096}, 400, "dimensions"),
        ("/api/v1/embed/text/dense", {"input": ["x"]}, 400, "model"),
        ("/api/v1/rerank/text/text-similarity", {"query": "q", "documents": [], "model": RERANK}, 400, "empty"),
        ("/api/v1/rerank/text/text-similarity",
         {"query": {"type": "image", "format": "base64", "value": "AAAA"}, "documents": ["d"], "model": RERANK},
         400, "image"),
    ],
)
def test_errors_are_a_string_under_error_with_statuses_es_handles(starter_client, path, body, status, needle):
    response = starter_client.post(path, json=body)
    assert response.status_code == status, response.text
    assert needle in parse_error(response)


def test_usage_context_picks_the_query_or_passage_task_of_multi_task_models(tiny_bert_dir, tmp_path):
    """jina-embeddings-v3 style: searches are embedded with retrieval.query, ingest with
    retrieval.passage, in the EIS protocol and in Elasticsearch's _inference API alike."""
    import json
    import shutil

    from tests.engine_harness import InProcessServer, make_engine

    path = tmp_path / "multi"
    shutil.copytree(tiny_bert_dir, path)
    tasks = {"retrieval.query": "Represent the query: ", "retrieval.passage": "Represent the document: "}
    (path / "infercore.json").write_text(json.dumps({"tasks": tasks}))
    engine = make_engine("multi", path)
    server = InProcessServer(engine).start()
    try:
        def native(task: str) -> list[float]:
            return server.post("/embed", json={"inputs": ["lighthouse"], "task": task}).json()[0]

        def eis(usage: str) -> list[float]:
            body = {"input": ["lighthouse"], "model": "multi", "usage_context": usage}
            return server.post("/api/v1/embed/text/dense", json=body).json()["data"][0]

        def inference_api(input_type: str) -> list[float]:
            body = {"input": "lighthouse", "input_type": input_type}
            return server.post("/_inference/text_embedding/multi", json=body).json()["text_embedding"][0]["embedding"]

        assert eis("search") == native("retrieval.query") == inference_api("search")
        assert eis("ingest") == native("retrieval.passage") == inference_api("ingest")
        assert native("retrieval.query") != native("retrieval.passage")
    finally:
        server.stop()
        engine.shutdown()
