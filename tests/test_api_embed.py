"""/embed and /v1/embeddings over HTTP against a real server process, with sentence-transformers as
the reference, plus the informational routes (/tokenize, /decode, /info, /v1/models, /metrics).

The starter server is what `make serve` runs (no model options); the multi server serves two models
(minilm, tiny) behind an API key with --auto-truncate.
"""

from __future__ import annotations

import base64
import random

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sentence_transformers import SentenceTransformer

MINILM_DIMS = 384
TINY_DIMS = 32
COSINE_MIN = 0.99999

# Sentences written for these tests (not from any benchmark), in several scripts, with emoji,
# combining marks, code and control-ish whitespace.
SHORT_TEXTS = [
    "The lighthouse keeper logged seventeen herring gulls before breakfast.",
    "Die Straßenbahn nach Köln-Mülheim fällt heute wegen Glatteis aus.",
    "Le boulanger a oublié la fève dans la galette des rois, quel désastre !",
    "今日は雨が降っているので、図書館で宿題をします。",
    "胡同里有一家很小的面馆，老板每天凌晨四点开门。",
    "서울 지하철 2호선은 순환선이라서 끝이 없다.",
    "Москва не сразу строилась, но метро там построили быстро.",
    "Η Θεσσαλονίκη έχει την καλύτερη μπουγάτσα της Ελλάδας.",
    "مرحبا بكم في مكتبة الإسكندرية الجديدة",
    "שלום, מה שלומך היום?",
    "नमस्ते, आज मौसम बहुत सुहावना है।",
    "สวัสดีครับ วันนี้อากาศดีมาก",
    "🚀🌕 launch at T-minus 10… 👩‍🚀👨🏽‍🚀 🇯🇵🇧🇷 ❤️‍🔥",
    "e\u0301te\u0301 vs été — naïve café coöperation",
    "def f(x):\n\treturn {'k': [x ** 2, None]}  # ∑ ∫ √ ≠ ≤",
    "Ñandú, ÿ, ß, Æsir, Þórr, İstanbul, ǅemal",
    "🙂",
    " \u200b\t ",  # nothing but whitespace and a zero-width space: [CLS] [SEP] only
]

_WORDS_EN = (
    "river stone lantern orchard quiet harbour copper meadow signal winter kettle thread "
    "mirror garden pencil ladder violet engine candle forest silver pocket marble window"
).split()


def _long_english(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS_EN) for _ in range(words)) + "."


def _long_cjk(seed: int, chars: int) -> str:
    rng = random.Random(seed)
    return "".join(chr(rng.randrange(0x4E00, 0x9FA5)) for _ in range(chars))


def _long_mixed(seed: int, pieces: int) -> str:
    rng = random.Random(seed)
    parts = ["Köln", "東京", "🚀", "naïve", "Ελλάδα", "مرحبا", "👩‍🚀", "données", "🇧🇷", "ß"]
    return " ".join(rng.choice(parts) for _ in range(pieces))


