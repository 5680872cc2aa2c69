"""The error contract over HTTP: every bad request gets its status and its dialect's JSON error body
with a message naming the problem, never a 500, and the server is still healthy afterwards.

Most cases run against the multi server (two models, API key, --max-client-batch-size 8,
--payload-limit 100000, --auto-truncate); the ones that need the default "refuse over-long inputs"
run against the starter server. Loading-state answers are checked on an in-process app.
"""

from __future__ import annotations

import uuid

import httpx
import pytest
from starlette.testclient import TestClient

from infercore.models.repository import ModelSource
from infercore.server.app import create_app
from infercore.server.config import ServerConfig
from infercore.server.engine import Engine
from tests.server_process import MULTI_MAX_CLIENT_BATCH_SIZE, MULTI_PAYLOAD_LIMIT_BYTES

MINILM_LIMIT_TOKENS = 256
MINILM_DIMS = 384
LONG_TEXT = "river stone " * 400  # 800 content tokens


def assert_healthy(server) -> None:
    """/health is open without a key and answers 200 only when a forward pass works."""
    response = httpx.get(server.url + "/health", timeout=30.0, trust_env=False)
    assert response.status_code == 200, f"server unhealthy after the request: {response.text}"


def assert_native_error(response: httpx.Response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "error_type"}, body
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["error_type"], str) and body["error_type"]
    for fragment in fragments:
        assert fragment in body["error"], (fragment, body)
    return body


