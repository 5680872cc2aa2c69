"""What a model directory must hold, what overrides it, and the plain-words errors when it is wrong.

Covers ``read_model_dir`` / ``verify_model_dir`` / ``load_model``: pickle-only weights, missing files,
unsupported families, sharded safetensors, the ``infercore.json`` settings file and the
sentence-transformers modules (Dense supported, others refused by name).
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Dense, Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import LayerNorm, Pooling

from infercore.models.checkpoint import CheckpointError
from infercore.models.embedding import EmbedOptions
from infercore.models.loader import load_model
from infercore.models.model_dir import read_model_dir
from infercore.models.packing import pack_sequences
from infercore.models.tokenizer import InputTooLong
from infercore.models.verify import verify_model_dir
from tests import tiny_checkpoints

TEXTS = ["hello world", "a", "Ærøskøbing harbour at dawn", "search engines rank documents " * 40]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return tiny_checkpoints.build_bert(tmp_path_factory.mktemp("model-dir") / "base", "bert-tiny")


@pytest.fixture(scope="module")
def sharded_dir(base_dir, tmp_path_factory) -> Path:
    return tiny_checkpoints.build_sharded_bert(tmp_path_factory.mktemp("model-dir") / "sharded", base_dir)


def _copy(source: Path, tmp_path: Path, name: str = "model") -> Path:
    target = tmp_path / name
    shutil.copytree(source, target)
    return target


def _embed(model, texts=TEXTS, **options) -> np.ndarray:
    tokenized = model.tokenizer.encode_batch(texts, truncate=True)
    batch = pack_sequences([t.ids for t in tokenized], [t.type_ids for t in tokenized])
    return np.stack(model.runner.run(batch, [EmbedOptions(**options)] * len(texts)))


def _refusal(path: Path) -> str:
    """The message of the CheckpointError that loading ``path`` raises; verify reports the same."""
    with pytest.raises(CheckpointError) as info:
        load_model("m", path, device="cpu")
    report = verify_model_dir(path)
    assert not report.ok
    assert report.problem == str(info.value)
    return str(info.value)


class _RunsCodeWhenUnpickled:
    """A pickle payload that leaves a marker file behind if anything unpickles it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ---- weights and files ----


def test_pickle_only_checkpoint_is_refused_without_unpickling(base_dir, tmp_path):
    path = _copy(base_dir, tmp_path)
    marker = tmp_path / "unpickled"
    state = dict(load_file(str(path / "model.safetensors")))
    (path / "model.safetensors").unlink()
    with open(path / "pytorch_model.bin", "wb") as f:
        pickle.dump({**state, "payload": _RunsCodeWhenUnpickled(marker)}, f)
    message = _refusal(path)
    assert "pytorch_model.bin" in message
    assert "safetensors" in message
    assert "pickle" in message
    assert not marker.exists()


def test_missing_tokenizer_json_is_refused(base_dir, tmp_path):
    path = _copy(base_dir, tmp_path)
    (path / "tokenizer.json").unlink()  # vocab.txt alone is not enough
    message = _refusal(path)
    assert "tokenizer.json" in message


def test_missing_config_json_is_refused(base_dir, tmp_path):
    path = _copy(base_dir, tmp_path)
    (path / "config.json").unlink()
    message = _refusal(path)
    assert "config.json" in message
    assert "not found" in message


def test_unsupported_model_type_is_refused_by_name(base_dir, tmp_path):
    path = _copy(base_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="distilbert", architectures=["DistilBertModel"])
    (path / "config.json").write_text(json.dumps(config))
    message = _refusal(path)
    assert "'distilbert'" in message
    assert "not supported" in message
    assert "bert" in message.split("supported model types:")[1]


def test_sharded_checkpoint_matches_single_file(base_dir, sharded_dir):
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 2
    assert not (sharded_dir / "model.safetensors").exists()
    spec = read_model_dir(sharded_dir)
    assert [p.name for p in spec.weight_files] == shards

    single = _embed(load_model("single", base_dir, device="cpu"), normalize=False)
    sharded = _embed(load_model("sharded", sharded_dir, device="cpu"), normalize=False)
    np.testing.assert_array_equal(sharded, single)