# Each of these is far over 512 tokens, so it only works with truncation on.
LONG_TEXTS = [_long_english(1, 900), _long_cjk(2, 1200), _long_mixed(3, 700)]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _assert_unit_rows(vectors: np.ndarray) -> None:
    np.testing.assert_allclose(np.linalg.norm(vectors.astype(np.float64), axis=1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def st_minilm(minilm_dir):
    return SentenceTransformer(str(minilm_dir), device="cpu")


@pytest.fixture(scope="module")
def st_tiny(tiny_bert_dir):
    return SentenceTransformer(str(tiny_bert_dir), device="cpu")


def _embed(client, inputs, **options) -> np.ndarray:
    response = client.post("/embed", json={"inputs": inputs, **options})
    assert response.status_code == 200, response.text
    return np.asarray(response.json(), dtype=np.float64)


def _openai(client, inputs, **options) -> dict:
    response = client.post("/v1/embeddings", json={"input": inputs, **options})
    assert response.status_code == 200, response.text
    return response.json()


def _openai_vectors(body: dict) -> np.ndarray:
    rows = sorted(body["data"], key=lambda d: d["index"])
    return np.asarray([d["embedding"] for d in rows], dtype=np.float64)


def _tokens(client, text: str, **options) -> list[dict]:
    response = client.post("/tokenize", json={"inputs": text, **options})
    assert response.status_code == 200, response.text
    return response.json()[0]


# ---- parity with sentence-transformers -----------------------------------------------------------


def test_starter_server_serves_all_minilm_l6_v2_and_splade_tiny(starter_client):
    assert starter_client.get("/health").json() == {"status": "ok"}
    info = starter_client.get("/info").json()
    assert info["model_id"] == "all-minilm-l6-v2"
    served = [(m["model_id"], m["task"], m.get("dimensions")) for m in info["models"]]
    assert served == [
        ("all-minilm-l6-v2", "text_embedding", MINILM_DIMS),
        ("splade-tiny", "sparse_embedding", 30522),
        ("all-minilm-l6-v2-bi-encoder-rerank", "rerank", None),  # no cross-encoder in the starter set
    ]


def test_embed_matches_sentence_transformers_on_unseen_multilingual_and_long_texts(starter_client, st_minilm):
    texts = SHORT_TEXTS + LONG_TEXTS
    got = _embed(starter_client, texts, truncate=True)
    want = st_minilm.encode(texts, normalize_embeddings=True, convert_to_numpy=True)

    assert got.shape == (len(texts), MINILM_DIMS)
    _assert_unit_rows(got)
    cosines = _cosines(got, want)
    assert cosines.min() >= COSINE_MIN, dict(zip(texts, cosines.round(7), strict=True))


def test_openai_embeddings_match_sentence_transformers(starter_client, st_minilm):
    body = _openai(starter_client, SHORT_TEXTS)
    got = _openai_vectors(body)
    want = st_minilm.encode(SHORT_TEXTS, normalize_embeddings=True, convert_to_numpy=True)

    assert body["object"] == "list"
    assert [d["index"] for d in body["data"]] == list(range(len(SHORT_TEXTS)))
    assert all(d["object"] == "embedding" for d in body["data"])
    assert got.shape == (len(SHORT_TEXTS), MINILM_DIMS)
    _assert_unit_rows(got)
    assert _cosines(got, want).min() >= COSINE_MIN


def test_openai_embeddings_truncate_long_inputs_when_the_server_auto_truncates(multi_client, st_minilm):
    got = _openai_vectors(_openai(multi_client, LONG_TEXTS, model="minilm"))
    want = st_minilm.encode(LONG_TEXTS, normalize_embeddings=True, convert_to_numpy=True)

    assert got.shape == (len(LONG_TEXTS), MINILM_DIMS)
    _assert_unit_rows(got)
    assert _cosines(got, want).min() >= COSINE_MIN


def test_embed_and_openai_dialects_return_the_same_numbers(starter_client):
    native = _embed(starter_client, SHORT_TEXTS[:5])
    openai = _openai_vectors(_openai(starter_client, SHORT_TEXTS[:5]))
    np.testing.assert_array_equal(native, openai)


def test_single_string_input_equals_the_same_text_in_a_list(starter_client):
    text = SHORT_TEXTS[3]
    single = _embed(starter_client, text)
    listed = _embed(starter_client, [text, SHORT_TEXTS[0]])
    assert single.shape == (1, MINILM_DIMS)
    np.testing.assert_array_equal(single[0], listed[0])

    single_openai = _openai(starter_client, text)
    assert len(single_openai["data"]) == 1
    np.testing.assert_array_equal(_openai_vectors(single_openai)[0], single[0])


def test_vectors_do_not_depend_on_what_else_is_in_the_request(starter_client):
    texts = [*SHORT_TEXTS[2:6], LONG_TEXTS[0]]
    together = _embed(starter_client, texts, truncate=True)
    alone = np.vstack([_embed(starter_client, t, truncate=True) for t in texts])
    np.testing.assert_array_equal(together, alone)


# ---- request options --------------------------------------------------------------------------------


@pytest.mark.parametrize("dimensions", [1, 64, 383, MINILM_DIMS])
def test_dimensions_returns_the_renormalised_prefix_of_the_full_vector(starter_client, dimensions):
    texts = SHORT_TEXTS[:2]
    full = _embed(starter_client, texts)
    cut = _embed(starter_client, texts, dimensions=dimensions)
    cut_openai = _openai_vectors(_openai(starter_client, texts, dimensions=dimensions))

    expected = full[:, :dimensions] / np.linalg.norm(full[:, :dimensions], axis=1, keepdims=True)
    for got in (cut, cut_openai):
        assert got.shape == (len(texts), dimensions)
        _assert_unit_rows(got)
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_normalize_false_returns_the_raw_pooled_vector(starter_client, st_minilm):
    texts = SHORT_TEXTS[:6]
    raw = _embed(starter_client, texts, normalize=False)
    unit = _embed(starter_client, texts)
    # The checkpoint's own Normalize module is dropped to get sentence-transformers' raw pooled vectors.
    st_raw = SentenceTransformer(modules=list(st_minilm)[:2], device="cpu")
    assert [type(m).__name__ for m in st_raw] == ["Transformer", "Pooling"]
    want = st_raw.encode(texts, convert_to_numpy=True).astype(np.float64)

    norms = np.linalg.norm(raw, axis=1)
    assert np.all(np.abs(norms - 1.0) > 1e-3), norms
    np.testing.assert_allclose(raw / norms[:, None], unit, atol=1e-5)
    assert _cosines(raw, want).min() >= COSINE_MIN
    np.testing.assert_allclose(norms, np.linalg.norm(want, axis=1), rtol=1e-4)


def test_normalize_false_with_dimensions_returns_the_raw_prefix(starter_client):
    raw_full = _embed(starter_client, SHORT_TEXTS[0], normalize=False)
    raw_cut = _embed(starter_client, SHORT_TEXTS[0], normalize=False, dimensions=16)
    np.testing.assert_allclose(raw_cut[0], raw_full[0, :16], atol=1e-5)


def _single_token_words(client) -> list[str]:
    """Words the MiniLM vocabulary holds whole, so that N words are exactly N content tokens."""
    response = client.post("/tokenize", json={"inputs": _WORDS_EN, "add_special_tokens": False})
    assert response.status_code == 200, response.text
    words = [w for w, row in zip(_WORDS_EN, response.json(), strict=True) if len(row) == 1]
    assert len(words) >= 10, words
    return words


def test_truncation_direction_right_keeps_the_start_and_left_keeps_the_end(starter_client):
    words = _single_token_words(starter_client)
    rng = random.Random(7)
    sequence = [rng.choice(words) for _ in range(700)]
    long_text = " ".join(sequence)
    content_limit = starter_client.get("/info").json()["max_input_length"] - 2  # [CLS] ... [SEP]

    right = _embed(starter_client, long_text, truncate=True, truncation_direction="right")
    default = _embed(starter_client, long_text, truncate=True)
    left = _embed(starter_client, long_text, truncate=True, truncation_direction="left")
    head = _embed(starter_client, " ".join(sequence[:content_limit]), truncate=False)
    tail = _embed(starter_client, " ".join(sequence[-content_limit:]), truncate=False)

    np.testing.assert_allclose(right, head, atol=1e-6)
    np.testing.assert_allclose(default, right, atol=1e-6)
    np.testing.assert_allclose(left, tail, atol=1e-6)
    assert _cosines(left, right)[0] < 0.999
    _assert_unit_rows(np.vstack([left, right]))


def test_base64_encoding_decodes_to_exactly_the_float_output(starter_client):
    texts = SHORT_TEXTS[:3]
    floats = _openai(starter_client, texts, encoding_format="float")
    encoded = _openai(starter_client, texts, encoding_format="base64")

    for f, b in zip(floats["data"], encoded["data"], strict=True):
        assert isinstance(b["embedding"], str)
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert decoded.shape == (MINILM_DIMS,)
        np.testing.assert_array_equal(decoded, np.asarray(f["embedding"], dtype=np.float32))


def test_usage_counts_the_real_tokens_of_every_input(starter_client):
    texts = [SHORT_TEXTS[0], SHORT_TEXTS[3], SHORT_TEXTS[12]]
    body = _openai(starter_client, texts)
    real = sum(len(_tokens(starter_client, t)) for t in texts)

    assert body["usage"] == {"prompt_tokens": real, "total_tokens": real}
    assert body["model"] == "all-minilm-l6-v2"


def test_timing_headers_are_present_and_count_tokens_and_characters(starter_client):
    text = SHORT_TEXTS[6]
    tokens = len(_tokens(starter_client, text))
    for response in (
        starter_client.post("/embed", json={"inputs": text}),
        starter_client.post("/v1/embeddings", json={"input": text}),
    ):
        assert response.status_code == 200
        for name in ("x-compute-time", "x-total-time", "x-tokenization-time", "x-queue-time", "x-inference-time"):
            assert float(response.headers[name]) >= 0.0, name
        assert int(response.headers["x-compute-tokens"]) == tokens
        assert int(response.headers["x-compute-characters"]) == len(text)


# ---- several models ----------------------------------------------------------------------------------


def test_model_field_routes_requests_to_the_named_model(multi_client, st_minilm, st_tiny):
    texts = SHORT_TEXTS[:5]
    default = _embed(multi_client, texts)
    minilm = _embed(multi_client, texts, model="minilm")
    tiny = _embed(multi_client, texts, model="tiny")

    assert default.shape == minilm.shape == (len(texts), MINILM_DIMS)
    assert tiny.shape == (len(texts), TINY_DIMS)
    np.testing.assert_allclose(default, minilm, atol=1e-6)
    _assert_unit_rows(tiny)
    assert _cosines(minilm, st_minilm.encode(texts, normalize_embeddings=True)).min() >= COSINE_MIN
    assert _cosines(tiny, st_tiny.encode(texts, normalize_embeddings=True)).min() >= COSINE_MIN

    body = _openai(multi_client, texts, model="tiny")
    assert body["model"] == "tiny"
    np.testing.assert_allclose(_openai_vectors(body), tiny, atol=1e-6)


def test_dimensions_are_checked_against_the_routed_model(multi_client):
    assert _embed(multi_client, "x", model="tiny", dimensions=TINY_DIMS).shape == (1, TINY_DIMS)
    response = multi_client.post("/embed", json={"inputs": "x", "model": "tiny", "dimensions": TINY_DIMS + 1})
    assert response.status_code == 422
    assert str(TINY_DIMS) in response.json()["error"]


def test_v1_models_lists_every_model_with_its_dimensions_and_task(multi_client):
    body = multi_client.get("/v1/models").json()
    assert body["object"] == "list"
    models = {m["id"]: m for m in body["data"]}
    assert list(models) == ["minilm", "tiny"]
    assert models["minilm"]["dimensions"] == MINILM_DIMS
    assert models["tiny"]["dimensions"] == TINY_DIMS
    assert {m["task"] for m in models.values()} == {"text_embedding"}
    assert {m["object"] for m in models.values()} == {"model"}


def test_info_describes_the_default_model_the_limits_and_every_model(multi_client):
    info = multi_client.get("/info").json()
    assert info["model_id"] == "minilm"
    assert info["max_input_length"] == 256
    assert info["max_client_batch_size"] == 8
    assert info["auto_truncate"] is True
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["kernels_switched_off"] == {}  # CPU: no Triton kernel runs, none is switched off
    assert [(m["model_id"], m["dimensions"], m["max_input_tokens"]) for m in info["models"]] == [
        ("minilm", MINILM_DIMS, 256),
        ("tiny", TINY_DIMS, 128),
    ]
    # torch models: the backend, the precision (the dtype), no ONNX parity figures
    assert info["backends"] == ["torch"] and info["model_dtype"] == "float32"
    assert {(m["backend"], m["precision"], m["quality"]) for m in info["models"]} == {("torch", "float32", None)}


# ---- tokenizer routes --------------------------------------------------------------------------------


def test_tokenize_gives_ids_and_character_spans_and_decode_inverts_it(starter_client):
    text = "Hello, wonderful world 🚀 of tokens"
    tokens = _tokens(starter_client, text)

    assert tokens[0]["text"] == "[CLS]" and tokens[0]["special"] is True
    assert tokens[-1]["text"] == "[SEP]" and tokens[-1]["special"] is True
    for token in tokens[1:-1]:
        assert token["special"] is False
        assert token["text"] == text[token["start"]:token["stop"]]

    assert any(t["text"] == "🚀" for t in tokens)  # an unknown token still has its span


def test_decode_inverts_tokenize(starter_client):
    text = "Hello, wonderful world of tokens: naïve Köln"
    ids = [t["id"] for t in _tokens(starter_client, text)]
    decoded = starter_client.post("/decode", json={"ids": ids}).json()
    assert decoded == ["hello, wonderful world of tokens : naive koln"]
    assert [t["id"] for t in _tokens(starter_client, decoded[0])] == ids

    with_specials = starter_client.post("/decode", json={"ids": [ids], "skip_special_tokens": False}).json()
    assert with_specials[0].startswith("[CLS]") and with_specials[0].endswith("[SEP]")


def test_tokenize_without_special_tokens_and_in_batches(starter_client):
    body = starter_client.post("/tokenize", json={"inputs": ["one", "two words"], "add_special_tokens": False})
    assert body.status_code == 200
    rows = body.json()
    assert [[t["text"] for t in row] for row in rows] == [["one"], ["two", "words"]]


def test_decode_of_several_rows_returns_one_string_per_row(multi_client):
    rows = [[t["id"] for t in _tokens(multi_client, w)] for w in ("river", "stone lantern")]
    decoded = multi_client.post("/decode", json={"ids": rows, "model": "tiny"}).json()
    assert decoded == ["river", "stone lantern"]


# ---- metrics -----------------------------------------------------------------------------------------


def _request_samples(client) -> dict[tuple[str, str, str], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name in ("infercore_requests_total", "infercore_request_duration_seconds_count"):
                key = (sample.name, sample.labels["route"], sample.labels.get("status", ""))
                samples[key] = samples.get(key, 0.0) + sample.value  # summed over the model label
    return samples


def test_metrics_count_requests_by_route_and_status(starter_client):
    before = _request_samples(starter_client)
    for _ in range(3):
        starter_client.post("/embed", json={"inputs": "metrics check"})
    starter_client.post("/embed", json={"inputs": []})
    starter_client.post("/v1/embeddings", json={"input": "metrics check"})
    starter_client.post("/tokenize", json={"inputs": "metrics check"})
    after = _request_samples(starter_client)

    def delta(name: str, route: str, status: str = "") -> float:
        return after.get((name, route, status), 0.0) - before.get((name, route, status), 0.0)

    assert delta("infercore_requests_total", "/embed", "200") == 3
    assert delta("infercore_requests_total", "/embed", "422") == 1
    assert delta("infercore_requests_total", "/v1/embeddings", "200") == 1
    assert delta("infercore_requests_total", "/tokenize", "200") == 1
    assert delta("infercore_request_duration_seconds_count", "/embed") == 4
