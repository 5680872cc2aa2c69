"""Listwise reranking: jina-reranker-v3 ("last but not late interaction").

The query and a block of documents are read together in one causal prompt; the final hidden state
at a special token after each document (``<|embed_token|>``) and after the query's second copy
(``<|rerank_token|>``) goes through an MLP projector, and each document scores the cosine of its
vector with the query's. Everything below follows the published ``modeling.py``
(``JinaForRanking.rerank`` in the model repository's ``modeling.py``):

- the query is cut to ``max_query_tokens`` (512) and every document to ``max_document_tokens``
  (2048) tokens, a cut text being the decoded kept tokens;
- documents fill blocks in order: a block closes at ``block_documents`` (125) documents, or once the
  room left, ``limit - 2 * query tokens - the block's document tokens``, is at most one document's
  cap (``limit``: the model's token limit);
- one forward pass per block, the block's prompt being one packed sequence, so blocks batch with any
  other work of the model;
- blocks are merged as published: the per-block query vectors are averaged, each weighted by its
  block's best ``(1 + cosine) / 2``, and every document scores its cosine with that average. With a
  single block this is the block's own cosine.

Guards the published code does not have, which change nothing where it works as meant: text is
stripped of the special tokens until none is left (a single pass of ``str.replace`` rebuilds one out
of ``<|embed<|embed_token|>_token|>``); a block whose prompt would exceed the model's limit (the
published room count leaves out the prompt's own tokens) hands its last documents to a block of
their own; and when the limit is too small for the published caps, the caps shrink so that the
prompt with one document always fits.

Checkpoint (``JinaForRanking``: Qwen3ForCausalLM with its lm_head replaced by the projector): the
Qwen3 backbone under ``model.`` (loaded by ``Qwen3Encoder``), ``projector.0.weight`` [H/2, H] and
``projector.2.weight`` [E, H/2], no biases; E is read from the weights (512 in the published code,
256 on the blog). The two special tokens' ids come from the model's tokenizer (151670 and 151671 in
the published one).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from .checkpoint import CheckpointError
from .contract import Encoder, Heads
from .layers import WeightReader, load_linear
from .packing import PackedBatch
from .tokenizer import MAX_CHARS_PER_TOKEN, InputTooLong, TextTokenizer, TokenizedInput

DOC_EMBED_TOKEN = "<|embed_token|>"
QUERY_EMBED_TOKEN = "<|rerank_token|>"
# The published rerank()'s limits (its query cap, 512, is the catalog entry's max_query_tokens).
BLOCK_DOCUMENTS = 125
MAX_DOCUMENT_TOKENS = 2048
# Room kept beside the measured prompt frame when a small limit caps documents: a document can take a
# token or two more inside the prompt than alone, where byte-level BPE merges across its edges.
FIT_MARGIN_TOKENS = 8

SYSTEM_PROMPT = (
    "You are a search relevance expert who can determine a ranking of the passages based on how relevant they "
    "are to the query. If the query is a question, how relevant a passage is depends on how well it answers the "
    "question. If not, try to analyze the intent of the query and assess how well each passage satisfies the "
    "intent. If an instruction is provided, you should follow the instruction when determining the ranking."
)
PROMPT_PREFIX = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
PROMPT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def strip_special_tokens(text: str) -> str:
    """``text`` without the two special tokens, removed until none is left."""
    while DOC_EMBED_TOKEN in text or QUERY_EMBED_TOKEN in text:
        text = text.replace(QUERY_EMBED_TOKEN, "").replace(DOC_EMBED_TOKEN, "")
    return text


def format_block_prompt(query: str, documents: Sequence[str]) -> str:
    """One block's prompt, character for character as the published ``format_docs_prompts_func``
    builds it for ``rerank`` (``instruction=None``, ``no_thinking=True``)."""
    query = strip_special_tokens(query)
    body = (
        f"I will provide you with {len(documents)} passages, each indicated by a numerical identifier. "
        f"Rank the passages based on their relevance to query: {query}\n"
    )
    passages = (
        f'<passage id="{i}">\n{strip_special_tokens(doc)}{DOC_EMBED_TOKEN}\n</passage>'
        for i, doc in enumerate(documents)
    )
    body += "\n".join(passages) + "\n"
    body += f"<query>\n{query}{QUERY_EMBED_TOKEN}\n</query>"
    return PROMPT_PREFIX + body + PROMPT_SUFFIX


@dataclass(frozen=True, slots=True)
class ListwiseOptions:
    """Where one block's special tokens sit in its sequence (0-based). The defaults (no documents)
    are for inputs that are not blocks, such as warm-up and health probes: they yield no result."""

    document_positions: tuple[int, ...] = ()
    query_position: int = -1


@dataclass(frozen=True, slots=True)
class BlockEmbeddings:
    """One block's projected vectors, float32 on the host: query [E], documents [n, E] in order."""

    query: np.ndarray
    documents: np.ndarray


