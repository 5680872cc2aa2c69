"""The official ``openai`` Python client against a real server: it asks for base64 by default and
must get the same vectors /embed returns, honour ``dimensions``, and raise its own errors."""

from __future__ import annotations

import numpy as np
import openai
import pytest

TEXTS = [
    "A heron waited in the reeds until the ferry had passed.",
    "Kaffee und Kuchen um drei, wie jeden Sonntag.",
    "雪が降ると町はとても静かになる。",
    "🌧️☔ rainy-day playlist 🎧",
]


@pytest.fixture(scope="module")
def client(multi_server):
    with openai.OpenAI(
        base_url=f"{multi_server.url}/v1", api_key=multi_server.api_key, max_retries=0, timeout=60.0
    ) as client:
        yield client


def _vectors(response) -> np.ndarray:
    return np.asarray([d.embedding for d in sorted(response.data, key=lambda d: d.index)], dtype=np.float32)


@pytest.mark.parametrize("model", ["minilm", "tiny"])
def test_client_default_base64_gets_the_same_vectors_as_embed(client, multi_client, model):
    response = client.embeddings.create(input=TEXTS, model=model)
    native = np.asarray(multi_client.post("/embed", json={"inputs": TEXTS, "model": model}).json(), dtype=np.float32)

    assert response.model == model
    got = _vectors(response)
    assert got.shape == native.shape == (len(TEXTS), 384 if model == "minilm" else 32)
    np.testing.assert_allclose(got, native, atol=1e-6)
    assert response.usage.prompt_tokens == response.usage.total_tokens > len(TEXTS) * 2


def test_client_float_format_matches_base64(client):
    as_base64 = _vectors(client.embeddings.create(input=TEXTS, model="minilm"))
    as_float = _vectors(client.embeddings.create(input=TEXTS, model="minilm", encoding_format="float"))
    np.testing.assert_array_equal(as_base64, as_float)


def test_client_single_string_gets_one_embedding(client, multi_client):
    response = client.embeddings.create(input=TEXTS[2], model="minilm")
    assert len(response.data) == 1
    native = np.asarray(multi_client.post("/embed", json={"inputs": TEXTS[2]}).json(), dtype=np.float32)
    np.testing.assert_allclose(_vectors(response), native, atol=1e-6)


def test_client_dimensions_gets_the_renormalised_prefix(client, multi_client):
    response = client.embeddings.create(input=TEXTS, model="minilm", dimensions=128)
    full = np.asarray(multi_client.post("/embed", json={"inputs": TEXTS}).json(), dtype=np.float64)

    got = _vectors(response).astype(np.float64)
    assert got.shape == (len(TEXTS), 128)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    expected = full[:, :128] / np.linalg.norm(full[:, :128], axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_client_raises_not_found_for_an_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(input="x", model="text-embedding-3-large")
    assert caught.value.status_code == 404
    assert "text-embedding-3-large" in caught.value.message
    assert caught.value.code == "model_not_found"


def test_client_raises_authentication_error_for_a_wrong_key(multi_server):
    with openai.OpenAI(base_url=f"{multi_server.url}/v1", api_key="wrong", max_retries=0, timeout=30.0) as bad:
        with pytest.raises(openai.AuthenticationError) as caught:
            bad.embeddings.create(input="x", model="minilm")
    assert caught.value.status_code == 401


def test_client_raises_status_errors_for_invalid_input(client):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.embeddings.create(input=[], model="minilm")
    assert "empty" in caught.value.message
    with pytest.raises(openai.APIStatusError) as too_many:
        client.embeddings.create(input=["a"] * 9, model="minilm")
    assert too_many.value.status_code == 413
    assert "8" in too_many.value.message
