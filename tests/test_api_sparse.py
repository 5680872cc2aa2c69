"""Sparse embeddings over HTTP against `make serve`'s starter set (all-minilm-l6-v2 + splade-tiny):
TEI's /embed_sparse, its ``?format=tokens`` variant parsed the way Elasticsearch's ``hugging_face``
service parses it, and Elasticsearch's /_inference/sparse_embedding/{id}; sentence-transformers'
SparseEncoder on the same weights is the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infercore.models.catalog import lookup
from infercore.server.canonical import EmbedResult, spell_token

SPLADE = "splade-tiny"
TEXTS = [
    "how do tides depend on the moon and the sun",
    "Ferry timetable: departures at 06.40, 09.15 and 17.30 from pier no. 3.",
    "Straßenbahn-Fahrplan für Köln-Mülheim",
]
LONG_TEXT = " ".join(["the lighthouse keeper counted gulls along the breakwater"] * 80)  # > 512 tokens


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SparseEncoder

    encoder = SparseEncoder(str(lookup(SPLADE).starter_path()), device="cpu")
    dense = encoder.encode(TEXTS, convert_to_tensor=True).to_dense()
    vocabulary = encoder.tokenizer.convert_ids_to_tokens(list(range(dense.shape[1])))
    rows = [{int(i): float(row[i]) for i in torch.nonzero(row).flatten()} for row in dense]
    return rows, vocabulary


def close(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for key, weight in expected.items():
        assert got[key] == pytest.approx(weight, rel=1e-4, abs=1e-5), key


def parse_like_elasticsearch_hugging_face(body) -> list[dict[str, float]]:
    """HuggingFaceElserResponseEntity: a JSON array with one object per input, each mapping a token
    string to a number; anything else fails the parse."""
    assert isinstance(body, list)
    out = []
    for entry in body:
        assert isinstance(entry, dict)
        for token, weight in entry.items():
            assert isinstance(token, str) and token
            assert isinstance(weight, float) and not isinstance(weight, bool)
        out.append(entry)
    return out


def test_embed_sparse_returns_term_ids_and_weights_like_tei(starter_client, reference):
    expected, _ = reference
    response = starter_client.post("/embed_sparse", json={"inputs": TEXTS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body) == len(TEXTS)
    for row, want in zip(body, expected):
        assert all(set(pair) == {"index", "value"} for pair in row)
        values = [pair["value"] for pair in row]
        assert values == sorted(values, reverse=True) and min(values) > 0
        close({pair["index"]: pair["value"] for pair in row}, want)
    assert response.headers["x-compute-tokens"]
    assert response.headers["x-lane"] == "ingest"


def test_format_tokens_is_what_elasticsearch_hugging_face_service_parses(starter_client, reference):
    expected, vocabulary = reference
    response = starter_client.post("/embed_sparse?format=tokens", json={"inputs": TEXTS})
    assert response.status_code == 200, response.text
    parsed = parse_like_elasticsearch_hugging_face(response.json())
    assert len(parsed) == len(TEXTS)
    for entry, want in zip(parsed, expected):
        weights = list(entry.values())
        assert weights == sorted(weights, reverse=True) and min(weights) > 0
        assert not any("." in token for token in entry)
        close(entry, {vocabulary[i].replace(".", "__"): w for i, w in want.items()})


def test_a_single_string_input_and_pruning_options(starter_client):
    full = starter_client.post("/embed_sparse", json={"inputs": TEXTS[0]}).json()
    assert len(full) == 1
    top = starter_client.post("/embed_sparse", json={"inputs": TEXTS[0], "top_k": 4}).json()
    assert top == [full[0][:4]]
    threshold = full[0][len(full[0]) // 2]["value"]
    light = starter_client.post("/embed_sparse", json={"inputs": [TEXTS[0]], "min_weight": threshold}).json()
    assert light == [[pair for pair in full[0] if pair["value"] > threshold]]


def test_dots_become_double_underscores_in_token_output():
    from infercore.models.sparse import SparseVector

    vector = SparseVector(np.array([2, 0, 1], np.int32), np.array([1.5, 0.75, 0.25], np.float32))
    vocabulary = ["no.", "port", "e.g.x"]
    spelled = [spell_token(vocabulary[i]) for i in vector.ids.tolist()]
    (terms,) = EmbedResult("m", [vector], 3, 15, [False], terms=[spelled]).term_weights()
    assert terms == {"e__g__x": 1.5, "no__": 0.75, "port": 0.25}
    assert list(terms) == ["e__g__x", "no__", "port"]  # heaviest first, as Elasticsearch sorts


def test_elasticsearch_inference_api_shape_with_is_truncated(starter_client, reference):
    expected, vocabulary = reference
    response = starter_client.post(
        f"/_inference/sparse_embedding/{SPLADE}", json={"input": [TEXTS[0], LONG_TEXT], "input_type": "ingest"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == ["sparse_embedding"]
    first, long = body["sparse_embedding"]
    assert set(first) == {"is_truncated", "embedding"}
    assert first["is_truncated"] is False and long["is_truncated"] is True
    close(first["embedding"], {vocabulary[i].replace(".", "__"): w for i, w in expected[0].items()})
    assert long["embedding"]  # truncated, not refused: Elasticsearch expects truncation
    single = starter_client.post(f"/_inference/sparse_embedding/{SPLADE}", json={"input": TEXTS[0]}).json()
    assert single["sparse_embedding"][0]["embedding"] == first["embedding"]


def test_input_type_search_picks_the_search_lane(starter_client):
    response = starter_client.post(
        f"/_inference/sparse_embedding/{SPLADE}", json={"input": [TEXTS[0], TEXTS[1]], "input_type": "search"}
    )
    assert response.status_code == 200
    assert response.headers["x-lane"] == "search"


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/embed_sparse?format=xml", {"inputs": "a"}, 422, "format"),
        ("/embed_sparse", {"inputs": "a", "top_k": 0}, 422, "top_k"),
        ("/embed_sparse", {"inputs": "a", "min_weight": -1}, 422, "min_weight"),
        ("/embed_sparse", {"inputs": []}, 422, "empty"),
        ("/embed_sparse", {"inputs": "a", "model": "all-minilm-l6-v2"}, 422, "text_embedding"),
        ("/embed", {"inputs": "a", "model": SPLADE}, 422, "sparse_embedding"),
        ("/embed_sparse", {"inputs": LONG_TEXT, "truncate": False}, 413, "tokens"),
    ],
)
def test_bad_sparse_requests_get_a_4xx_naming_the_problem(starter_client, path, body, status, needle):
    response = starter_client.post(path, json=body)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/_inference/sparse_embedding/nope", {"input": "a"}, 404, "Inference endpoint not found [nope]"),
        ("/_inference/sparse_embedding/all-minilm-l6-v2", {"input": "a"}, 422, "Incompatible task_type"),
        (f"/_inference/sparse_embedding/{SPLADE}", {"input": "a", "input_type": "bogus"}, 422, "input_type"),
        (f"/_inference/sparse_embedding/{SPLADE}?timeout=soon", {"input": "a"}, 422, "timeout"),
        (f"/_inference/sparse_embedding/{SPLADE}", {"inputs": "a"}, 422, "input"),
        (f"/_inference/completion/{SPLADE}", {"input": "a"}, 422, "completion"),
    ],
)
def test_elasticsearch_dialect_errors_come_in_elasticsearch_shape(starter_client, path, body, status, needle):
    response = starter_client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["status"] == status
    assert needle in error["error"]["reason"]
    assert error["error"]["root_cause"][0]["reason"] == error["error"]["reason"]
    assert error["error"]["type"]


def test_the_sparse_model_is_listed_with_its_task(starter_client):
    models = {m["id"]: m for m in starter_client.get("/v1/models").json()["data"]}
    assert models[SPLADE]["task"] == "sparse_embedding"
    assert models[SPLADE]["dimensions"] == 30522
    assert models[SPLADE]["pooling"] == "splade"