@dataclass(frozen=True, slots=True)
class ListwiseBlock:
    """One block's prompt: its documents (indices into the request's), its tokens and options."""

    documents: range
    tokens: TokenizedInput
    options: ListwiseOptions


class _CutText(NamedTuple):
    text: str
    tokens: int
    cut: bool


@dataclass(frozen=True)
class ListwiseLayout:
    """A request laid out in blocks, in document order; ``truncated`` per document (its text or the
    query was cut)."""

    blocks: list[ListwiseBlock]
    truncated: list[bool]


class Projector(nn.Module):
    """Linear → ReLU → Linear, from the hidden state at a special token to its ranking vector."""

    def __init__(self, hidden_size: int, inner_size: int, output_size: int, bias: bool):
        super().__init__()
        self.inner = nn.Linear(hidden_size, inner_size, bias=bias)
        self.out = nn.Linear(inner_size, output_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.inner(x)))


def load_projector(encoder: Encoder, reader: WeightReader) -> Projector | None:
    """jina-reranker-v3's projector beside the backbone (shapes from the weights); None when the
    checkpoint has none (a plain Qwen3)."""
    root = encoder.weight_prefix.removesuffix("model.") + "projector."
    if root + "0.weight" not in reader:
        return None
    inner_size, hidden_size = reader.get(root + "0.weight").shape
    output_size, projected_size = reader.get(root + "2.weight").shape
    if hidden_size != encoder.hidden_size or projected_size != inner_size:
        raise CheckpointError(
            f"projector shapes {(inner_size, hidden_size)} and {(output_size, projected_size)} do not chain "
            f"from the backbone's hidden size {encoder.hidden_size}"
        )
    with torch.device("meta"):
        projector = Projector(hidden_size, inner_size, output_size, bias=root + "0.bias" in reader)
    load_linear(projector.inner, reader, root + "0")
    load_linear(projector.out, reader, root + "2")
    return projector.eval()


# The Qwen3 family's heads: jina-reranker-v3's projector (``JinaForRanking``); the causal LM head is
# never read.
QWEN3_HEADS = Heads(listwise=load_projector, weight_prefixes=("lm_head.", "projector."))


