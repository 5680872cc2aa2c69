"""Reranking over HTTP in every dialect users call: TEI's /rerank (exactly the keys Elasticsearch's
hugging_face parser accepts), Jina/Cohere's /v1/rerank and Elasticsearch's /_inference/rerank/{id};
the same scores and order as sentence-transformers' CrossEncoder; and the starter set's honest
bi-encoder stand-in on real MiniLM weights."""

from __future__ import annotations

import math

import pytest
import torch

from infercore.models.repository import ModelSource
from infercore.server.config import ServerConfig
from infercore.server.engine import Engine
from tests import tiny_checkpoints
from tests.engine_harness import InProcessServer

QUERY = "which bird can sleep while flying"
DOCUMENTS = [
    "Common swifts stay airborne for ten months and are thought to nap on the wing.",
    "Penguins cannot fly but swim at up to 35 km/h.",
    "Frigatebirds sleep in flight, one brain hemisphere at a time, for seconds at once.",
    "A recipe for lemon tart with a buttery crust.",
    "The albatross glides for hours with its wings locked.",
]
TEI_KEYS = {"index", "score"}


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory):
    return tiny_checkpoints.build_bert_with_head(
        tmp_path_factory.mktemp("ce") / "ce", "BertForSequenceClassification", "bert-tiny", seed=31, num_labels=1
    )


@pytest.fixture(scope="module")
def server(cross_encoder_dir, tiny_bert_dir):
    engine = Engine(ServerConfig(
        models=[ModelSource("tiny", tiny_bert_dir), ModelSource("ce", cross_encoder_dir)],
        cpu_workers=1, tokenization_workers=1, max_client_batch_size=8,
    ))
    engine.load()
    server = InProcessServer(engine).start()
    yield server
    server.stop()
    engine.shutdown()


@pytest.fixture(scope="module")
def expected(cross_encoder_dir) -> list[tuple[int, float]]:
    """(index, sigmoid score) best first, from sentence-transformers."""
    from sentence_transformers import CrossEncoder

    scores = CrossEncoder(str(cross_encoder_dir), device="cpu").predict(
        [(QUERY, d) for d in DOCUMENTS], activation_fn=torch.nn.Sigmoid()
    )
    return sorted(((i, float(s)) for i, s in enumerate(scores)), key=lambda pair: -pair[1])


def assert_matches(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [i for i, _ in got] == [i for i, _ in expected]
    assert [s for _, s in got] == pytest.approx([s for _, s in expected], abs=1e-5)


def test_tei_rerank_matches_cross_encoder_with_exactly_the_keys_elasticsearch_accepts(server, expected):
    response = server.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert all(set(entry) == TEI_KEYS for entry in body)
    assert_matches([(e["index"], e["score"]) for e in body], expected)
    assert response.headers["x-lane"] == "search"

    with_text = server.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS, "return_text": True, "top_n": 2})
    body = with_text.json()
    assert len(body) == 2 and all(set(entry) == TEI_KEYS | {"text"} for entry in body)
    assert [e["text"] for e in body] == [DOCUMENTS[i] for i, _ in expected[:2]]

    raw = server.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS, "raw_scores": True}).json()
    assert_matches([(e["index"], 1 / (1 + math.exp(-e["score"]))) for e in raw], expected)
    assert [e["score"] for e in raw] != [s for _, s in expected]  # logits, not the sigmoid


def test_jina_cohere_rerank_shape(server, expected):
    body = {"model": "ce", "query": QUERY, "documents": DOCUMENTS, "top_n": 3, "return_documents": True}
    response = server.post("/v1/rerank", json=body)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["model"] == "ce" and payload["usage"]["total_tokens"] > 0
    results = payload["results"]
    assert all(set(r) == {"index", "relevance_score", "document"} for r in results)
    assert_matches([(r["index"], r["relevance_score"]) for r in results], expected[:3])
    assert [r["document"]["text"] for r in results] == [DOCUMENTS[i] for i, _ in expected[:3]]
    # Cohere's object form of documents, no documents echoed by default
    objects = server.post("/v1/rerank", json={"query": QUERY, "documents": [{"text": d} for d in DOCUMENTS]})
    assert [set(r) for r in objects.json()["results"]] == [{"index", "relevance_score"}] * len(DOCUMENTS)


