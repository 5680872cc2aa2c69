"""Hostile bodies on every POST route of every dialect: each decoder failure mode gets its defined 4xx
in the dialect's error shape, cheaply, with no traceback and no request text in the log, and the
server stays healthy. Also the gRPC equivalents (undecodable and oversized messages), and the shape
scan's figures on its own (server/json_limits.py).

The server (tests/hostile.py) runs with --json-max-depth 16 and --json-max-elements 2000 so that
the limits are reached with small bodies; the 10,000-level body of the original report is here too.
"""

from __future__ import annotations

import json

import grpc
import httpx
import msgspec
import pytest

from infercore.proto.v1 import inference_pb2 as pb
from infercore.server.errors import InferenceError
from infercore.server.json_limits import JsonLimits, check_shape, decode_body
from tests.hostile import (
    API_KEY,
    AUTH,
    CANARY,
    JSON_MAX_DEPTH,
    JSON_MAX_ELEMENTS,
    LogCapture,
    assert_dialect_error,
    build_engine,
    dialect_of,
)
from tests.test_grpc import LoopServer

# One valid body per POST route (path params filled in), each with a canary in its text.
VALID_BODIES = {
    "/embed": {"inputs": [f"{CANARY} one"]},
    "/embed_sparse": {"inputs": [f"{CANARY} one"], "model": "sparse"},
    "/rerank": {"query": f"{CANARY} q", "texts": ["a doc"], "model": "cross"},
    "/tokenize": {"inputs": f"{CANARY} t"},
    "/decode": {"ids": [101, 102]},
    "/v1/embeddings": {"input": f"{CANARY} one", "model": "dense"},
    "/embeddings": {"input": [f"{CANARY} one"], "model": "dense", "encoding_format": "base64"},
    "/v1/rerank": {"query": f"{CANARY} q", "documents": ["a doc"], "model": "cross"},
    "/_inference/text_embedding/dense": {"input": [f"{CANARY} one"]},
    "/_inference/sparse_embedding/sparse": {"input": [f"{CANARY} one"]},
    "/_inference/rerank/cross": {"query": f"{CANARY} q", "input": ["a doc"]},
    "/api/v1/embed/text/dense": {"input": [f"{CANARY} one"], "model": "dense"},
    "/api/v1/embed/text/sparse": {"input": [f"{CANARY} one"], "model": "sparse"},
    "/api/v1/rerank/text/text-similarity": {"query": f"{CANARY} q", "documents": ["a doc"], "model": "cross"},
    "/v2/embed": {"texts": [f"{CANARY} one"], "model": "dense", "embedding_types": ["float", "int8"]},
    "/v1/embed": {"texts": [f"{CANARY} one"], "model": "dense"},
    "/v2/rerank": {"query": f"{CANARY} q", "documents": ["a doc"], "model": "cross"},
    "/": {"inputs": f"{CANARY} one"},
    "/predict": {"inputs": f"{CANARY} one", "model": "cross"},
    "/similarity": {"inputs": {"source_sentence": f"{CANARY} s", "sentences": ["a doc"]}, "model": "dense"},
    "/embed_all": {"inputs": f"{CANARY} one", "model": "dense"},
}
ROUTES = sorted(VALID_BODIES)
# Routes whose body refuses a field it does not know (OpenAI, Cohere, TEI, as those servers do): the
# hostile member "extra" is then a 422 naming it, once the body is known to be well-formed JSON.
UNKNOWN_FIELDS_REFUSED = {"/v1/embeddings", "/embeddings", "/v1/rerank", "/v2/embed", "/v1/embed", "/v2/rerank", "/",
                          "/predict", "/similarity", "/embed_all"}


