"""Model metadata that changes what a request gets: end-of-life dates (a retired model answers 410
naming the date) and tasks of multi-task models (a task's instruction is prefixed; unknown tasks
are refused naming the known ones)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil

import numpy as np
import pytest

from infercore.models.checkpoint import CheckpointError
from infercore.models.loader import load_model
from infercore.server.canonical import EmbedRequest
from infercore.server.errors import ValidationError
from tests.engine_harness import InProcessServer, make_engine


def copy_with_settings(source, target, settings: dict):
    shutil.copytree(source, target)
    (target / "infercore.json").write_text(json.dumps(settings))
    return target


@pytest.mark.parametrize("dialect", ["native", "openai", "elasticsearch"])
def test_a_model_past_its_end_of_life_is_refused_naming_the_date(tiny_bert_dir, tmp_path, dialect):
    path = copy_with_settings(tiny_bert_dir, tmp_path / "old", {"end_of_life_date": "2020-01-31"})
    engine = make_engine("old", path)
    server = InProcessServer(engine).start()
    try:
        if dialect == "native":
            response = server.post("/embed", json={"inputs": "hello"})
            message = response.json()["error"]
        elif dialect == "openai":
            response = server.post("/v1/embeddings", json={"input": "hello", "model": "old"})
            message = response.json()["error"]["message"]
        else:
            response = server.post("/_inference/text_embedding/old", json={"input": "hello"})
            message = response.json()["error"]["reason"]
        assert response.status_code == 410, response.text
        assert "2020-01-31" in message and "end of life" in message
        with server.client() as client:
            listed = client.get("/v1/models").json()["data"][0]
        assert listed["end_of_life_date"] == "2020-01-31"
    finally:
        server.stop()
        engine.shutdown()


def test_a_model_before_its_end_of_life_is_served(tiny_bert_dir, tmp_path):
    future = (dt.date.today() + dt.timedelta(days=30)).isoformat()
    engine = make_engine("current", copy_with_settings(tiny_bert_dir, tmp_path / "m", {"end_of_life_date": future}))
    try:
        result = asyncio.run(engine.embed(EmbedRequest(["hello"])))
        assert len(result.vectors) == 1
    finally:
        engine.shutdown()


def test_an_unreadable_end_of_life_date_is_refused_at_load(tiny_bert_dir, tmp_path):
    path = copy_with_settings(tiny_bert_dir, tmp_path / "bad", {"end_of_life_date": "next spring"})
    with pytest.raises(CheckpointError, match="not a date"):
        load_model("bad", path, device="cpu")


@pytest.fixture(scope="module")
def tasks_engine(tiny_bert_dir, tmp_path_factory):
    settings = {"tasks": {"retrieval.query": "Represent the query: ", "text-matching": ""}}
    path = copy_with_settings(tiny_bert_dir, tmp_path_factory.mktemp("tasks") / "multi", settings)
    engine = make_engine("multi", path)
    yield engine
    engine.shutdown()


def test_a_task_prefixes_its_instruction(tasks_engine):
    with_task = asyncio.run(tasks_engine.embed(EmbedRequest(["lighthouse"], task="retrieval.query"))).vectors[0]
    spelled_out = asyncio.run(tasks_engine.embed(EmbedRequest(["Represent the query: lighthouse"]))).vectors[0]
    plain = asyncio.run(tasks_engine.embed(EmbedRequest(["lighthouse"], task="text-matching"))).vectors[0]
    np.testing.assert_allclose(with_task, spelled_out, atol=1e-6)
    assert np.abs(with_task - plain).max() > 1e-3


def test_an_unknown_task_is_refused_naming_the_known_ones(tasks_engine, tiny_bert_dir):
    with pytest.raises(ValidationError, match=r"retrieval\.query, text-matching"):
        asyncio.run(tasks_engine.embed(EmbedRequest(["x"], task="summarise")))
    plain = make_engine("plain", tiny_bert_dir)
    try:
        with pytest.raises(ValidationError, match="this model has no tasks"):
            asyncio.run(plain.embed(EmbedRequest(["x"], task="retrieval.query")))
    finally:
        plain.shutdown()


def test_a_default_task_must_be_one_of_the_tasks(tiny_bert_dir, tmp_path):
    path = copy_with_settings(tiny_bert_dir, tmp_path / "d", {"tasks": {"a": ""}, "default_task": "b"})
    with pytest.raises(CheckpointError, match="default task 'b'"):
        load_model("d", path, device="cpu")



# ---- recognising a catalog model served under another id ---------------------------------------


@pytest.mark.parametrize(
    ("config", "name", "expected"),
    [
        ({"model_type": "jina_embeddings_v5", "hidden_size": 1024}, "x", "jina-embeddings-v5-text-small"),
        ({"model_type": "jina_embeddings_v5", "hidden_size": 768}, "x", "jina-embeddings-v5-text-nano"),
        ({"architectures": ["XLMRobertaLoRA"], "lora_adaptations": ["retrieval.query"]}, "x", "jina-embeddings-v3"),
        ({"model_type": "jina_clip"}, "x", "jina-clip-v2"),
        ({"architectures": ["XLMRobertaForSequenceClassification"], "hidden_size": 768, "num_hidden_layers": 12,
          "max_position_embeddings": 1026, "vocab_size": 250002}, "x", "jina-reranker-v2-base-multilingual"),
        ({"model_type": "xlm-roberta"}, "multilingual-e5-large", "microsoft-multilingual-e5-large"),
        ({"model_type": "bert"}, "all-minilm-l6-v2", "all-minilm-l6-v2"),
        ({"architectures": ["XLMRobertaLoRA"]}, "x", None),  # no adapters: not v3
        ({"model_type": "xlm-roberta", "hidden_size": 1024}, "xlm-roberta-large", None),
    ],
)
def test_catalog_models_are_recognised_from_their_config_or_folder_name(config, name, expected):
    from infercore.models.catalog import recognise

    entry = recognise(config, name)
    assert (entry.id if entry else None) == expected


def test_a_directory_named_like_a_catalog_model_gets_its_settings(tiny_bert_dir, tmp_path):
    path = tmp_path / "multilingual-e5-large"
    shutil.copytree(tiny_bert_dir, path)
    (path / "config_sentence_transformers.json").unlink()  # no prompts of its own
    model = load_model("my-e5", path, device="cpu")
    assert model.catalog.id == "microsoft-multilingual-e5-large"
    assert model.prompts == {"query": "query: ", "passage": "passage: "}
    assert model.default_prompt_name == "passage"
    pinned = copy_with_settings(tiny_bert_dir, tmp_path / "pinned" / "multilingual-e5-large", {"catalog_id": "none"})
    assert load_model("pinned", pinned, device="cpu").catalog is None  # an explicit catalog_id wins
