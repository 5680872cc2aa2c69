"""A BERT-style WordPiece tokenizer for the GPU suite's random checkpoints, built from the
benchmark corpus with no package and no download.

GPU hosts of the suite have torch, transformers and sentence-transformers but no package registry,
so the suite cannot count on the MiniLM package the tests take their tokenizer from. Random
weights time the same whatever the vocabulary, so the suite writes its own: BERT's special-token
layout ([PAD] 0, [unused*], [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103), every character of the
corpus (and of printable ASCII) with its ``##`` continuation, then the corpus's most frequent
words, at most ``VOCAB_SIZE`` entries (the smallest vocabulary of the suite's models, so every id
is valid in each; the corpus holds a few thousand distinct words). It is
lower-casing, BertPreTokenizer-split and ``[CLS] A [SEP] (B [SEP])``-templated like MiniLM's, and
saved as the four files transformers, sentence-transformers and infercore read.

    python benchmarks/bench_tokenizer.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

VOCAB_SIZE = 30522
SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def build_vocab(texts: list[str], size: int = VOCAB_SIZE) -> list[str]:
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # Printable ASCII whatever the corpus holds, so no ordinary text maps to [UNK].
    chars = sorted({c for word in counts for c in word} | {chr(i).lower() for i in range(33, 127)})
    vocab += chars + [f"##{c}" for c in chars]
    seen = set(vocab)
    for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(vocab) >= size:
            break
        if word not in seen:
            vocab.append(word)
            seen.add(word)
    return vocab


def write_tokenizer(out: Path, vocab: list[str], max_length: int = 512) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    ids = {token: i for i, token in enumerate(vocab)}
    tokenizer = Tokenizer(models.WordPiece(ids, unk_token=SPECIALS["unk"], max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = SPECIALS["cls"], SPECIALS["sep"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, ids[cls]), (sep, ids[sep])],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens(list(SPECIALS.values()))
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokens = {f"{kind}_token": token for kind, token in SPECIALS.items()}
    (out / "special_tokens_map.json").write_text(json.dumps(tokens))
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": max_length,
              "tokenize_chinese_chars": True, "strip_accents": None, **tokens}
    (out / "tokenizer_config.json").write_text(json.dumps(config))


def build(out: Path) -> Path:
    """The tokenizer's files in ``out`` (reused when complete)."""
    if all((out / name).is_file() for name in FILES):
        return out
    import corpus

    write_tokenizer(out, build_vocab([*corpus.passage_pool(), *corpus.sentence_pool(), *corpus.query_pool()]))
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    target = build(Path(sys.argv[1]))
    print(f"wrote {', '.join(FILES)} to {target}")