def nested(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def with_extra(route: str, raw_value: bytes) -> bytes:
    """The route's valid body with one more member, ``"extra": <raw_value>``, spliced in as bytes."""
    body = json.dumps(VALID_BODIES[route]).encode()
    return body[:-1] + b', "extra": ' + raw_value + b"}"


# (case id, body builder, expected status, fragment of the message)
HOSTILE = [
    ("nested_10000_in_extra", lambda r: with_extra(r, nested(10_000)), 400, "--json-max-depth"),
    ("objects_10000_deep", lambda r: with_extra(r, b'{"a":' * 10_000 + b"1" + b"}" * 10_000), 400,
     "--json-max-depth"),
    ("one_level_too_deep", lambda r: with_extra(r, nested(JSON_MAX_DEPTH)), 400, "--json-max-depth"),
    ("unterminated_deep", lambda r: b'{"inputs": ' + b"[" * 5000, 400, "--json-max-depth"),
    ("too_many_values", lambda r: with_extra(r, b"[" + b"0," * JSON_MAX_ELEMENTS + b"0]"), 413,
     "--json-max-elements"),
    ("too_many_empty_arrays", lambda r: with_extra(r, b"[" + b"[]," * JSON_MAX_ELEMENTS + b"[]]"), 413,
     "--json-max-elements"),
    ("duplicate_key", lambda r: with_extra(r, b'1, "extra": 2'), 400, "twice"),
    ("duplicate_key_nested", lambda r: with_extra(r, b'{"k": 1, "k": 2}'), 400, "twice"),
    ("nan_literal", lambda r: with_extra(r, b"NaN"), 400, "not valid JSON"),
    ("infinity_literal", lambda r: with_extra(r, b"-Infinity"), 400, "not valid JSON"),
    ("integer_past_python_digits", lambda r: with_extra(r, b"9" * 5000), 422, "digits"),
    ("float_overflowing_in_extra", lambda r: with_extra(r, b"1e400"), 200, ""),
    ("invalid_utf8_in_extra", lambda r: with_extra(r, b'"\xff\xfe"'), 400, "UTF-8"),
    ("utf8_encoded_surrogate", lambda r: with_extra(r, b'"\xed\xa0\x80"'), 400, "UTF-8"),
    ("lone_surrogate_escape", lambda r: with_extra(r, b'"\\ud800"'), 400, "surrogate escape without its pair"),
    ("lone_low_surrogate_escape", lambda r: with_extra(r, b'"\\udc00x"'), 400, "not valid JSON"),
    ("raw_nul_in_string", lambda r: with_extra(r, b'"a\x00b"'), 400, "not valid JSON"),
    ("nul_after_body", lambda r: json.dumps(VALID_BODIES[r]).encode() + b"\x00", 400, "not valid JSON"),
    ("escaped_nul_is_text", lambda r: with_extra(r, b'"a\\u0000b"'), 200, ""),
    ("utf8_bom", lambda r: b"\xef\xbb\xbf" + json.dumps(VALID_BODIES[r]).encode(), 400, "not valid JSON"),
    ("utf16_body", lambda r: json.dumps(VALID_BODIES[r]).encode("utf-16"), 400, "not valid JSON"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bert_dir):
    engine = build_engine(tmp_path_factory.mktemp("hostile-models"), tiny_bert_dir)
    server = LoopServer(engine).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60.0, trust_env=False) as client:
        yield client


@pytest.mark.parametrize("route", ROUTES)
def test_valid_bodies_are_served(client, route):
    """The baseline the hostile cases mutate: each valid body gets 200."""
    assert client.post(route, json=VALID_BODIES[route]).status_code == 200


@pytest.mark.parametrize(("case", "build", "status", "fragment"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_body_gets_its_4xx_in_every_dialect(server, client, case, build, status, fragment):
    with LogCapture() as logs:
        for route in ROUTES:
            response = client.post(route, content=build(route), headers={"content-type": "application/json"})
            expected, expected_fragment = status, fragment
            if status == 200 and route in UNKNOWN_FIELDS_REFUSED and b'"extra"' in build(route):
                expected, expected_fragment = 422, "extra"
            if expected == 422 and route.startswith("/api/"):
                expected = 400  # EIS: 422 → 400
            assert response.status_code == expected, (route, response.text[:300])
            if expected >= 400:
                assert_dialect_error(response, dialect_of(server.engine, route))
                assert expected_fragment in response.text, (route, response.text[:300])
    assert not logs.tracebacks(), logs.tracebacks()
    assert CANARY not in logs.text()
    assert client.get("/health").status_code == 200


def test_the_original_report_nesting_is_refused_cheaply(client):
    """{"inputs": [[[[...]]]]} 10,000 levels deep: 400 naming the limit, not a RecursionError 500."""
    body = b'{"inputs": ' + nested(10_000) + b"}"
    response = client.post("/embed", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert f"more than {JSON_MAX_DEPTH} levels" in response.json()["error"]


def test_json_limits_are_exact():
    limits = JsonLimits(max_depth=3, max_elements=7)
    check_shape(b'{"a": [[1]]}', limits)  # 3 levels
    check_shape(b'{"a": "[[[[[[[[", "b": "]]],,,,,,,"}', limits)  # brackets and commas in strings do not count
    check_shape(b'{"a": "\\"[[[[[[\\"", "b": 1}', limits)  # nor behind escaped quotes
    check_shape(b'[1, [], {}, "x", [2]]', limits)  # 7 values: the array, 1, [], {}, "x", [2] and 2
    with pytest.raises(InferenceError) as too_deep:
        check_shape(b'{"a": [[[1]]]}', limits)
    assert too_deep.value.status == 400 and "more than 3 levels" in too_deep.value.message
    with pytest.raises(InferenceError) as too_many:
        check_shape(b'[1, [], {}, "x", [2, 3]]', limits)
    assert too_many.value.status == 413 and "holds 8 JSON values" in too_many.value.message


def test_json_limits_refuse_settings_the_decoder_cannot_honour():
    with pytest.raises(ValueError, match="--json-max-depth"):
        JsonLimits(max_depth=10_000)
    with pytest.raises(ValueError, match="--json-max-elements"):
        JsonLimits(max_elements=0)


def test_json_limits_come_from_flags_and_the_environment(monkeypatch):
    from infercore.server import cli

    def config(*flags: str):
        return cli.config_from_args(cli.build_parser().parse_args(["serve", *flags]))

    assert (config().json_max_depth, config().json_max_elements) == (64, 1_000_000)
    limits = config("--json-max-depth", "8", "--json-max-elements", "500")
    assert (limits.json_max_depth, limits.json_max_elements) == (8, 500)
    monkeypatch.setenv("INFERCORE_JSON_MAX_DEPTH", "12")
    assert config().json_max_depth == 12
    with pytest.raises(ValueError, match="--json-max-depth"):
        config("--json-max-depth", "1000")


def test_duplicate_key_message_names_the_key_but_cuts_it():
    class Body(msgspec.Struct):
        inputs: str

    with pytest.raises(InferenceError) as repeated:
        decode_body(b'{"inputs": "a", "inputs": "b"}', Body)
    assert repeated.value.status == 400 and "'inputs' twice" in repeated.value.message
    long_key = "k" * 500
    with pytest.raises(InferenceError) as long:
        decode_body(json.dumps({"inputs": "a"}).encode()[:-1] + f', "{long_key}": 1, "{long_key}": 2}}'.encode(), Body)
    assert long_key not in long.value.message and "k" * 64 in long.value.message


# ---- gRPC -------------------------------------------------------------------------------------

UNARY_REQUESTS = {
    "Embed": pb.EmbedRequest(inputs=[f"{CANARY} one"], model="dense"),
    "EmbedSparse": pb.EmbedSparseRequest(inputs=[f"{CANARY} one"], model="sparse"),
    "Rerank": pb.RerankRequest(query=f"{CANARY} q", documents=["a doc"], model="cross"),
    "Tokenize": pb.TokenizeRequest(inputs=[f"{CANARY} t"]),
    "Decode": pb.DecodeRequest(inputs=[pb.TokenIds(ids=[101, 102])]),
}
# Bytes no message of the service parses: a field's length runs past the end; a string field
# (field 1, wire type 2, of every request above that has one) holding invalid UTF-8; groups nested
# past the protobuf decoder's depth limit.
UNDECODABLE = {
    "truncated_length": b"\x0a\xff\xff\x03abc",
    "invalid_utf8_string": b"\x0a\x02\xff\xfe",
    "nested_groups": b"\x0b" * 200 + b"\x0c" * 200,
}


def raw_unary(channel: grpc.Channel, method: str):
    return channel.unary_unary(f"/infercore.v1.InferenceService/{method}", request_serializer=None,
                               response_deserializer=None)


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield channel


@pytest.mark.parametrize("method", sorted(UNARY_REQUESTS))
@pytest.mark.parametrize("case", sorted(UNDECODABLE))
def test_undecodable_grpc_message_is_invalid_argument(channel, method, case):
    metadata = (("authorization", f"Bearer {API_KEY}"),)
    with LogCapture() as logs:
        with pytest.raises(grpc.RpcError) as error:
            raw_unary(channel, method)(UNDECODABLE[case], timeout=30, metadata=metadata)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.value.code(), error.value.details())
    assert "request message" in error.value.details()
    assert not logs.tracebacks(), logs.tracebacks()
    # the same channel still works
    raw_unary(channel, method)(UNARY_REQUESTS[method].SerializeToString(), timeout=30, metadata=metadata)


def test_grpc_message_with_too_many_values_is_invalid_argument(channel):
    request = pb.DecodeRequest(inputs=[pb.TokenIds(ids=[101] * 300) for _ in range(10)])  # 3,000 ids
    with pytest.raises(grpc.RpcError) as error:
        raw_unary(channel, "Decode")(request.SerializeToString(), timeout=30,
                                     metadata=(("authorization", f"Bearer {API_KEY}"),))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "--json-max-elements" in error.value.details()


STREAM_REQUESTS = {
    "EmbedStream": UNARY_REQUESTS["Embed"],
    "EmbedSparseStream": UNARY_REQUESTS["EmbedSparse"],
    "RerankStream": UNARY_REQUESTS["Rerank"],
}


@pytest.mark.parametrize("method", sorted(STREAM_REQUESTS))
def test_undecodable_message_in_a_stream_answers_the_earlier_ones_then_invalid_argument(channel, method):
    """Found by the fuzz suite: aborting from the stream's reader wedged the call until its deadline."""
    call = channel.stream_stream(f"/infercore.v1.InferenceService/{method}", request_serializer=None,
                                 response_deserializer=None)
    requests = [STREAM_REQUESTS[method].SerializeToString(), UNDECODABLE["truncated_length"]]
    answers = []
    with LogCapture() as logs, pytest.raises(grpc.RpcError) as error:
        for answer in call(iter(requests), timeout=20, metadata=(("authorization", f"Bearer {API_KEY}"),)):
            answers.append(answer)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.value.code(), error.value.details())
    assert len(answers) == 1
    assert not logs.tracebacks(), logs.tracebacks()
