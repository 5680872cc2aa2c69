"""Cross-encoder reranking: parity with sentence-transformers' CrossEncoder on tiny random BERT and
XLM-R checkpoints, Jina's flash key layout against the same weights in HF layout, query-keeping
truncation and sliding windows over long documents, scores, order and top_n at the engine."""

from __future__ import annotations

import asyncio
import itertools
import json
import math

import pytest
import torch

from infercore.models.checkpoint import CheckpointError
from infercore.models.loader import load_model
from infercore.models.packing import pack_sequences
from infercore.server.canonical import RerankRequest
from infercore.server.errors import PayloadTooLarge, ValidationError
from tests import tiny_checkpoints
from tests.engine_harness import make_engine

QUERY = "how do lighthouses warn ships at night"
DOCUMENTS = [
    "A lighthouse uses a rotating lamp and a Fresnel lens so that sailors see a flash pattern.",
    "Sourdough bread needs a starter that is fed with flour and water.",
    "Fog horns complement the light when visibility is poor.",
    "The keeper's cottage was painted white in 1902.",
    "x",
]


@pytest.fixture(scope="module")
def cross_encoders(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("cross-encoders")
    bert = tiny_checkpoints.build_bert_with_head(
        root / "bert", "BertForSequenceClassification", "bert-tiny-gelu-new", seed=21, num_labels=1
    )
    xlmr = tiny_checkpoints.build_xlmr_cross_encoder(root / "xlmr", seed=22)
    jina = tiny_checkpoints.to_jina_flash_layout(xlmr, root / "jina")
    return {"bert": bert, "xlmr": xlmr, "jina": jina}


def our_logits(model, query: str, documents: list[str]) -> list[float]:
    pairs = model.tokenizer.encode_pairs(query, documents, model.max_query_tokens, False, 0, 1, True)
    batch = pack_sequences([p.tokens.ids for p in pairs], [p.tokens.type_ids for p in pairs], device=model.device)
    return model.runner.run(batch, [model.runner.default_options()] * len(pairs))


@pytest.mark.parametrize("name", ["bert", "xlmr"])
def test_scores_match_sentence_transformers_cross_encoder(name, cross_encoders):
    from sentence_transformers import CrossEncoder

    path = cross_encoders[name]
    model = load_model(name, path, device="cpu")
    assert model.task == "rerank" and model.family == ("bert" if name == "bert" else "xlm-roberta")
    reference = CrossEncoder(str(path), device="cpu")
    pairs = [(QUERY, d) for d in DOCUMENTS]
    expected_logits = reference.predict(pairs, activation_fn=torch.nn.Identity(), convert_to_tensor=True)
    expected_sigmoid = reference.predict(pairs, activation_fn=torch.nn.Sigmoid(), convert_to_tensor=True)
    logits = our_logits(model, QUERY, DOCUMENTS)
    assert logits == pytest.approx(expected_logits.tolist(), abs=1e-5)
    assert [1 / (1 + math.exp(-x)) for x in logits] == pytest.approx(expected_sigmoid.tolist(), abs=1e-5)


def test_jina_flash_layout_gives_the_same_scores_as_the_hf_layout(cross_encoders):
    hf = load_model("xlmr", cross_encoders["xlmr"], device="cpu")
    jina = load_model("jina", cross_encoders["jina"], device="cpu")
    from safetensors import safe_open

    with safe_open(str(cross_encoders["jina"] / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "roberta.emb_ln.weight" in keys and "roberta.encoder.layers.0.mixer.Wqkv.weight" in keys
    assert not any(".attention.self." in k for k in keys)
    assert our_logits(jina, QUERY, DOCUMENTS) == pytest.approx(our_logits(hf, QUERY, DOCUMENTS), abs=1e-6)


def test_xlm_roberta_positions_start_after_the_padding_index(cross_encoders):
    """RoBERTa numbers positions from pad_token_id + 1; reading them from 0 changes every score."""
    model = load_model("xlmr", cross_encoders["xlmr"], device="cpu")
    assert model.runner.encoder.embeddings.position_offset == 1  # pad id 0 in this vocabulary
    assert model.max_input_tokens == 129  # 130 position rows minus the offset


def test_a_multi_label_classifier_is_not_served_as_a_reranker(tmp_path):
    path = tiny_checkpoints.build_bert_with_head(tmp_path / "two", "BertForSequenceClassification", num_labels=2)
    with pytest.raises(CheckpointError, match="2 labels is not a reranker"):
        load_model("two", path, device="cpu")


# ---- truncation that keeps the query, windows over long documents -----------------------------


@pytest.fixture(scope="module")
def small_window_model(cross_encoders, tmp_path_factory):
    """The BERT cross-encoder with a 48-token window, a 12-token query cap and windows on."""
    import shutil

    path = tmp_path_factory.mktemp("window") / "bert"
    shutil.copytree(cross_encoders["bert"], path)
    settings = {"max_input_tokens": 48, "max_query_tokens": 12, "rerank_windows": True, "window_overlap_tokens": 8}
    (path / "infercore.json").write_text(json.dumps(settings))
    return load_model("windowed", path, device="cpu")


def test_a_long_query_is_cut_and_the_document_fills_the_rest(small_window_model):
    model = small_window_model
    query = " ".join(["question"] * 30)
    (pair,) = model.tokenizer.encode_pairs(query, ["short answer"], 12, False, 0, 1, True)
    ids = pair.tokens.ids
    assert ids.count(model.tokenizer.vocabulary.index("question")) == 12
    assert pair.tokens.truncated
    assert model.tokenizer.decode(ids).endswith("short answer")


def test_long_documents_become_overlapping_windows_that_cover_them(small_window_model):
    model = small_window_model
    tokenizer = model.tokenizer
    document = " ".join(f"w{i}" for i in range(100))
    (single,) = tokenizer.encode_pairs("query", ["x"], 12, False, 0, 1, True)
    head = single.tokens.ids[:3]  # [CLS] query [SEP]
    document_ids = [t.id for t in tokenizer.tokens([document], add_special_tokens=False)[0]]
    pairs = tokenizer.encode_pairs("query", [document], 12, True, 8, 32, True)
    assert len(pairs) > 1 and all(p.document == 0 for p in pairs)
    assert [p.window for p in pairs] == list(range(len(pairs)))
    assert all(len(p.tokens) <= 48 for p in pairs)
    assert all(p.tokens.ids[:3] == head for p in pairs)  # every window carries the whole query
    windows = [p.tokens.ids[3:-1] for p in pairs]
    room = 48 - 3 - 1  # the window minus [CLS] query [SEP] and the closing [SEP]
    overlap = min(8, room // 4)
    assert all(len(w) == room for w in windows[:-1])
    for previous, current in itertools.pairwise(windows):
        assert previous[-overlap:] == current[:overlap]  # consecutive windows overlap
    rebuilt = windows[0] + [t for w in windows[1:] for t in w[overlap:]]
    assert rebuilt == document_ids  # every token of the document is scored, in order


def test_a_long_document_scores_the_max_over_its_windows(small_window_model):
    engine = make_engine("windowed", small_window_model.path)
    try:
        model = engine.models["windowed"].model
        document = " ".join(f"w{i}" for i in range(100))
        result = asyncio.run(engine.rerank(RerankRequest("query", [document, "tiny"], raw_scores=True)))
        pairs = model.tokenizer.encode_pairs("query", [document], 12, True, 8, 32, True)
        batch = pack_sequences([p.tokens.ids for p in pairs], [p.tokens.type_ids for p in pairs])
        windows = model.runner.run(batch, [model.runner.default_options()] * len(pairs))
        assert len(windows) > 1
        by_index = {r.index: r.score for r in result.ranked}
        assert by_index[0] == pytest.approx(max(windows), abs=1e-6)
        # truncate=false turns windows off: a document longer than the window is refused, not cut
        with pytest.raises(PayloadTooLarge, match="document 0 with the query is"):
            asyncio.run(engine.rerank(RerankRequest("query", [document], truncate=False)))
        # truncate=true without windows scores only the first window
        cut = asyncio.run(engine.rerank(RerankRequest("query", [document], raw_scores=True, truncate=True)))
        assert cut.ranked[0].score == pytest.approx(max(windows), abs=1e-6)  # windows stay on by default
    finally:
        engine.shutdown()


# ---- the engine: scores, order, top_n, errors --------------------------------------------------


@pytest.fixture(scope="module")
def bert_engine(cross_encoders):
    engine = make_engine("bert-ce", cross_encoders["bert"])
    yield engine
    engine.shutdown()


def test_results_are_sorted_by_score_with_sigmoid_by_default_and_top_n(bert_engine):
    full = asyncio.run(bert_engine.rerank(RerankRequest(QUERY, DOCUMENTS)))
    raw = asyncio.run(bert_engine.rerank(RerankRequest(QUERY, DOCUMENTS, raw_scores=True)))
    top = asyncio.run(bert_engine.rerank(RerankRequest(QUERY, DOCUMENTS, top_n=2)))
    scores = [r.score for r in full.ranked]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    assert sorted(r.index for r in full.ranked) == list(range(len(DOCUMENTS)))
    assert [r.index for r in raw.ranked] == [r.index for r in full.ranked]
    sigmoid = {r.index: 1 / (1 + math.exp(-r.score)) for r in raw.ranked}
    assert all(r.score == pytest.approx(sigmoid[r.index], abs=1e-7) for r in full.ranked)
    assert top.ranked == full.ranked[:2]
    assert full.lane == "search"


@pytest.mark.parametrize(
    ("request_", "error", "needle"),
    [
        (RerankRequest("", ["a"]), ValidationError, "query"),
        (RerankRequest("q", []), ValidationError, "documents must not be empty"),
        (RerankRequest("q", ["a", ""]), ValidationError, "document 1 is empty"),
        (RerankRequest("q", ["a"], top_n=0), ValidationError, "top_n"),
        (RerankRequest("q", ["a"] * 3000), PayloadTooLarge, "maximum of"),
    ],
)
def test_bad_rerank_requests_are_refused_naming_the_problem(bert_engine, request_, error, needle):
    with pytest.raises(error, match=needle):
        asyncio.run(bert_engine.rerank(request_))