def test_elasticsearch_inference_rerank_shape(server, expected):
    body = {"query": QUERY, "input": DOCUMENTS, "top_n": 2, "return_documents": True}
    response = server.post("/_inference/rerank/ce", json=body)
    assert response.status_code == 200, response.text
    entries = response.json()["rerank"]
    assert all(set(e) == {"index", "relevance_score", "text"} for e in entries)
    assert_matches([(e["index"], e["relevance_score"]) for e in entries], expected[:2])
    settings = server.post("/_inference/rerank/ce", json={"query": QUERY, "input": DOCUMENTS,
                                                           "task_settings": {"top_n": 1}})
    assert [set(e) for e in settings.json()["rerank"]] == [{"index", "relevance_score"}]


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/rerank", {"query": QUERY, "texts": []}, 422, "documents must not be empty"),
        ("/rerank", {"texts": DOCUMENTS}, 422, "query"),
        ("/rerank", {"query": QUERY, "texts": DOCUMENTS * 2}, 413, "maximum of 8"),
        ("/rerank", {"query": QUERY, "texts": DOCUMENTS, "top_n": 0}, 422, "top_n"),
        ("/rerank", {"query": QUERY, "texts": DOCUMENTS, "model": "tiny"}, 422, "text_embedding, not rerank"),
        ("/rerank", {"query": QUERY, "texts": DOCUMENTS, "truncation_direction": "left"}, 422,
         "truncation_direction must be"),
        ("/v1/rerank", {"query": QUERY, "documents": []}, 422, "documents must not be empty"),
        ("/v1/rerank", {"query": QUERY, "documents": DOCUMENTS, "model": "nope"}, 404, "nope"),
        ("/_inference/rerank/ce", {"input": DOCUMENTS}, 422, "query"),
        ("/_inference/rerank/ce", {"query": QUERY, "input": DOCUMENTS * 2}, 413, "maximum of 8"),
    ],
)
def test_bad_rerank_requests_get_a_4xx_naming_the_problem(server, path, body, status, needle):
    response = server.post(path, json=body)
    assert response.status_code == status, response.text
    assert needle in response.text


def test_no_bi_encoder_stand_in_when_models_are_configured(server):
    with server.client() as client:
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["tiny", "ce"]


# ---- the starter set: a bi-encoder stand-in, named as what it is --------------------------------


def test_starter_server_reranks_with_an_honestly_named_bi_encoder(starter_client):
    models = {m["id"]: m for m in starter_client.get("/v1/models").json()["data"]}
    stand_in = models["all-minilm-l6-v2-bi-encoder-rerank"]
    assert stand_in["task"] == "rerank" and stand_in["kind"] == "bi-encoder"
    assert "not a cross-encoder" in stand_in["description"]
    info = starter_client.get("/info").json()
    assert "all-minilm-l6-v2-bi-encoder-rerank" in [m["model_id"] for m in info["models"]]

    documents = [
        "The Eiffel Tower is 330 metres tall and stands in Paris.",
        "Paris is the capital and largest city of France.",
        "Bananas are rich in potassium.",
    ]
    response = starter_client.post("/rerank", json={"query": "What is the capital of France?", "texts": documents})
    assert response.status_code == 200, response.text
    ranked = response.json()
    assert ranked[0]["index"] == 1 and ranked[-1]["index"] == 2
    assert all(-1.0 <= r["score"] <= 1.0 for r in ranked)
    cohere = starter_client.post("/v1/rerank", json={"query": "What is the capital of France?", "documents": documents})
    assert cohere.json()["model"] == "all-minilm-l6-v2-bi-encoder-rerank"
    assert [r["index"] for r in cohere.json()["results"]] == [r["index"] for r in ranked]
