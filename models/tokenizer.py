"""Text → token ids with the model's own ``tokenizer.json`` (Rust ``tokenizers``; releases the GIL).

Truncation is done here rather than by the tokenizer's own settings so that one shared tokenizer
serves requests with different truncation options concurrently: inputs are encoded without special
tokens, cut to ``max_input_tokens - specials`` when allowed, then the model's post-processor adds
[CLS]/[SEP] (or <s>/</s> ...) exactly as ``tokenizer(text, truncation=True)`` would.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Encoding, Tokenizer

from .checkpoint import CheckpointError

# Characters allowed per token of the limit before tokenizing at all (TEI uses the same 250×), so a
# multi-megabyte string costs a slice, not a tokenizer pass.
MAX_CHARS_PER_TOKEN = 250


class InputTooLong(ValueError):
    """An input exceeds the model's token limit and truncation was not requested."""

    def __init__(self, index: int, tokens: int | None, chars: int | None, limit: int):
        self.index = index
        self.tokens = tokens
        self.limit = limit
        if tokens is not None:
            detail = f"{tokens} tokens"
        else:
            detail = f"{chars} characters, more than {limit * MAX_CHARS_PER_TOKEN} ({MAX_CHARS_PER_TOKEN} per token)"
        super().__init__(
            f"input {index} is too long: {detail}; this model accepts at most {limit} tokens per input. "
            "Send shorter inputs or set \"truncate\": true"
        )