def assert_openai_error(response: httpx.Response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    for fragment in fragments:
        assert fragment in error["message"], (fragment, body)
    return error


# ---- native dialect -----------------------------------------------------------------------------

NATIVE_CASES = [
    # (id, route, body (bytes = raw, else JSON), status, message fragments)
    ("truncated_json", "/embed", b'{"inputs": ', 400, ["not valid JSON"]),
    ("not_utf8", "/embed", b"\xff\xfe\x00", 400, ["not valid JSON"]),
    ("empty_body", "/embed", b"", 400, ["empty"]),
    ("inputs_a_number", "/embed", {"inputs": 5}, 422, ["inputs"]),
    ("inputs_an_object", "/embed", {"inputs": {"text": "x"}}, 422, ["inputs"]),
    ("inputs_list_with_number", "/embed", {"inputs": ["a", 1]}, 422, ["inputs"]),
    ("inputs_null", "/embed", {"inputs": None}, 422, ["inputs"]),
    ("inputs_missing", "/embed", {"normalize": True}, 422, ["inputs"]),
    ("body_an_array", "/embed", ["x"], 422, ["object"]),
    ("normalize_a_string", "/embed", {"inputs": "x", "normalize": "yes"}, 422, ["normalize"]),
    ("dimensions_a_string", "/embed", {"inputs": "x", "dimensions": "64"}, 422, ["dimensions"]),
    ("dimensions_a_float", "/embed", {"inputs": "x", "dimensions": 64.5}, 422, ["dimensions"]),
    ("dimensions_overflowing", "/embed", b'{"inputs": "x", "dimensions": 1e400}', 422, ["dimensions"]),
    ("empty_list", "/embed", {"inputs": []}, 422, ["empty"]),
    ("empty_string", "/embed", {"inputs": ""}, 422, ["empty"]),
    ("one_empty_string", "/embed", {"inputs": ["a", ""]}, 422, ["input 1", "empty"]),
    ("bad_direction", "/embed", {"inputs": "x", "truncation_direction": "middle"}, 422, ["truncation_direction"]),
    ("dimensions_zero", "/embed", {"inputs": "x", "dimensions": 0}, 422, ["dimensions", str(MINILM_DIMS)]),
    ("dimensions_too_big", "/embed", {"inputs": "x", "dimensions": 385}, 422, ["dimensions", str(MINILM_DIMS)]),
    ("dimensions_negative", "/embed", {"inputs": "x", "dimensions": -1}, 422, ["dimensions"]),
    ("unknown_prompt", "/embed", {"inputs": "x", "prompt_name": "query"}, 422, ["prompt_name", "query"]),
    (
        "too_many_inputs", "/embed", {"inputs": ["a"] * (MULTI_MAX_CLIENT_BATCH_SIZE + 1)}, 413,
        [str(MULTI_MAX_CLIENT_BATCH_SIZE + 1), str(MULTI_MAX_CLIENT_BATCH_SIZE)],
    ),
    (
        "too_many_tokens", "/embed", {"inputs": LONG_TEXT, "truncate": False}, 413,
        [str(MINILM_LIMIT_TOKENS), "truncate"],
    ),
    (
        "too_many_characters", "/embed", {"inputs": ["ok", "a" * 70_000], "truncate": False}, 413,
        ["input 1", str(MINILM_LIMIT_TOKENS)],
    ),
    ("unknown_model", "/embed", {"inputs": "x", "model": "nope"}, 404, ["nope", "minilm", "tiny"]),
    ("tokenize_empty", "/tokenize", {"inputs": ""}, 422, ["empty"]),
    ("tokenize_wrong_type", "/tokenize", {"inputs": 3}, 422, ["inputs"]),
    ("tokenize_unknown_model", "/tokenize", {"inputs": "x", "model": "nope"}, 404, ["nope"]),
    ("tokenize_bad_json", "/tokenize", b"{", 400, ["JSON"]),
    ("decode_empty", "/decode", {"ids": []}, 422, ["ids"]),
    ("decode_mixed", "/decode", {"ids": [1, [2]]}, 422, ["ids"]),
    ("decode_strings", "/decode", {"ids": ["a"]}, 422, ["ids"]),
    ("decode_out_of_vocab", "/decode", {"ids": [101, 10**20]}, 422, [str(10**20), "vocabulary"]),
    ("decode_negative", "/decode", {"ids": [-1]}, 422, ["-1", "vocabulary"]),
    ("decode_unknown_model", "/decode", {"ids": [101], "model": "nope"}, 404, ["nope"]),
]


def _post(client: httpx.Client, route: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return client.post(route, content=body, headers={"content-type": "application/json"})
    return client.post(route, json=body)


@pytest.mark.parametrize(
    ("route", "body", "status", "fragments"),
    [case[1:] for case in NATIVE_CASES],
    ids=[case[0] for case in NATIVE_CASES],
)
def test_native_bad_request_gets_its_status_and_a_json_error_naming_the_problem(
    multi_server, multi_client, route, body, status, fragments
):
    assert_native_error(_post(multi_client, route, body), status, *fragments)
    assert_healthy(multi_server)


def test_unknown_model_error_type_says_model_not_found(multi_server, multi_client):
    body = assert_native_error(multi_client.post("/embed", json={"inputs": "x", "model": "nope"}), 404)
    assert body["error_type"] == "ModelNotFound"


def test_over_long_input_is_refused_by_default_without_auto_truncate(starter_server, starter_client):
    assert_native_error(starter_client.post("/embed", json={"inputs": LONG_TEXT}), 413, str(MINILM_LIMIT_TOKENS))
    assert_healthy(starter_server)


def test_body_over_the_payload_limit_gets_413_naming_the_limit(multi_server, multi_client):
    oversized = b'{"inputs": "' + b"a" * MULTI_PAYLOAD_LIMIT_BYTES + b'"}'
    assert_native_error(
        multi_client.post("/embed", content=oversized, headers={"content-type": "application/json"}),
        413, str(MULTI_PAYLOAD_LIMIT_BYTES),
    )
    assert_healthy(multi_server)


def test_chunked_body_over_the_payload_limit_gets_413_naming_the_limit(multi_server, multi_client):
    def chunks():  # no content-length: the server must count while it reads
        yield b'{"inputs": "'
        for _ in range(12):
            yield b"a" * 10_000
        yield b'"}'

    assert_native_error(multi_client.post("/embed", content=chunks()), 413, str(MULTI_PAYLOAD_LIMIT_BYTES))
    assert_healthy(multi_server)


@pytest.mark.parametrize(
    "raw",
    [b"[" * 5000, b'{"inputs": "\\ud800"}', b"null", b"42", b'"text"', b'{"inputs": "x"} trailing', b"\x00"],
    ids=["deep_nesting", "lone_surrogate", "null", "number", "string", "trailing_garbage", "nul_byte"],
)
def test_odd_bodies_get_a_4xx_json_error_never_a_500(multi_server, multi_client, raw):
    for route in ("/embed", "/v1/embeddings", "/tokenize"):
        response = multi_client.post(route, content=raw, headers={"content-type": "application/json"})
        assert response.status_code in (400, 422), (route, response.status_code, response.text)
        assert "error" in response.json()
    assert_healthy(multi_server)


# ---- OpenAI dialect -------------------------------------------------------------------------------

OPENAI_CASES = [
    ("truncated_json", b'{"input": ', 400, ["not valid JSON"], None),
    ("input_a_number", {"input": 5, "model": "minilm"}, 422, ["input"], None),
    ("input_missing", {"model": "minilm"}, 422, ["input"], None),
    ("empty_list", {"input": [], "model": "minilm"}, 422, ["empty"], None),
    ("empty_string", {"input": "", "model": "minilm"}, 422, ["empty"], None),
    ("bad_encoding_format", {"input": "x", "encoding_format": "hex"}, 422, ["encoding_format"], None),
    ("dimensions_zero", {"input": "x", "dimensions": 0}, 422, ["dimensions", str(MINILM_DIMS)], None),
    (
        "too_many_inputs", {"input": ["a"] * (MULTI_MAX_CLIENT_BATCH_SIZE + 1)}, 413,
        [str(MULTI_MAX_CLIENT_BATCH_SIZE)], None,
    ),
    ("unknown_model", {"input": "x", "model": "nope"}, 404, ["nope"], "model_not_found"),
    (
        "over_payload_limit", b'{"input": "' + b"a" * MULTI_PAYLOAD_LIMIT_BYTES + b'"}', 413,
        [str(MULTI_PAYLOAD_LIMIT_BYTES)], None,
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "fragments", "code"),
    [case[1:] for case in OPENAI_CASES],
    ids=[case[0] for case in OPENAI_CASES],
)
def test_openai_bad_request_gets_its_status_and_an_openai_error_body(
    multi_server, multi_client, body, status, fragments, code
):
    error = assert_openai_error(_post(multi_client, "/v1/embeddings", body), status, *fragments)
    assert error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code
    assert_healthy(multi_server)


def test_openai_over_long_input_gets_413_context_length_exceeded(starter_server, starter_client):
    error = assert_openai_error(
        starter_client.post("/v1/embeddings", json={"input": ["short", LONG_TEXT], "model": "all-minilm-l6-v2"}),
        413, str(MINILM_LIMIT_TOKENS),
    )
    assert error["code"] == "context_length_exceeded"
    assert_healthy(starter_server)


def test_embeddings_alias_route_answers_like_v1_embeddings(multi_server, multi_client):
    assert multi_client.post("/embeddings", json={"input": "x"}).status_code == 200
    assert_openai_error(multi_client.post("/embeddings", json={"input": []}), 422, "empty")


# ---- routes and methods ---------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [("GET", "/nope"), ("POST", "/v1/nope"), ("GET", "/embed/extra")])
def test_unknown_route_gets_404_json(multi_server, multi_client, method, path):
    assert_native_error(multi_client.request(method, path), 404, path)
    assert_healthy(multi_server)


@pytest.mark.parametrize(("method", "path"), [("GET", "/embed"), ("PUT", "/tokenize"), ("POST", "/health")])
def test_wrong_method_gets_405_json(multi_server, multi_client, method, path):
    assert_native_error(multi_client.request(method, path), 405, method, path)
    assert_healthy(multi_server)


def test_wrong_method_answer_lists_the_allowed_methods(multi_client):
    # RFC 9110 §15.5.6: a 405 response must carry an Allow header.
    response = multi_client.get("/embed")
    assert response.status_code == 405
    assert response.headers.get("allow") == "POST", dict(response.headers)


def test_wrong_method_on_the_openai_route_gets_an_openai_error_body(multi_server, multi_client):
    assert_openai_error(multi_client.get("/v1/embeddings"), 405, "GET")
    assert_healthy(multi_server)


# ---- API key --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "Basic c2staW5mZXJjb3Jl"}, {"Authorization": ""}],
    ids=["missing", "wrong", "wrong_scheme", "empty"],
)
@pytest.mark.parametrize(
    ("method", "route", "body"),
    [
        ("POST", "/embed", {"inputs": "x"}),
        ("POST", "/tokenize", {"inputs": "x"}),
        ("POST", "/decode", {"ids": [101]}),
        ("GET", "/info", None),
        ("GET", "/v1/models", None),
        ("GET", "/metrics", None),
    ],
)
def test_native_routes_need_the_api_key(multi_server, headers, method, route, body):
    response = httpx.request(method, multi_server.url + route, json=body, headers=headers, trust_env=False)
    body = assert_native_error(response, 401, "API key")
    assert body["error_type"] == "Unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"


def test_openai_route_without_the_right_key_gets_an_openai_authentication_error(multi_server):
    for headers in ({}, {"Authorization": "Bearer wrong-key"}):
        response = httpx.post(
            multi_server.url + "/v1/embeddings", json={"input": "x"}, headers=headers, trust_env=False
        )
        error = assert_openai_error(response, 401, "API key")
        assert error["type"] == "authentication_error"
    assert_healthy(multi_server)


def test_health_stays_open_without_the_api_key(multi_server):
    response = httpx.get(multi_server.url + "/health", trust_env=False)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_the_right_key_is_accepted_with_any_scheme_case(multi_server):
    response = httpx.post(
        multi_server.url + "/embed", json={"inputs": "x"},
        headers={"Authorization": f"bearer {multi_server.api_key}"}, trust_env=False,
    )
    assert response.status_code == 200, response.text


# ---- not ready ---------------------------------------------------------------------------------------


def test_requests_get_503_while_models_load_and_200_once_loaded(tiny_bert_dir):
    engine = Engine(ServerConfig(models=[ModelSource("tiny", tiny_bert_dir)], tokenization_workers=1))
    with TestClient(create_app(engine, load=False), raise_server_exceptions=False) as client:
        assert_native_error(client.get("/health"), 503, "loading")
        assert_native_error(client.post("/embed", json={"inputs": "x"}), 503, "loading")
        assert_native_error(client.get("/info"), 503, "loading")
        error = assert_openai_error(client.post("/v1/embeddings", json={"input": "x"}), 503, "loading")
        assert error["type"] == "server_error"

        engine.load()

        assert client.get("/health").status_code == 200
        response = client.post("/embed", json={"inputs": "x"})
        assert response.status_code == 200
        assert len(response.json()[0]) == 32


def test_health_reports_503_with_the_reason_when_loading_failed(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "bert"}')
    (broken / "pytorch_model.bin").write_bytes(b"not loaded")
    engine = Engine(ServerConfig(models=[ModelSource("broken", broken)], tokenization_workers=1))
    with pytest.raises(Exception, match="pickle"):
        engine.load()
    with TestClient(create_app(engine, load=False), raise_server_exceptions=False) as client:
        assert_native_error(client.get("/health"), 503, "pickle")
        assert_native_error(client.post("/embed", json={"inputs": "x"}), 503, "loading failed")


def test_health_is_503_while_forward_passes_fail_and_200_once_they_work_again(tiny_bert_dir):
    engine = Engine(ServerConfig(models=[ModelSource("tiny", tiny_bert_dir)], tokenization_workers=1))
    engine.load()
    runner = engine.models["tiny"].model.runner

    def device_fault(batch, options):
        raise RuntimeError("simulated device fault")

    with TestClient(create_app(engine, load=False), raise_server_exceptions=False) as client:
        assert client.get("/health").status_code == 200
        runner.run = device_fault
        try:
            body = assert_native_error(client.post("/embed", json={"inputs": "x"}), 500, "tiny")
            assert body["error_type"] == "Backend"
            assert_native_error(client.get("/health"), 503, "forward pass")
        finally:
            del runner.run
        assert client.get("/health").status_code == 200
        assert client.post("/embed", json={"inputs": "x"}).status_code == 200


# ---- zero data retention ------------------------------------------------------------------------------


def test_request_texts_and_outputs_never_reach_the_server_log(
    starter_server, starter_client, multi_server, multi_client
):
    marker = f"quokka{uuid.uuid4().hex[:12]}"
    cjk_marker = "紫陽花の秘密の庭園"
    texts = [f"{marker} sat on the fence", f"{cjk_marker} {marker}"]

    for server, client in ((starter_server, starter_client), (multi_server, multi_client)):
        assert client.post("/embed", json={"inputs": texts}).status_code == 200
        assert client.post("/v1/embeddings", json={"input": texts}).status_code == 200
        tokens = client.post("/tokenize", json={"inputs": texts[0]}).json()[0]
        decoded = client.post("/decode", json={"ids": [t["id"] for t in tokens]}).json()[0]
        assert marker in decoded.replace(" ", "").replace("#", "")
        # errors whose handling sees the text
        client.post("/embed", json={"inputs": [texts[0]] + [marker * 40] * 20, "truncate": False})
        client.post("/embed", json={"inputs": [texts[0], ""]})
        client.post("/embed", json={"inputs": texts, "truncation_direction": marker})
        client.post("/embed", json={"inputs": texts, "model": marker})
        client.post("/v1/embeddings", json={"input": texts, "encoding_format": marker})
        client.post("/embed", content=f'{{"inputs": "{marker}'.encode())
        assert_healthy(server)

    for server in (starter_server, multi_server):
        log = server.log()
        assert "DEBUG" in log, "the server must run at --log-level debug for this check to mean anything"
        assert marker not in log and marker.lower() not in log.lower()
        assert cjk_marker not in log
