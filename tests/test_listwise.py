"""jina-reranker-v3 (listwise): scores and order as the published ``JinaForRanking.rerank`` computes
them, on a tiny random checkpoint in the published layout.

The reference below is that ``rerank`` transcribed (prompt, truncation by re-decoding, blocks closed
by count or by room, one unpadded forward per block, the weighted merge of the blocks' query vectors)
on transformers' own ``Qwen3Model`` with the same weights and a transformers tokenizer over the same
tokenizer.json: the remote code itself is not available offline. It keeps the published text (and its
single-pass sanitising) on purpose, apart from infercore's prompt code.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from infercore.models.checkpoint import CheckpointError
from infercore.models.listwise import ListwiseReranker
from infercore.models.loader import load_model
from infercore.models.packing import pack_sequences
from infercore.server.canonical import RerankRequest
from infercore.server.errors import PayloadTooLarge
from tests import tiny_listwise
from tests.engine_harness import InProcessServer, make_engine

TOLERANCE = 1e-4
QUERY = "how do lighthouses warn ships at night"
SENTENCES = [
    "A lighthouse uses a rotating lamp and a Fresnel lens so that sailors see a flash pattern at night.",
    "Sourdough bread needs a starter that is fed with flour and water every day.",
    "Fog horns complement the light when visibility is poor; ships hear them from miles away.",
    "The keeper's cottage was painted white in 1902 and still stands on the cliff.",
    "Common swifts stay airborne for ten months and are thought to sleep on the wing.",
    "Frigatebirds sleep in flight, one brain hemisphere at a time, for seconds at once.",
]
# Small caps so that one test request crosses them: 4 documents per block, 48 tokens per document,
# 24 per query, 1024 per prompt.
SETTINGS = {"max_input_tokens": 1024, "max_query_tokens": 24, "max_document_tokens": 48, "rerank_block_documents": 4}


def documents(n: int, offset: int = 0) -> list[str]:
    """n distinct documents: one to three sentences (some over 48 tokens), numbered."""
    out = []
    for i in range(offset, offset + n):
        parts = [SENTENCES[(i + k) % len(SENTENCES)] for k in range(1 + i % 3)]
        out.append(f"{i}. " + " ".join(parts))
    return out


# ---- the published algorithm, transcribed --------------------------------------------------------

PUBLISHED_SPECIAL_TOKENS = {"query_embed_token": "<|rerank_token|>", "doc_embed_token": "<|embed_token|>"}


def sanitize_input(text: str, special_tokens: dict[str, str]) -> str:
    for token in special_tokens.values():
        text = text.replace(token, "")
    return text


def format_docs_prompts_func(query, docs, instruction=None, special_tokens=PUBLISHED_SPECIAL_TOKENS,
                             no_thinking=True) -> str:
    query = sanitize_input(query, special_tokens)
    docs = [sanitize_input(doc, special_tokens) for doc in docs]
    prefix = (
        "<|im_start|>system\n"
        "You are a search relevance expert who can determine a ranking of the passages based on how relevant they are to the query. "  # noqa: E501
        "If the query is a question, how relevant a passage is depends on how well it answers the question. "
        "If not, try to analyze the intent of the query and assess how well each passage satisfies the intent. "
        "If an instruction is provided, you should follow the instruction when determining the ranking."
        "<|im_end|>\n<|im_start|>user\n"
    )
    suffix = "<|im_end|>\n<|im_start|>assistant\n"
    if no_thinking:
        suffix += "<think>\n\n</think>\n\n"
    doc_emb_token = special_tokens["doc_embed_token"]
    query_emb_token = special_tokens["query_embed_token"]
    prompt = (
        f"I will provide you with {len(docs)} passages, each indicated by a numerical identifier. "
        f"Rank the passages based on their relevance to query: {query}\n"
    )
    if instruction:
        prompt += f"<instruct>\n{instruction}\n</instruct>\n"
    doc_prompts = [f'<passage id="{i}">\n{doc}{doc_emb_token}\n</passage>' for i, doc in enumerate(docs)]
    prompt += "\n".join(doc_prompts) + "\n"
    prompt += f"<query>\n{query}{query_emb_token}\n</query>"
    return prefix + prompt + suffix


class PublishedReranker:
    """``JinaForRanking`` as published, on transformers' Qwen3Model; ``max_length`` plays the
    tokenizer's ``model_max_length``."""

    def __init__(self, model_dir: Path, max_length: int):
        from transformers import PreTrainedTokenizerFast, Qwen3Model

        # SDPA: eager attention is 5x slower on 2000-token prompts here, and test_qwen3 already holds the
        # backbone to eager attention.
        self.model = Qwen3Model.from_pretrained(model_dir, attn_implementation="sdpa").eval()
        weights = load_file(str(model_dir / "model.safetensors"))
        hidden = self.model.config.hidden_size
        self.projector = nn.Sequential(
            nn.Linear(hidden, hidden // 2, bias=False), nn.ReLU(),
            nn.Linear(hidden // 2, weights["projector.2.weight"].shape[0], bias=False),
        )
        self.projector.load_state_dict({f"{i}.weight": weights[f"projector.{i}.weight"] for i in (0, 2)})
        self._tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=str(model_dir / "tokenizer.json"), model_max_length=max_length,
            clean_up_tokenization_spaces=False, pad_token="<|endoftext|>",  # Qwen's pad token
        )
        self.doc_embed_token_id, self.query_embed_token_id = tiny_listwise.special_token_ids(model_dir)

    def forward(self, input_ids):
        hidden_states = self.model(input_ids=input_ids, output_hidden_states=True).hidden_states[-1]
        batch_size, _, dim = hidden_states.shape
        query_embed_token_indexes = torch.eq(input_ids, self.query_embed_token_id)
        doc_embed_token_indexes = torch.eq(input_ids, self.doc_embed_token_id)
        doc_embeds = self.projector(hidden_states[doc_embed_token_indexes].view(batch_size, -1, dim))
        query_embeds = self.projector(hidden_states[query_embed_token_indexes].unsqueeze(1))
        scores = torch.nn.functional.cosine_similarity(doc_embeds, query_embeds.expand_as(doc_embeds), dim=-1)
        return scores.squeeze(-1), query_embeds, doc_embeds

    def _truncate_texts(self, query, documents, max_query_length, max_doc_length):
        docs, doc_lengths = [], []
        for doc in documents:
            doc_tokens = self._tokenizer(doc, truncation=True, max_length=max_doc_length)
            if len(doc_tokens["input_ids"]) >= max_doc_length:
                doc = self._tokenizer.decode(doc_tokens["input_ids"])
            doc_lengths.append(len(doc_tokens["input_ids"]))
            docs.append(doc)
        query_tokens = self._tokenizer(query, truncation=True, max_length=max_query_length)
        if len(query_tokens["input_ids"]) >= max_query_length:
            query = self._tokenizer.decode(query_tokens["input_ids"])
        return query, docs, doc_lengths, len(query_tokens["input_ids"])

    def _compute_single_batch(self, query, docs):
        prompt = format_docs_prompts_func(query, docs, special_tokens=PUBLISHED_SPECIAL_TOKENS, no_thinking=True)
        batch = self._tokenizer(text=[prompt], padding=True, padding_side="left", return_tensors="pt")
        self.block_tokens.append(batch["input_ids"].shape[1])
        return self.forward(batch["input_ids"])

    @torch.no_grad()
    def rerank(self, query, documents, top_n=None, max_doc_length=2048, max_query_length=512, block_size=125):
        max_length = self._tokenizer.model_max_length
        self.block_tokens = []
        query, docs, doc_lengths, query_length = self._truncate_texts(query, documents, max_query_length,
                                                                      max_doc_length)
        length_capacity = max_length - 2 * query_length
        block_docs, doc_embeddings, query_embeddings, block_weights = [], [], [], []

        def run_block():
            scores, query_embeds, doc_embeds = self._compute_single_batch(query, block_docs)
            doc_embeddings.extend(doc_embeds[0].cpu().float().numpy())
            query_embeddings.append(query_embeds[0].cpu().float().numpy())
            block_weights.append(((1.0 + scores.view(-1).cpu().float().numpy()) / 2.0).max())

        for length, doc in zip(doc_lengths, docs):
            block_docs.append(doc)
            length_capacity -= length
            if len(block_docs) >= block_size or length_capacity <= max_doc_length:
                run_block()
                block_docs = []
                length_capacity = max_length - 2 * query_length
        if block_docs:
            run_block()
        query_embeddings = np.average(np.array(query_embeddings), axis=0, weights=block_weights)
        doc_embeddings = np.array(doc_embeddings)
        scores = np.dot(query_embeddings, doc_embeddings.T) / (
            np.linalg.norm(query_embeddings) * np.linalg.norm(doc_embeddings, axis=1)
        )
        scores_argsort = np.argsort(scores[0])[::-1]
        top_n = len(documents) if top_n is None else min(top_n, len(documents))
        return [(int(scores_argsort[i]), float(scores[0][scores_argsort[i]])) for i in range(top_n)]


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def listwise_dir(tmp_path_factory) -> Path:
    return tiny_listwise.build_listwise(tmp_path_factory.mktemp("listwise") / "reranker-tiny", seed=5,
                                       settings=SETTINGS)


@pytest.fixture(scope="module")
def served(listwise_dir):
    return load_model("reranker-tiny", listwise_dir, device="cpu")


@pytest.fixture(scope="module")
def published(listwise_dir) -> PublishedReranker:
    return PublishedReranker(listwise_dir, SETTINGS["max_input_tokens"])


def published_ranking(reference: PublishedReranker, query: str, docs: list[str], **caps) -> list[tuple[int, float]]:
    caps = {"max_doc_length": SETTINGS["max_document_tokens"], "max_query_length": SETTINGS["max_query_tokens"],
            "block_size": SETTINGS["rerank_block_documents"], **caps}
    return reference.rerank(query, docs, **caps)


def our_scores(model, query: str, docs: list[str], limit: int | None = None) -> tuple[list[float], list]:
    """Scores straight from the runner (blocks packed into one batch), and the blocks."""
    runner = model.runner
    layout = runner.build_blocks(model.tokenizer, query, docs, model.max_query_tokens,
                                 limit or model.max_input_tokens, True)
    batch = pack_sequences([b.tokens.ids for b in layout.blocks])
    return runner.merge_blocks(runner.run(batch, [b.options for b in layout.blocks])), layout.blocks


def ranking(scores: list[float]) -> list[tuple[int, float]]:
    return sorted(enumerate(scores), key=lambda pair: -pair[1])


def assert_same_ranking(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> float:
    assert [i for i, _ in got] == [i for i, _ in expected]
    diff = max(abs(a - b) for (_, a), (_, b) in zip(got, expected))
    assert diff <= TOLERANCE, f"max abs score diff {diff:.3g}"
    return diff


# ---- model --------------------------------------------------------------------------------------


def test_checkpoint_loads_as_a_listwise_reranker_with_its_projector_size_from_the_weights(served, listwise_dir):
    assert served.task == "rerank" and served.family == "qwen3"
    assert isinstance(served.runner, ListwiseReranker)
    assert served.catalog is not None and served.catalog.id == "jina-reranker-v3"  # recognised by architecture
    assert served.runner.projector.out.out_features == tiny_listwise.PROJECTOR_OUTPUT
    assert (served.runner.doc_token_id, served.runner.query_token_id) == tiny_listwise.special_token_ids(listwise_dir)
    assert (served.runner.block_documents, served.runner.max_document_tokens) == (4, 48)
    assert served.max_query_tokens == 24 and served.max_input_tokens == 1024


@pytest.mark.parametrize(
    ("query", "count"),
    [
        (QUERY, 3),  # one block
        (QUERY, 11),  # three blocks of at most 4, merged
        (" ".join([QUERY] * 5), 6),  # the query cut to 24 tokens, by decoding
    ],
)
def test_scores_and_order_match_the_published_rerank(served, published, query, count):
    docs = documents(count)
    scores, blocks = our_scores(served, query, docs)
    expected = published_ranking(published, query, docs)
    assert [len(b.documents) for b in blocks] == [min(4, count - i) for i in range(0, count, 4)]
    assert [len(b.tokens) for b in blocks] == published.block_tokens  # the same prompts, token for token
    assert_same_ranking(ranking(scores), expected)


def test_blocks_close_on_room_as_published_when_documents_are_long(listwise_dir, tmp_path):
    """No count limit here: 176- to 185-token documents under a 300-token cap fill a 1000-token prompt
    after four."""
    model = load_with_settings(listwise_dir, tmp_path / "long", {"max_input_tokens": 1000, "max_query_tokens": 24,
                                                                 "max_document_tokens": 300})
    docs = [long_document(model, 176 + i, seed=i) for i in range(10)]
    scores, blocks = our_scores(model, QUERY, docs)
    assert [len(b.documents) for b in blocks] == [4, 4, 2]
    reference = PublishedReranker(model.path, 1000)
    expected = reference.rerank(QUERY, docs, max_doc_length=300, max_query_length=24, block_size=125)
    assert [len(b.tokens) for b in blocks] == reference.block_tokens
    assert_same_ranking(ranking(scores), expected)


def load_with_settings(source: Path, target: Path, settings: dict):
    path = shutil.copytree(source, target)
    (path / "infercore.json").write_text(json.dumps(settings))
    return load_model(target.name, path, device="cpu")


def long_document(model, tokens: int, seed: int) -> str:
    """A document of exactly ``tokens`` tokens of the model's tokenizer."""
    words = " ".join(SENTENCES[(seed + k) % len(SENTENCES)] for k in range(40)).split()
    text = f"{seed}."
    for word in words:
        longer = f"{text} {word}"
        if len(model.tokenizer.encode_ids([longer], False)[0]) > tokens:
            break
        text = longer
    # Qwen's split makes every digit a token of its own.
    text += "7" * (tokens - len(model.tokenizer.encode_ids([text], False)[0]))
    assert len(model.tokenizer.encode_ids([text], False)[0]) == tokens
    return text


def test_a_block_never_exceeds_the_model_limit_where_the_published_room_count_would(listwise_dir, tmp_path):
    """290-token documents leave 110 tokens of room after three, fewer than the prompt around them
    takes: the published split would run a 1070-odd-token prompt in a 1000-token model; here the
    third document moves to a block of its own."""
    model = load_with_settings(listwise_dir, tmp_path / "tight", {"max_input_tokens": 1000, "max_query_tokens": 24,
                                                                  "max_document_tokens": 300})
    docs = [long_document(model, 290, seed=i) for i in range(7)]
    scores, blocks = our_scores(model, QUERY, docs)
    assert all(len(b.tokens) <= 1000 for b in blocks)
    assert [list(b.documents) for b in blocks] == [[0, 1], [2], [3, 4], [5], [6]]
    assert len(scores) == 7 and all(-1.0 <= s <= 1.0 for s in scores)


def test_more_than_125_documents_take_two_blocks_merged_as_published(listwise_dir, tmp_path):
    """The catalog's jina-reranker-v3 limits (125 per block, 2048 / 512 tokens), within the tiny model's
    4096 positions."""
    path = shutil.copytree(listwise_dir, tmp_path / "catalog")
    (path / "infercore.json").unlink()
    model = load_model("jina-reranker-v3", path, device="cpu")
    assert (model.runner.block_documents, model.runner.max_document_tokens, model.max_query_tokens) == (125, 2048, 512)
    assert model.max_input_tokens == tiny_listwise.MAX_POSITIONS
    docs = [f"{i}. " + " ".join(SENTENCES[i % len(SENTENCES)].split()[i % 4: i % 4 + 5]) for i in range(130)]
    scores, blocks = our_scores(model, QUERY, docs)
    assert [len(b.documents) for b in blocks] == [125, 5]
    reference = PublishedReranker(path, tiny_listwise.MAX_POSITIONS)
    assert_same_ranking(ranking(scores), reference.rerank(QUERY, docs))


def test_blocks_of_different_requests_share_a_packed_batch(served):
    """Each block is one packed sequence: computed beside other requests' blocks, it gives what it gives alone."""
    runner = served.runner
    layouts = [
        runner.build_blocks(served.tokenizer, q, documents(n, offset), 24, 1024, True)
        for q, n, offset in [(QUERY, 6, 0), ("which bird sleeps while flying", 3, 7)]
    ]
    blocks = [b for layout in layouts for b in layout.blocks]
    together = runner.run(pack_sequences([b.tokens.ids for b in blocks]), [b.options for b in blocks])
    alone = [runner.run(pack_sequences([b.tokens.ids]), [b.options])[0] for b in blocks]
    for shared, single in zip(together, alone):
        np.testing.assert_allclose(shared.documents, single.documents, atol=1e-5)
        np.testing.assert_allclose(shared.query, single.query, atol=1e-5)


def test_special_tokens_in_the_text_are_stripped_until_none_is_left(served):
    clean, _ = our_scores(served, QUERY, documents(3))
    injected = documents(3)
    injected[1] = injected[1].replace("lamp", "lamp<|embed<|embed_token|>_token|>").replace("a ", "a <|rerank_token|>")
    dirty, _ = our_scores(served, QUERY + "<|embed_token|>", injected)
    assert dirty == clean


def test_a_tokenizer_without_the_ranking_tokens_is_refused_at_load(listwise_dir, tmp_path):
    path = shutil.copytree(listwise_dir, tmp_path / "no-tokens")
    tiny_listwise.build_tokenizer(ranking_tokens=False).save(str(path / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=r"<\|embed_token\|>"):
        load_model("no-tokens", path, device="cpu")


# ---- engine and HTTP ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(listwise_dir):
    engine = make_engine("reranker-tiny", listwise_dir)
    yield engine
    engine.shutdown()


def test_engine_reranks_in_blocks_with_top_n_and_cosine_scores(engine, published):
    docs = documents(11)
    expected = published_ranking(published, QUERY, docs)
    result = asyncio.run(engine.rerank(RerankRequest(QUERY, docs, top_n=5)))
    assert_same_ranking([(r.index, r.score) for r in result.ranked], expected[:5])
    assert result.model == "reranker-tiny" and result.input_tokens == sum(published.block_tokens)
    # documents over 48 tokens were cut (one sentence here is 20-odd tokens)
    assert result.truncated == [len(served_ids(engine, d)) > 48 for d in docs] and any(result.truncated)
    raw = asyncio.run(engine.rerank(RerankRequest(QUERY, docs, top_n=5, raw_scores=True)))
    assert [(r.index, r.score) for r in raw.ranked] == [(r.index, r.score) for r in result.ranked]


def served_ids(engine, text: str) -> list[int]:
    return engine.models["reranker-tiny"].model.tokenizer.encode_ids([text], False)[0]


def test_truncate_false_refuses_text_over_its_cap_naming_it(engine):
    docs = documents(3)
    long = max(range(3), key=lambda i: len(served_ids(engine, docs[i])))
    with pytest.raises(PayloadTooLarge, match=rf"document {long} is \d+ tokens, more than this model's 48"):
        asyncio.run(engine.rerank(RerankRequest(QUERY, docs, truncate=False)))
    with pytest.raises(PayloadTooLarge, match="the query is"):
        asyncio.run(engine.rerank(RerankRequest(" ".join([QUERY] * 5), ["short"], truncate=False)))
    short = asyncio.run(engine.rerank(RerankRequest(QUERY, ["a lamp", "bread"], truncate=False)))
    assert short.truncated == [False, False]


@pytest.fixture(scope="module")
def server(engine):
    server = InProcessServer(engine).start()
    yield server
    server.stop()


def test_every_rerank_dialect_serves_the_listwise_scores(server, published):
    docs = documents(9)
    expected = published_ranking(published, QUERY, docs)

    tei = server.post("/rerank", json={"query": QUERY, "texts": docs, "top_n": 4})
    assert tei.status_code == 200, tei.text
    assert_same_ranking([(e["index"], e["score"]) for e in tei.json()], expected[:4])

    cohere = server.post("/v1/rerank", json={"model": "reranker-tiny", "query": QUERY, "documents": docs,
                                             "return_documents": True})
    assert cohere.status_code == 200, cohere.text
    results = cohere.json()["results"]
    assert_same_ranking([(r["index"], r["relevance_score"]) for r in results], expected)
    assert [r["document"]["text"] for r in results] == [docs[i] for i, _ in expected]

    es = server.post("/_inference/rerank/reranker-tiny", json={"query": QUERY, "input": docs, "top_n": 2})
    assert es.status_code == 200, es.text
    assert_same_ranking([(e["index"], e["relevance_score"]) for e in es.json()["rerank"]], expected[:2])

    eis = server.post("/api/v1/rerank/text/text-similarity",
                      json={"model": "reranker-tiny", "query": QUERY, "documents": docs, "top_n": 3})
    assert eis.status_code == 200, eis.text
    assert_same_ranking([(e["index"], e["relevance_score"]) for e in eis.json()["results"]], expected[:3])

    with server.client() as client:
        info = next(m for m in client.get("/v1/models").json()["data"] if m["id"] == "reranker-tiny")
    assert info["kind"] == "listwise" and info["task"] == "rerank"


def test_http_413_for_a_document_over_its_cap_without_truncation(server):
    response = server.post("/rerank", json={"query": QUERY, "texts": documents(3), "truncate": False})
    assert response.status_code == 413, response.text
    assert "more than this model's 48" in response.text