@dataclass(frozen=True, slots=True)
class TokenizedInput:
    ids: list[int]
    type_ids: list[int]
    truncated: bool

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, slots=True)
class TokenizedPair:
    """One (query, document window) sequence; ``document`` indexes the request's documents."""

    document: int
    window: int
    tokens: TokenizedInput


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class TextTokenizer:
    """A model's tokenizer with the model's token limit; safe to share between threads."""

    def __init__(self, tokenizer: Tokenizer, max_input_tokens: int):
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tok = tokenizer
        self.max_input_tokens = max_input_tokens
        self.num_special_tokens = tokenizer.num_special_tokens_to_add(False)
        self.num_special_pair_tokens = tokenizer.num_special_tokens_to_add(True)
        if max_input_tokens <= self.num_special_tokens:
            raise CheckpointError(f"max_input_tokens {max_input_tokens} leaves no room next to the special tokens")

    @classmethod
    def from_file(cls, path: Path, max_input_tokens: int) -> TextTokenizer:
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
            raise CheckpointError(f"{path} is not a readable tokenizer.json ({exc})") from None
        return cls(tokenizer, max_input_tokens)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def prompt_length(self, prompt: str) -> int:
        """Tokens a prompt prefix contributes, counted the way sentence-transformers counts them
        (the prompt tokenized alone, minus a trailing special token)."""
        encoding = self._tok.encode(prompt, add_special_tokens=True)
        n = len(encoding.ids)
        if encoding.special_tokens_mask and encoding.special_tokens_mask[-1]:
            n -= 1
        return n

    def encode_batch(
        self,
        texts: Sequence[str],
        truncate: bool,
        left: bool = False,
        max_tokens: int | None = None,
    ) -> list[TokenizedInput]:
        """Tokenize ``texts`` in parallel (GIL released) with special tokens.

        Raises InputTooLong for the first input over the limit when ``truncate`` is false.
        ``max_tokens`` lowers the model's limit for this call.
        """
        limit = min(max_tokens or self.max_input_tokens, self.max_input_tokens)
        max_chars = limit * MAX_CHARS_PER_TOKEN
        capped = []
        for i, text in enumerate(texts):
            if len(text) > max_chars:
                if not truncate:
                    raise InputTooLong(i, None, len(text), limit)
                text = text[-max_chars:] if left else text[:max_chars]
            capped.append(text)
        content_limit = limit - self.num_special_tokens
        encodings = self._tok.encode_batch_fast(capped, add_special_tokens=False)
        out = []
        for i, enc in enumerate(encodings):
            n = len(enc.ids)
            truncated = n > content_limit
            if truncated:
                if not truncate:
                    raise InputTooLong(i, n + self.num_special_tokens, None, limit)
                enc.truncate(content_limit, direction="left" if left else "right")
            out.append(self._finish(enc, truncated))
        return out

    def encode_pairs(
        self,
        query: str,
        documents: Sequence[str],
        max_query_tokens: int,
        windows: bool,
        overlap_tokens: int,
        max_windows: int,
        truncate: bool,
    ) -> list[TokenizedPair]:
        """(query, document) sequences laid out by the tokenizer's pair template ([CLS] q [SEP] d
        [SEP], <s> q </s></s> d </s> ...), with the query kept: it is cut to ``max_query_tokens``
        and the document fills the rest of the window. A longer document becomes overlapping
        windows when ``windows`` (at most ``max_windows``; the rest is cut), else is cut when
        ``truncate``, else raises InputTooLong naming the document."""
        limit = self.max_input_tokens
        specials = self.num_special_pair_tokens
        query_enc = self._tok.encode(query[: max_query_tokens * MAX_CHARS_PER_TOKEN], add_special_tokens=False)
        query_cut = len(query_enc.ids) > max_query_tokens
        if query_cut:
            query_enc.truncate(max_query_tokens)
        room = limit - specials - len(query_enc.ids)
        if room < 1:
            raise InputTooLong(-1, len(query_enc.ids) + specials, None, limit)
        overlap = min(overlap_tokens, room // 4)
        max_doc_tokens = room + (max_windows - 1) * (room - overlap) if windows else room
        capped = [d[: max_doc_tokens * MAX_CHARS_PER_TOKEN] for d in documents]
        out = []
        encodings = self._tok.encode_batch_fast(capped, add_special_tokens=False)
        for index, (document, enc) in enumerate(zip(documents, encodings)):
            n = len(enc.ids)
            cut = query_cut or len(capped[index]) < len(document)
            if n <= room:
                out.append(TokenizedPair(index, 0, self._finish_pair(query_enc, enc, cut)))
                continue
            if not windows and not truncate:
                raise InputTooLong(index, n + len(query_enc.ids) + specials, None, limit)
            cut = cut or n > max_doc_tokens
            enc.truncate(max_doc_tokens)
            if not windows:
                out.append(TokenizedPair(index, 0, self._finish_pair(query_enc, enc, True)))
                continue
            enc.truncate(room, stride=overlap)
            parts = [enc, *enc.overflowing]
            for window, part in enumerate(parts):
                out.append(TokenizedPair(index, window, self._finish_pair(query_enc, part, cut)))
        return out

    def _finish_pair(self, query: Encoding, document: Encoding, truncated: bool) -> TokenizedInput:
        final = self._tok.post_process(query, document, True)
        return TokenizedInput(ids=final.ids, type_ids=final.type_ids, truncated=truncated)

    def _finish(self, enc: Encoding, truncated: bool) -> TokenizedInput:
        final = self._tok.post_process(enc, None, True)
        return TokenizedInput(ids=final.ids, type_ids=final.type_ids, truncated=truncated)

    def tokens(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[Token]]:
        """Tokens with their character spans in the input (special tokens have no span)."""
        result = []
        for text, enc in zip(texts, self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)):
            row = []
            for token_id, token, special, (start, stop) in zip(
                enc.ids, enc.tokens, enc.special_tokens_mask, enc.offsets
            ):
                if special:
                    row.append(Token(token_id, token, True, None, None))
                else:
                    row.append(Token(token_id, text[start:stop], False, start, stop))
            result.append(row)
        return result

    def encode_ids(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
        """Token ids of whole texts, untruncated (GIL released); the caller bounds their length."""
        return [enc.ids for enc in self._tok.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def vocabulary(self) -> list[str]:
        """Token strings by id ("" for an id the vocabulary skips)."""
        table = [""] * self.vocab_size
        for token, token_id in self._tok.get_vocab(with_added_tokens=True).items():
            if 0 <= token_id < len(table):
                table[token_id] = token
        return table
