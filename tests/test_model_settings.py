"""Per-model settings: one typed object (``ModelSettings``) and one precedence, infercore.json >
sentence-transformers files > catalog > defaults, for every field alike."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil

import pytest

from infercore.models.catalog import CatalogEntry
from infercore.models.checkpoint import CheckpointError
from infercore.models.loader import load_model
from infercore.models.settings import FILE_KEYS, ModelSettings, parse_settings_file, resolve_settings

ENTRY = CatalogEntry(
    id="cat", task="text_embedding", family="bert", pooling="last", max_input_tokens=64,
    prompts={"query": "q: ", "passage": "p: "}, default_prompt_name="query", similarity="dot_product",
)


def test_each_source_wins_over_the_ones_below_it():
    file = {"pooling": "cls"}
    st = {"pooling": "max", "max_input_tokens": 32}
    assert resolve_settings(file, st, ENTRY).pooling == "cls"
    assert resolve_settings({}, st, ENTRY).pooling == "max"
    assert resolve_settings({}, {}, ENTRY).pooling == "last"
    assert resolve_settings({}, {}, None).pooling is None
    assert resolve_settings({}, st, ENTRY).max_input_tokens == 32
    assert resolve_settings({"max_input_tokens": 16}, st, ENTRY).max_input_tokens == 16
    # catalog-only settings still come from the catalog under a directory's own settings
    assert resolve_settings(file, st, ENTRY).similarity == "dot_product"
    assert resolve_settings(file, st, None).similarity == "cosine"


def test_a_catalog_default_prompt_never_names_a_prompt_of_the_directorys_own_set():
    own = {"prompts": {"query": "search_query: "}}
    assert resolve_settings({}, own, ENTRY).default_prompt_name is None
    assert resolve_settings({}, {}, ENTRY).default_prompt_name == "query"
    # the directory's own default comes with its own prompts
    assert resolve_settings({}, {**own, "default_prompt_name": "query"}, ENTRY).default_prompt_name == "query"
    # infercore.json may switch the catalog's default off
    assert resolve_settings({"default_prompt_name": None}, {}, ENTRY).default_prompt_name is None
    with pytest.raises(CheckpointError, match="default prompt 'doc'"):
        resolve_settings({"default_prompt_name": "doc"}, {}, ENTRY)


def test_every_setting_is_a_settings_file_key_and_a_catalog_field():
    names = {f.name for f in dataclasses.fields(ModelSettings)}
    assert FILE_KEYS == (names - {"description", "similarity"}) | {"catalog_id"}
    assert names <= {f.name for f in dataclasses.fields(CatalogEntry)}


def test_the_settings_file_is_parsed_into_typed_values_or_refused_naming_the_key():
    parsed = parse_settings_file(
        {"matryoshka_dimensions": [64, 128], "end_of_life_date": "2030-01-31", "catalog_id": "x"}, "here.json"
    )
    assert parsed == {"matryoshka_dimensions": (64, 128), "end_of_life_date": dt.date(2030, 1, 31)}
    with pytest.raises(CheckpointError, match=r"here.json has unknown keys \['similarity'\]"):
        parse_settings_file({"similarity": "cosine"}, "here.json")
    with pytest.raises(CheckpointError, match=r"here\.json: end_of_life_date 'soon' is not a date"):
        parse_settings_file({"end_of_life_date": "soon"}, "here.json")


def test_a_loaded_model_carries_the_settings_in_force(tiny_bert_dir, tmp_path):
    """The directory's sentence_bert_config says 128 tokens; infercore.json says 16 and wins; the
    catalog entry the json points at supplies what neither says."""
    path = shutil.copytree(tiny_bert_dir, tmp_path / "m")
    (path / "infercore.json").write_text(json.dumps({
        "max_input_tokens": 16, "catalog_id": "microsoft-multilingual-e5-large", "prompts": {"q": "q: "},
    }))
    model = load_model("m", path, device="cpu")
    assert model.max_input_tokens == model.settings.max_input_tokens == 16
    assert model.prompts == {"q": "q: "} and model.default_prompt_name is None
    assert model.settings.description == model.catalog.description != ""


def test_backend_settings_are_checked_by_name_and_the_models_own_value_wins_over_the_server_flag(
    tiny_bert_dir, tmp_path
):
    parsed = parse_settings_file({"backend": "onnx", "quantize": "int8", "int8_quality_floor": 0.995}, "m.json")
    assert parsed == {"backend": "onnx", "quantize": "int8", "int8_quality_floor": 0.995}
    with pytest.raises(CheckpointError, match=r"m\.json: backend 'tensorrt' is not one of torch, onnx"):
        parse_settings_file({"backend": "tensorrt"}, "m.json")
    with pytest.raises(CheckpointError, match=r"m\.json: quantize 'int4' is not one of none, int8"):
        parse_settings_file({"quantize": "int4"}, "m.json")
    with pytest.raises(CheckpointError, match=r"m\.json: int8_quality_floor 2 is not a cosine"):
        parse_settings_file({"int8_quality_floor": 2}, "m.json")
    path = shutil.copytree(tiny_bert_dir, tmp_path / "m")
    (path / "infercore.json").write_text(json.dumps({"backend": "torch"}))
    # --backend onnx --quantize int8 on the server; the model's infercore.json keeps it on torch
    model = load_model("m", path, device="cpu", backend="onnx")
    assert (model.settings.backend, model.backend.name) == ("torch", "torch")
    (path / "infercore.json").write_text(json.dumps({"backend": "torch", "quantize": "int8"}))
    with pytest.raises(CheckpointError, match="quantize int8 needs the onnx backend"):
        load_model("m", path, device="cpu")
