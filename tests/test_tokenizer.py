"""TextTokenizer gives exactly what transformers' tokenizer gives, and refuses long inputs cheaply.

The reference is ``AutoTokenizer.from_pretrained(dir)(text, truncation=True, max_length=N)`` on the
real MiniLM tokenizer files (``truncation_side="left"`` for left truncation).
"""

from __future__ import annotations

import time

import pytest
from sentence_transformers import SentenceTransformer
from transformers import AutoTokenizer

from infercore.models.tokenizer import MAX_CHARS_PER_TOKEN, InputTooLong, TextTokenizer

TEXTS = [
    "hello world",
    "x",
    " ",
    "word " * 13,  # 13 content tokens + [CLS] [SEP] = 15
    "word " * 14,  # exactly 16 with the specials
    "word " * 15,  # one over 16
    "The Ærøskøbing café served crème brûlée; naïve señor Müller paid €12.50.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю. Ελληνικά κείμενα εδώ.",
    "東京都の天気は晴れです。北京欢迎你！서울특별시 한국어 텍스트",
    "مرحبا بالعالم — שלום עולם — नमस्ते दुनिया — สวัสดีชาวโลก",
    "emoji 🙂🚀 and 👩‍👩‍👧 family, tabs\tand\nnewlines\r\n  and\u00a0nbsp\u2003em-space",
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis " * 40,
    ("Elasticsearch is a distributed search engine. " * 200).strip(),
]
LIMITS = [5, 16, 128, 512]


@pytest.fixture(scope="module")
def tokenizer_file(minilm_dir):
    return minilm_dir / "tokenizer.json"


@pytest.fixture(scope="module")
def hf_right(minilm_dir):
    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def hf_left(minilm_dir):
    return AutoTokenizer.from_pretrained(minilm_dir, truncation_side="left")


def _reference(hf, texts, limit):
    out = hf(list(texts), truncation=True, max_length=limit)
    return out["input_ids"], out["token_type_ids"]


@pytest.mark.parametrize("limit", LIMITS)
def test_right_truncation_matches_transformers(limit, tokenizer_file, hf_right):
    ours = TextTokenizer.from_file(tokenizer_file, limit).encode_batch(TEXTS, truncate=True)
    ids, type_ids = _reference(hf_right, TEXTS, limit)
    assert [t.ids for t in ours] == ids
    assert [t.type_ids for t in ours] == type_ids


@pytest.mark.parametrize("limit", LIMITS)
def test_left_truncation_matches_transformers_truncation_side_left(limit, tokenizer_file, hf_left):
    ours = TextTokenizer.from_file(tokenizer_file, limit).encode_batch(TEXTS, truncate=True, left=True)
    ids, type_ids = _reference(hf_left, TEXTS, limit)
    assert [t.ids for t in ours] == ids
    assert [t.type_ids for t in ours] == type_ids


def test_truncated_flag_marks_exactly_the_inputs_that_were_cut(tokenizer_file, hf_right):
    ours = TextTokenizer.from_file(tokenizer_file, 16).encode_batch(TEXTS, truncate=True)
    full_lengths = [len(ids) for ids in hf_right(TEXTS)["input_ids"]]
    assert [t.truncated for t in ours] == [n > 16 for n in full_lengths]
    assert [len(t) for t in ours] == [min(n, 16) for n in full_lengths]


def test_input_exactly_at_the_limit_is_accepted_without_truncation(tokenizer_file, hf_right):
    (encoded,) = TextTokenizer.from_file(tokenizer_file, 16).encode_batch(["word " * 14], truncate=False)
    assert len(encoded) == 16
    assert not encoded.truncated
    assert encoded.ids == hf_right("word " * 14)["input_ids"]


def test_input_over_the_limit_without_truncate_raises_with_limit_and_token_count(tokenizer_file, hf_right):
    tokenizer = TextTokenizer.from_file(tokenizer_file, 16)
    long_text = "Съешь же ещё этих мягких французских булок, да выпей чаю."
    count = len(hf_right(long_text)["input_ids"])
    assert count > 16
    with pytest.raises(InputTooLong) as info:
        tokenizer.encode_batch(["short", "word " * 14, long_text, "word " * 40], truncate=False)
    assert info.value.index == 2
    assert info.value.tokens == count
    assert info.value.limit == 16
    message = str(info.value)
    assert f"{count} tokens" in message
    assert "at most 16 tokens" in message


