"""The real all-MiniLM-L6-v2 starter model gives sentence-transformers' vectors.

Our path: ``model.tokenizer.encode_batch`` → ``pack_sequences`` → ``model.runner.run``; the reference is
``SentenceTransformer(minilm_dir).encode(..., normalize_embeddings=True)``. Inputs cover many
scripts, emoji, odd whitespace, one-character inputs and inputs far past the 256-token limit that
sentence_bert_config.json sets.
"""

from __future__ import annotations

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from infercore.models.embedding import EmbedOptions
from infercore.models.loader import load_model
from infercore.models.packing import pack_sequences

LONG_ENGLISH = " ".join(f"Sentence {i} talks about distributed search, shards and replicas." for i in range(300))
LONG_CJK = "東京は日本の首都であり、多くの人々が暮らしています。" * 120
LONG_MIXED = ("Ελληνικά и русский text مع العربية 🙂 " * 200).strip()

TEXTS = {
    "latin accents": "Le garçon a mangé une crème brûlée à Besançon; señor Núñez läuft über die Straße.",
    "cyrillic": "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "greek": "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "arabic": "نص حكيم له سر قاطع وذو شأن عظيم مكتوب على ثوب أخضر ومغلف بجلد أزرق",
    "hebrew": "דג סקרן שט בים מאוכזב ולפתע מצא חברה",
    "cjk": "我能吞下玻璃而不伤身体。私はガラスを食べられます。나는 유리를 먹을 수 있어요.",
    "hindi": "मैं काँच खा सकता हूँ और मुझे उससे कोई चोट नहीं पहुंचती।",
    "thai": "ฉันกินกระจกได้ แต่มันไม่ทำให้ฉันเจ็บ",
    "emoji": "I love this place 😍🔥 10/10 would visit again 👍🏽👩‍💻",
    "only emoji": "🚀🚀🚀",
    "mixed whitespace": "  tabs\there,\nnewlines\r\nand\u00a0non-breaking\u2003spaces   ",
    "one letter": "a",
    "one digit": "7",
    "one punctuation": "?",
    "short english": "Hi",
    "long english": LONG_ENGLISH,
    "long cjk": LONG_CJK,
    "long mixed scripts": LONG_MIXED,
}


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return load_model("all-minilm-l6-v2", minilm_dir, device="cpu")


@pytest.fixture(scope="module")
def reference(minilm_dir):
    return SentenceTransformer(str(minilm_dir), device="cpu")


def _embed(model, texts: list[str]) -> np.ndarray:
    tokenized = model.tokenizer.encode_batch(texts, truncate=True)
    batch = pack_sequences([t.ids for t in tokenized], [t.type_ids for t in tokenized])
    return np.stack(model.runner.run(batch, [EmbedOptions()] * len(texts)))


@pytest.fixture(scope="module")
def both_embeddings(minilm, reference) -> tuple[np.ndarray, np.ndarray]:
    texts = list(TEXTS.values())
    return _embed(minilm, texts), reference.encode(texts, normalize_embeddings=True, batch_size=32)


def test_minilm_limit_comes_from_sentence_bert_config(minilm):
    assert minilm.max_input_tokens == 256
    assert minilm.dimensions == 384
    assert minilm.runner.pooling == "mean"


@pytest.mark.parametrize("name", list(TEXTS))
def test_minilm_matches_sentence_transformers(name, both_embeddings):
    index = list(TEXTS).index(name)
    ours, theirs = both_embeddings[0][index], both_embeddings[1][index]
    assert ours.shape == theirs.shape == (384,)
    np.testing.assert_allclose(np.linalg.norm(ours), 1.0, atol=1e-5)
    cosine = float(ours @ theirs / (np.linalg.norm(ours) * np.linalg.norm(theirs)))
    assert cosine >= 0.99999, f"{name}: cosine {cosine:.7f}"


@pytest.mark.parametrize("name", ["long english", "long cjk", "long mixed scripts"])
def test_long_inputs_are_truncated_like_sentence_transformers(name, minilm, reference):
    text = TEXTS[name]
    assert len(reference.tokenizer(text)["input_ids"]) > 512
    (ours,) = minilm.tokenizer.encode_batch([text], truncate=True)
    theirs = reference.tokenize([text])["input_ids"][0].tolist()
    assert len(ours) == len(theirs) == 256
    assert ours.truncated
    assert ours.ids == theirs


def test_relevant_pair_scores_clearly_higher_than_irrelevant(minilm):
    query, relevant, irrelevant = _embed(
        minilm,
        [
            "How do I reset my password?",
            "To change your password, open account settings and choose 'Reset password'.",
            "The giraffe is the tallest living terrestrial animal.",
        ],
    )
    relevant_score = float(query @ relevant)
    irrelevant_score = float(query @ irrelevant)
    assert relevant_score > 0.5
    assert relevant_score - irrelevant_score > 0.3, (relevant_score, irrelevant_score)