def test_index_listing_a_missing_shard_is_refused(sharded_dir, tmp_path):
    path = _copy(sharded_dir, tmp_path)
    missing = sorted(path.glob("model-*.safetensors"))[-1]
    missing.unlink()
    message = _refusal(path)
    assert missing.name in message
    assert "model.safetensors.index.json" in message


# ---- infercore.json settings ----


def _with_settings(base_dir: Path, tmp_path: Path, settings: dict) -> Path:
    path = _copy(base_dir, tmp_path)
    (path / "infercore.json").write_text(json.dumps(settings))
    return path


def test_settings_file_overrides_pooling(base_dir, tmp_path):
    assert load_model("m", base_dir, device="cpu").runner.pooling == "mean"
    model = load_model("m", _with_settings(base_dir, tmp_path, {"pooling": "cls"}), device="cpu")
    assert model.runner.pooling == "cls"
    tokenized = model.tokenizer.encode_batch(TEXTS, truncate=True)
    batch = pack_sequences([t.ids for t in tokenized])
    with torch.inference_mode():
        cls_rows = model.runner.encoder(batch)[batch.cu_seqlens[:-1].long()].numpy()
    np.testing.assert_allclose(_embed(model, normalize=False), cls_rows, atol=1e-6)


def test_settings_file_overrides_max_input_tokens(base_dir, tmp_path):
    assert load_model("m", base_dir, device="cpu").max_input_tokens == 128  # sentence_bert_config.json
    model = load_model("m", _with_settings(base_dir, tmp_path, {"max_input_tokens": 16}), device="cpu")
    assert model.max_input_tokens == 16
    assert len(model.tokenizer.encode_batch(["word " * 50], truncate=True)[0]) == 16
    with pytest.raises(InputTooLong, match="at most 16 tokens"):
        model.tokenizer.encode_batch(["word " * 15], truncate=False)


def test_settings_file_overrides_prompts(base_dir, tmp_path):
    settings = {"prompts": {"query": "search_query: ", "document": "search_document: "},
                "default_prompt_name": "query", "include_prompt": False}
    model = load_model("m", _with_settings(base_dir, tmp_path, settings), device="cpu")
    assert model.prompts == settings["prompts"]
    assert model.default_prompt_name == "query"
    assert not model.include_prompt
    assert model.prompt_skip_tokens("query") == 5  # [CLS] search _ query :


def test_settings_file_rejects_unknown_keys(base_dir, tmp_path):
    message = _refusal(_with_settings(base_dir, tmp_path, {"pooling_mode": "cls"}))
    assert "infercore.json" in message
    assert "'pooling_mode'" in message


def test_settings_file_rejects_unknown_pooling_mode(base_dir, tmp_path):
    """A typo in the settings file must fail at load in plain words, not at the first request."""
    message = _refusal(_with_settings(base_dir, tmp_path, {"pooling": "average"}))
    assert "'average'" in message


def test_default_prompt_must_be_one_of_the_prompts(base_dir, tmp_path):
    message = _refusal(_with_settings(base_dir, tmp_path, {"prompts": {"query": "q: "}, "default_prompt_name": "doc"}))
    assert "'doc'" in message


# ---- sentence-transformers modules ----


def _save_sentence_transformer(base_dir: Path, out: Path, modules: Callable[[], list]) -> Path:
    """A model built and saved by sentence-transformers itself: Transformer + the given modules."""
    torch.manual_seed(3)
    transformer = Transformer(str(base_dir), max_seq_length=64)
    SentenceTransformer(modules=[transformer, *modules()], device="cpu").save(str(out))
    return out


DENSE_MODELS = {
    "tanh": lambda: [Pooling(32, "mean"), Dense(32, 16), Normalize()],
    "identity-no-bias": lambda: [
        Pooling(32, "cls"), Dense(32, 20, bias=False, activation_function=torch.nn.Identity()), Normalize(),
    ],
    "two-stacked": lambda: [
        Pooling(32, "max"), Dense(32, 24, activation_function=torch.nn.ReLU()),
        Dense(24, 8, activation_function=torch.nn.GELU()), Normalize(),
    ],
}