def test_max_tokens_lowers_the_limit_for_one_call_only(tokenizer_file, hf_right):
    tokenizer = TextTokenizer.from_file(tokenizer_file, 128)
    lowered = tokenizer.encode_batch(TEXTS, truncate=True, max_tokens=8)
    assert [t.ids for t in lowered] == _reference(hf_right, TEXTS, 8)[0]
    # A per-call limit never raises the model's own.
    raised = tokenizer.encode_batch(TEXTS, truncate=True, max_tokens=100_000)
    assert [t.ids for t in raised] == _reference(hf_right, TEXTS, 128)[0]
    with pytest.raises(InputTooLong):
        tokenizer.encode_batch(["word " * 20], truncate=False, max_tokens=8)


MEGABYTES_OF_TEXT = "Elasticsearch stores documents and answers queries quickly. " * 170_000  # ~10 MB


def test_multi_megabyte_input_is_refused_before_tokenizing(tokenizer_file):
    tokenizer = TextTokenizer.from_file(tokenizer_file, 256)
    started = time.perf_counter()
    with pytest.raises(InputTooLong) as info:
        tokenizer.encode_batch(["fine", MEGABYTES_OF_TEXT], truncate=False)
    elapsed = time.perf_counter() - started
    # Tokenizing 10 MB takes seconds; the character pre-cap decides without tokenizing at all.
    assert elapsed < 1.0, f"refusing a {len(MEGABYTES_OF_TEXT)}-character input took {elapsed:.2f}s"
    assert info.value.index == 1
    message = str(info.value)
    assert str(len(MEGABYTES_OF_TEXT)) in message
    assert "at most 256 tokens" in message


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
def test_multi_megabyte_input_with_truncate_is_cut_cheaply_and_exactly(left, tokenizer_file, hf_right, hf_left):
    tokenizer = TextTokenizer.from_file(tokenizer_file, 256)
    started = time.perf_counter()
    (encoded,) = tokenizer.encode_batch([MEGABYTES_OF_TEXT], truncate=True, left=left)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"truncating a {len(MEGABYTES_OF_TEXT)}-character input took {elapsed:.2f}s"
    # The kept 256 tokens lie well inside the first (last) 20,000 characters, where transformers can
    # afford to look.
    window = MEGABYTES_OF_TEXT[-20_000:] if left else MEGABYTES_OF_TEXT[:20_000]
    hf = hf_left if left else hf_right
    assert encoded.ids == hf(window, truncation=True, max_length=256)["input_ids"]
    assert encoded.truncated
    assert len(MEGABYTES_OF_TEXT) > 256 * MAX_CHARS_PER_TOKEN


OFFSET_TEXTS = [
    "Héllo, Wörld!",
    "🙂 emoji before words and 🚀 between",
    "東京タワー and Москва",
    "  leading spaces\tand tabs  ",
    "prefix: don't split contractions-with-hyphens",
]


def test_token_offsets_slice_the_original_text(tokenizer_file, hf_right):
    tokens = TextTokenizer.from_file(tokenizer_file, 512).tokens(OFFSET_TEXTS)
    reference = hf_right(OFFSET_TEXTS, return_offsets_mapping=True)
    rows = zip(OFFSET_TEXTS, tokens, reference["input_ids"], reference["offset_mapping"], strict=True)
    for text, row, ids, offsets in rows:
        assert [t.id for t in row] == ids
        assert row[0].special and row[-1].special
        assert row[0].start is None and row[-1].stop is None
        for token, (start, stop) in zip(row[1:-1], offsets[1:-1], strict=True):
            assert not token.special
            assert (token.start, token.stop) == (start, stop)
            assert token.text == text[start:stop]
    # Character offsets, not byte offsets: words after an emoji are sliced intact, and the emoji's
    # [UNK] token maps back to the emoji itself.
    emoji_texts = [t.text for t in tokens[1]]
    assert {"🙂", "🚀", "before", "between"} <= set(emoji_texts)


def test_tokens_without_special_tokens(tokenizer_file):
    (row,) = TextTokenizer.from_file(tokenizer_file, 512).tokens(["hello world"], add_special_tokens=False)
    assert [(t.text, t.special, t.start, t.stop) for t in row] == [("hello", False, 0, 5), ("world", False, 6, 11)]


PROMPTS = [
    "query: ",
    "passage: ",
    "Represent this sentence for searching relevant passages: ",
    "Instruct: Given a web search query, retrieve relevant passages\nQuery: ",
    "",
    "🙂 ",
    "東京: ",
]


@pytest.fixture(scope="module")
def minilm_sentence_transformer(minilm_dir):
    return SentenceTransformer(str(minilm_dir), device="cpu")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_length_counts_like_sentence_transformers(prompt, tokenizer_file, minilm_sentence_transformer):
    expected = minilm_sentence_transformer[0]._get_prompt_length(prompt)
    assert TextTokenizer.from_file(tokenizer_file, 256).prompt_length(prompt) == expected

