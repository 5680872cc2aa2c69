"""Reranking strategies: how one rerank request becomes work items and scores.

- cross-encoder: one (query, document) pair per work item, a long document split into sliding
  windows when the model uses them (its score: the best window's);
- listwise (jina-reranker-v3): documents in blocks, one prompt with the query per block and work
  item, the blocks' vectors merged as published (models/listwise.py);
- bi-encoder stand-in: cosine similarity of an embedding model's vectors of query and documents.

Each strategy uses the engine only through ``RerankPipeline`` (tokenize off the event loop, queue
and wait, account) and returns ``RerankScores``; the engine does admission, model lookup, request
checks and the ordering of the result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..models.embedding import EmbedOptions
from ..models.tokenizer import InputTooLong, TokenizedInput
from .canonical import EmbedResult, RerankRequest
from .errors import PayloadTooLarge

if TYPE_CHECKING:
    from .engine import ModelHandle
    from .executor import ItemResult

# A document longer than this many windows is cut after the last one.
MAX_RERANK_WINDOWS = 32


@dataclass(frozen=True)
class BiEncoderReranker:
    """The starter set's stand-in when no cross-encoder is loaded: cosine similarity of an
    embedding model's vectors of the query and of each document. Named and described as what it
    is; a configured cross-encoder replaces it."""

    id: str
    embedder: ModelHandle

    @property
    def description(self) -> str:
        return (
            f"bi-encoder reranker, not a cross-encoder: the cosine similarity of {self.embedder.id} embeddings "
            "of the query and of each document (scores in [-1, 1])"
        )


@dataclass(frozen=True)
class RerankScores:
    """One score and truncation flag per document (request order), the tokens computed and the
    seconds spent tokenizing, queued and computing (the slowest item's)."""

    scores: list[float]
    truncated: list[bool]
    tokens: int
    tokenization_s: float
    queue_s: float
    inference_s: float


class RerankPipeline(Protocol):
    """What a strategy needs from the engine."""

    auto_truncate: bool

    async def off_loop(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` on the tokenizer pool."""

    async def compute(
        self, handle: ModelHandle, tokenized: list[TokenizedInput], options: list, lane: str, deadline: float
    ) -> list[ItemResult]:
        """One work item per input, queued in ``lane``; their results once all are computed."""

    def observe(self, model_id: str, lane: str, items: int, tokens: int, stages: tuple[float, float, float]) -> None:
        """Record the inference metrics of one request."""

    def embed_for_rerank(
        self, handle: ModelHandle, texts: list[str], options: EmbedOptions, truncate: bool, lane: str, deadline: float
    ) -> Awaitable[EmbedResult]:
        """The shared embedding pipeline (tokenize, queue, wait) for the bi-encoder stand-in."""


Strategy = Callable[[RerankPipeline, Any, RerankRequest, str, float], Awaitable[RerankScores]]


def strategy_for(target: ModelHandle | BiEncoderReranker) -> Strategy:
    """The strategy that scores documents for ``target``."""
    if isinstance(target, BiEncoderReranker):
        return bi_encoder_scores
    if target.model.runner.listwise:
        return listwise_scores
    return cross_encoder_scores


def _scored(
    pipeline: RerankPipeline, handle: ModelHandle, lane: str, started: float, tokenized_at: float,
    tokenized: list[TokenizedInput], results: list[ItemResult], scores: list[float], truncated: list[bool],
) -> RerankScores:
    tokens = sum(len(t) for t in tokenized)
    stages = (tokenized_at - started, max(r.queue_s for r in results), max(r.inference_s for r in results))
    pipeline.observe(handle.id, lane, len(results), tokens, stages)
    return RerankScores(scores, truncated, tokens, *stages)


async def cross_encoder_scores(
    pipeline: RerankPipeline, handle: ModelHandle, request: RerankRequest, lane: str, deadline: float
) -> RerankScores:
    """Sigmoid of each pair's logit (raw logits with ``raw_scores``), the max over a document's windows."""
    model = handle.model
    started = time.perf_counter()
    truncate = pipeline.auto_truncate if request.truncate is None else request.truncate
    windows = model.rerank_windows and request.truncate is not False
    try:
        pairs = await pipeline.off_loop(
            model.tokenizer.encode_pairs, request.query, request.documents,
            model.max_query_tokens, windows, model.window_overlap_tokens, MAX_RERANK_WINDOWS, truncate or windows,
        )
    except InputTooLong as exc:
        raise PayloadTooLarge(
            f"document {exc.index} with the query is {exc.tokens} tokens, more than this model's {exc.limit}; "
            "send \"truncate\": true" if exc.index >= 0 else str(exc)
        ) from None
    tokenized_at = time.perf_counter()
    tokenized = [p.tokens for p in pairs]
    results = await pipeline.compute(handle, tokenized, [model.runner.default_options()] * len(pairs), lane, deadline)
    best = [float("-inf")] * len(request.documents)
    truncated = [False] * len(request.documents)
    for pair, result in zip(pairs, results):
        best[pair.document] = max(best[pair.document], result.value)
        truncated[pair.document] |= pair.tokens.truncated
    scores = best if request.raw_scores else [1.0 / (1.0 + math.exp(-x)) for x in best]
    return _scored(pipeline, handle, lane, started, tokenized_at, tokenized, results, scores, truncated)


async def listwise_scores(
    pipeline: RerankPipeline, handle: ModelHandle, request: RerankRequest, lane: str, deadline: float
) -> RerankScores:
    """A listwise model (jina-reranker-v3): the documents in blocks, each block one prompt with the
    query and one work item; the blocks' vectors merged as published (models/listwise.py).

    Scores are cosines in [-1, 1], the model's published relevance scores, so ``raw_scores``
    changes nothing. Query and documents are cut to the model's caps unless the request says
    ``"truncate": false``, which makes text over a cap a 413.
    """
    model = handle.model
    runner = model.runner
    started = time.perf_counter()
    try:
        layout = await pipeline.off_loop(
            runner.build_blocks, model.tokenizer, request.query, request.documents,
            model.max_query_tokens, model.max_input_tokens, request.truncate is not False,
        )
    except InputTooLong as exc:
        what = f"document {exc.index}" if exc.index >= 0 else "the query"
        if exc.limit < model.max_input_tokens:  # over its cap, and the request said "truncate": false
            raise PayloadTooLarge(
                f"{what} is {exc.tokens} tokens, more than this model's {exc.limit}; send \"truncate\": true"
            ) from None
        raise PayloadTooLarge(
            f"{what} does not fit this model's {exc.limit}-token prompt ({exc.tokens} tokens with the prompt)"
        ) from None
    tokenized_at = time.perf_counter()
    tokenized = [block.tokens for block in layout.blocks]
    results = await pipeline.compute(handle, tokenized, [block.options for block in layout.blocks], lane, deadline)
    scores = runner.merge_blocks([r.value for r in results])
    return _scored(pipeline, handle, lane, started, tokenized_at, tokenized, results, scores, layout.truncated)


async def bi_encoder_scores(
    pipeline: RerankPipeline, reranker: BiEncoderReranker, request: RerankRequest, lane: str, deadline: float
) -> RerankScores:
    """Cosine of the query's and each document's normalised embedding; over-long text is truncated
    unless the request says ``"truncate": false``."""
    truncate = True if request.truncate is None else request.truncate
    embedded = await pipeline.embed_for_rerank(
        reranker.embedder, [request.query, *request.documents], EmbedOptions(), truncate, lane, deadline
    )
    query, *documents = embedded.vectors
    scores = [float(np.dot(query, d)) for d in documents]
    t = embedded.timings
    return RerankScores(scores, embedded.truncated[1:], embedded.input_tokens, t.tokenization_s, t.queue_s,
                        t.inference_s)