class ListwiseReranker:
    """A causal encoder, its projector and the published prompt and block rules (a
    ``contract.ListwiseRunner``).

    ``build_blocks`` (host, tokenizer pool) lays a request out in blocks, ``run`` (executor) turns
    packed blocks into vectors, ``merge_blocks`` (host) turns one request's vectors into scores.
    ``run`` writes no state, so the executor threads of one model share it.
    """

    task: ClassVar[str] = "rerank"
    listwise: ClassVar[bool] = True
    pooling = "special_tokens"
    dimensions = 1

    def __init__(
        self,
        encoder: Encoder,
        projector: Projector,
        doc_token_id: int,
        query_token_id: int,
        block_documents: int = BLOCK_DOCUMENTS,
        max_document_tokens: int = MAX_DOCUMENT_TOKENS,
    ):
        if block_documents < 1 or max_document_tokens < 1:
            raise CheckpointError(
                f"rerank_block_documents ({block_documents}) and max_document_tokens ({max_document_tokens}) "
                "must be positive"
            )
        self.encoder = encoder
        self.projector = projector
        self.doc_token_id = doc_token_id
        self.query_token_id = query_token_id
        self.block_documents = block_documents
        self.max_document_tokens = max_document_tokens

    @classmethod
    def from_checkpoint(
        cls,
        encoder: Encoder,
        projector: Projector,
        tokenizer_file: Path,
        block_documents: int = BLOCK_DOCUMENTS,
        max_document_tokens: int = MAX_DOCUMENT_TOKENS,
    ) -> ListwiseReranker:
        """The runner around a loaded projector (``load_projector``), with the special tokens' ids
        from the model's tokenizer file."""
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        ids = {token: tokenizer.token_to_id(token) for token in (DOC_EMBED_TOKEN, QUERY_EMBED_TOKEN)}
        missing = [token for token, token_id in ids.items() if token_id is None]
        if missing:
            raise CheckpointError(
                f"{tokenizer_file} has no {' or '.join(missing)} token; a listwise reranker's tokenizer adds "
                f"{DOC_EMBED_TOKEN} and {QUERY_EMBED_TOKEN}"
            )
        return cls(encoder, projector, ids[DOC_EMBED_TOKEN], ids[QUERY_EMBED_TOKEN],
                   block_documents, max_document_tokens)

    @staticmethod
    def default_options() -> ListwiseOptions:
        return ListwiseOptions()

    # ---- executor side ---------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, batch: PackedBatch, options: Sequence[ListwiseOptions]) -> list[BlockEmbeddings | None]:
        """Project the hidden states at every block's special tokens; None for inputs without any."""
        hidden = self.encoder(batch)
        rows: list[int] = []
        spans: list[tuple[int, int] | None] = []
        start = 0
        for length, option in zip(batch.seq_lens, options):
            if option.document_positions:
                first = len(rows)
                rows.extend(start + p for p in option.document_positions)
                rows.append(start + option.query_position)
                spans.append((first, len(rows)))
            else:
                spans.append(None)
            start += length
        if not rows:
            return [None] * len(options)
        index = torch.tensor(rows, dtype=torch.long, device=hidden.device)
        vectors = self.projector(hidden.index_select(0, index)).float().cpu().numpy()
        return [
            None if span is None else BlockEmbeddings(vectors[span[1] - 1], vectors[span[0]: span[1] - 1])
            for span in spans
        ]

    # ---- host side: before and after the model ------------------------------------------------

    def build_blocks(
        self,
        tokenizer: TextTokenizer,
        query: str,
        documents: Sequence[str],
        max_query_tokens: int,
        limit: int,
        truncate: bool,
    ) -> ListwiseLayout:
        """Cut the query and documents to their caps and lay them out in blocks whose prompts fit
        ``limit`` tokens.

        Raises InputTooLong for a text over its cap when ``truncate`` is false (index -1: the query),
        and for a limit that leaves no room for the prompt with one document.
        """
        # The prompt without any text: what a block costs beside its query's two copies and its documents.
        frame = len(tokenizer.encode_ids([format_block_prompt("", [""])], True)[0])
        query_cap = min(max_query_tokens, (limit - frame - 1 - FIT_MARGIN_TOKENS) // 2)
        if query_cap < 1:
            raise InputTooLong(-1, frame + 2, None, limit)
        (query_text,) = self._cut(tokenizer, [query], query_cap, truncate, first_index=-1)

        one_document_frame = len(tokenizer.encode_ids([format_block_prompt(query_text.text, [""])], True)[0])
        document_cap = min(self.max_document_tokens, limit - one_document_frame - FIT_MARGIN_TOKENS)
        if document_cap < 1:
            raise InputTooLong(-1, one_document_frame + 1, None, limit)
        cut = self._cut(tokenizer, documents, document_cap, truncate)

        texts = [c.text for c in cut]
        lengths = [c.tokens for c in cut]
        truncated = [c.cut or query_text.cut for c in cut]
        published = self._published_blocks(lengths, query_text.tokens, document_cap, limit)
        blocks = [
            self._block(block, ids, any(truncated[i] for i in block))
            for block, ids in self._fitted(tokenizer, query_text.text, texts, lengths, published, limit)
        ]
        return ListwiseLayout(blocks=blocks, truncated=truncated)

    @staticmethod
    def _cut(
        tokenizer: TextTokenizer, texts: Sequence[str], cap: int, truncate: bool, first_index: int = 0
    ) -> list[_CutText]:
        """Each text cut to ``cap`` tokens as the published ``_truncate_texts`` cuts it: a text of
        ``cap`` tokens or more becomes the decoding of its first ``cap`` tokens. Counted without
        special tokens (the published Qwen tokenizer adds none)."""
        capped = [text[: cap * MAX_CHARS_PER_TOKEN] for text in texts]
        out = []
        for i, (text, short, ids) in enumerate(zip(texts, capped, tokenizer.encode_ids(capped, False))):
            over = len(ids) > cap or len(short) < len(text)
            if over and not truncate:
                raise InputTooLong(first_index if first_index < 0 else i, len(ids), None, cap)
            ids = ids[:cap]
            kept = tokenizer.decode(ids, skip_special_tokens=False) if len(ids) >= cap else short
            out.append(_CutText(kept, len(ids), over))
        return out

    def _published_blocks(self, lengths: list[int], query_tokens: int, document_cap: int, limit: int) -> list[range]:
        """The published split (``get_all_blocks``): a block closes at ``block_documents`` documents or
        once the room left is at most one document's cap."""
        blocks, start = [], 0
        room = limit - 2 * query_tokens
        for i, n in enumerate(lengths):
            room -= n
            if i + 1 - start >= self.block_documents or room <= document_cap:
                blocks.append(range(start, i + 1))
                start, room = i + 1, limit - 2 * query_tokens
        if start < len(lengths):
            blocks.append(range(start, len(lengths)))
        return blocks

    @staticmethod
    def _fitted(
        tokenizer: TextTokenizer, query: str, texts: list[str], lengths: list[int], blocks: list[range], limit: int
    ) -> Iterator[tuple[range, list[int]]]:
        """Each block with its prompt's tokens; a block over ``limit`` is split, its last documents
        (as many as cover the excess) becoming a block of their own."""

        def encode(parts: Sequence[range]) -> list[list[int]]:
            return tokenizer.encode_ids([format_block_prompt(query, texts[r.start: r.stop]) for r in parts], True)

        pending = deque(zip(blocks, encode(blocks)))
        while pending:
            block, ids = pending.popleft()
            if len(ids) <= limit:
                yield block, ids
                continue
            if len(block) == 1:  # only when the BPE merges beyond FIT_MARGIN_TOKENS
                raise InputTooLong(block.start, len(ids), None, limit)
            excess, stop = len(ids) - limit, block.stop
            while stop > block.start + 1 and excess > 0:
                stop -= 1
                excess -= lengths[stop]
            parts = (range(block.start, stop), range(stop, block.stop))
            pending.extendleft(reversed(list(zip(parts, encode(parts)))))

    def _block(self, documents: range, ids: list[int], truncated: bool) -> ListwiseBlock:
        array = np.asarray(ids)
        doc_positions = np.flatnonzero(array == self.doc_token_id)
        query_positions = np.flatnonzero(array == self.query_token_id)
        if len(doc_positions) != len(documents) or len(query_positions) != 1:
            raise RuntimeError(
                f"a block of {len(documents)} documents tokenized to {len(doc_positions)} document tokens and "
                f"{len(query_positions)} query tokens"
            )
        options = ListwiseOptions(tuple(doc_positions.tolist()), int(query_positions[0]))
        return ListwiseBlock(documents, TokenizedInput(ids=ids, type_ids=[0] * len(ids), truncated=truncated), options)

    @staticmethod
    def merge_blocks(blocks: Sequence[BlockEmbeddings]) -> list[float]:
        """Every document's score, in order, from its request's blocks (published merge, in float64)."""
        queries = np.stack([b.query for b in blocks]).astype(np.float64)
        weights = np.array([((1.0 + _cosines(q, b.documents)) / 2.0).max() for q, b in zip(queries, blocks)])
        if weights.sum() > 0:
            query = weights @ queries / weights.sum()
        else:  # every block's best document points exactly away from the query
            query = queries.mean(axis=0)
        return _cosines(query, np.concatenate([b.documents for b in blocks])).tolist()


def _cosines(query: np.ndarray, documents: np.ndarray) -> np.ndarray:
    documents = documents.astype(np.float64)
    norms = np.linalg.norm(documents, axis=1) * np.linalg.norm(query)
    return documents @ query / np.maximum(norms, 1e-12)