@pytest.mark.parametrize("name", list(DENSE_MODELS))
def test_dense_module_matches_sentence_transformers(name, base_dir, tmp_path):
    path = _save_sentence_transformer(base_dir, tmp_path / name, DENSE_MODELS[name])
    assert "Dense" in read_model_dir(path).st_modules
    reference = SentenceTransformer(str(path), device="cpu").encode(TEXTS)
    model = load_model(name, path, device="cpu")
    assert model.dimensions == reference.shape[1]
    ours = _embed(model)
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, atol=1e-5)


DENSE_FEATURES = {
    # ST 6: out = act(linear(x)) + x (or + residual(x))
    "use_residual": lambda: [Pooling(32, "mean"), Dense(32, 32, use_residual=True), Normalize()],
    # A Dense placed before Pooling runs on every token, not on the pooled vector.
    "token_embeddings": lambda: [Dense(32, 16, module_input_name="token_embeddings"), Pooling(16, "mean"), Normalize()],
}


@pytest.mark.parametrize("feature", list(DENSE_FEATURES))
def test_dense_feature_is_computed_or_refused_never_ignored(feature, base_dir, tmp_path):
    path = _save_sentence_transformer(base_dir, tmp_path / feature, DENSE_FEATURES[feature])
    assert feature in (path / "modules.json").read_text() + "".join(p.read_text() for p in path.glob("*/config.json"))
    try:
        model = load_model(feature, path, device="cpu")
    except CheckpointError as exc:
        assert feature in str(exc), f"refused, but without naming {feature!r}: {exc}"
        return
    reference = SentenceTransformer(str(path), device="cpu").encode(TEXTS)
    ours = _embed(model)
    assert ours.shape == reference.shape
    diff = float(np.abs(ours - reference).max())
    assert diff <= 1e-5, f"Dense with {feature!r} loads but its vectors differ from sentence-transformers ({diff=:.3g})"


def _with_st_pooling(base_dir: Path, tmp_path: Path, pooling: Pooling) -> Path:
    """base_dir with its Pooling config as sentence-transformers 6 writes it (``pooling_mode`` by name)."""
    path = _copy(base_dir, tmp_path)
    shutil.rmtree(path / "1_Pooling")
    (path / "1_Pooling").mkdir()
    pooling.save(str(path / "1_Pooling"))
    return path


@pytest.mark.parametrize(
    ("st_mode", "ours"),
    [
        ("cls", "cls"), ("mean", "mean"), ("max", "max"),
        ("lasttoken", "last"), ("mean_sqrt_len_tokens", "mean_sqrt_len"),
    ],
)
def test_pooling_mode_named_by_sentence_transformers_6_is_read(st_mode, ours, base_dir, tmp_path):
    path = _with_st_pooling(base_dir, tmp_path, Pooling(32, st_mode, include_prompt=False))
    assert json.loads((path / "1_Pooling" / "config.json").read_text())["pooling_mode"] == st_mode
    spec = read_model_dir(path)
    assert (spec.pooling, spec.include_prompt) == (ours, False)


@pytest.mark.parametrize(
    ("st_mode", "named"), [("weightedmean", "'weightedmean'"), (("cls", "mean"), "['cls', 'mean']")],
    ids=["weightedmean", "cls+mean"],
)
def test_unsupported_pooling_mode_is_refused_by_name(st_mode, named, base_dir, tmp_path):
    message = _refusal(_with_st_pooling(base_dir, tmp_path, Pooling(32, st_mode)))
    assert named in message


def test_unsupported_sentence_transformers_module_is_refused_by_name(base_dir, tmp_path):
    path = _save_sentence_transformer(
        base_dir, tmp_path / "layer-norm", lambda: [Pooling(32, "mean"), LayerNorm(32), Normalize()]
    )
    message = _refusal(path)
    assert "'LayerNorm'" in message
    assert "modules.json" in message


def test_verify_loads_and_describes_a_good_directory(base_dir):
    report = verify_model_dir(base_dir, load=True)
    assert report.ok, report.problem
    assert report.family == "bert"
    assert report.task == "text_embedding"
    assert any("model.safetensors" in fact for fact in report.facts)
    assert any("32-d mean pooling" in fact for fact in report.facts)
