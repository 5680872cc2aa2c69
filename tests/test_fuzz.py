"""Property-based fuzzing (hypothesis) of every HTTP route of every dialect and every gRPC method.

Routes come from the running app's route table and methods from the service descriptor, so a route or
RPC added later is fuzzed without editing this file. For each, hypothesis generates methods, query
strings, headers (API key right, wrong or missing; content types; scheduling headers with junk) and
bodies: a valid body of the route with fields overridden by hostile values (huge and negative
integers, extreme floats, wrong types, nested junk), arbitrary JSON, and byte-level mutations of a
valid body (truncated, bytes spliced in). gRPC gets messages built from the descriptor with any value
of each field's type, raw bytes, and streams of generated messages.

Every answer must hold:

- HTTP status < 500 (a 503 only as the deadline a request set itself ran out); gRPC never INTERNAL,
  UNKNOWN, DATA_LOSS or UNIMPLEMENTED, and DEADLINE_EXCEEDED only with a ``timeout_ms`` set;
- every HTTP error a JSON body with exactly the key structure of the route's dialect's errors;
- no traceback logged, and never the canary every generated text carries;
- and afterwards the server is healthy (HTTP /health 200, gRPC health SERVING).

Bounded for CI: examples per route / method are fixed (``FUZZ_EXAMPLES`` scales them), the run is
derandomized (the same examples every run, so CI is reproducible). ``INFERCORE_FUZZ_EXAMPLES=500``
and ``INFERCORE_FUZZ_RANDOM=1`` explore further locally; a failure found that way is shrunk by
hypothesis and belongs in tests/test_hostile_input.py or ``REGRESSIONS`` below as a fixed case.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.routing import Route

from infercore.proto.inference import open_inference_v2_pb2 as oip_pb
from infercore.proto.v1 import inference_pb2 as pb
from infercore.server.app import create_app
from infercore.server.config import ServerConfig
from infercore.server.engine import Engine
from tests.hostile import API_KEY, AUTH, CANARY, MODELS, LogCapture, assert_dialect_error, build_engine, dialect_of
from tests.test_grpc import LoopServer
from tests.test_hostile_input import VALID_BODIES

FUZZ_EXAMPLES = int(os.environ.get("INFERCORE_FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    database=None,
    derandomize=not os.environ.get("INFERCORE_FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
HTTP_TIMEOUT_S = 60.0
RPC_TIMEOUT_S = 60.0
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD")
# Every gRPC inference service: infercore.v1 and the Open Inference Protocol's.
SERVICES = (pb.DESCRIPTOR.services_by_name["InferenceService"],
            oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"])
BAD_GRPC_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS,
                  grpc.StatusCode.UNIMPLEMENTED}
# Values a path parameter is filled with besides arbitrary text: what the routes expect.
PATH_VALUES = ("text_embedding", "sparse_embedding", "rerank", "completion", *MODELS)
# Every request field any dialect reads, so overrides hit real fields.
FIELD_NAMES = (
    "inputs", "input", "query", "texts", "documents", "ids", "model", "normalize", "truncate",
    "truncation_direction", "prompt_name", "dimensions", "priority", "task", "top_k", "min_weight", "top_n",
    "return_text", "raw_scores", "add_special_tokens", "skip_special_tokens", "encoding_format", "user",
    "return_documents", "max_chunks_per_doc", "input_type", "task_settings", "usage_context",
)


# ---- strategies -----------------------------------------------------------------------------

printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=24)
# Text always carries the canary (between arbitrary text, emoji and control characters included).
texts = st.builds(lambda a, b: f"{a}{CANARY}{b}", st.text(max_size=12), st.text(max_size=12))
nasty_ints = st.sampled_from([0, -1, 1, 2, 7, 8, 9, 255, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63,
                              2**64, -(2**63) - 1, 10**30, -(10**30)]) | st.integers()
nasty_floats = st.sampled_from([0.0, -0.0, 0.5, 1e-308, 5e-324, 1e308, -1e308, 1.7976931348623157e308]) | st.floats(
    allow_nan=False, allow_infinity=False)
words = st.sampled_from(["", "right", "left", "Left", "search", "ingest", "batch", "internal_search", "float",
                         "base64", "query", "passage", "text", "ids", "tokens", *MODELS, *PATH_VALUES])
scalars = st.none() | st.booleans() | nasty_ints | nasty_floats | texts | words
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.sampled_from(FIELD_NAMES) | printable,
                                                                       children, max_size=5),
    max_leaves=16,
)
# Bytes spliced into a valid body: each a decoder failure mode (the 5000 brackets are the original report's).
SPLICES = (b"\xff", b"\x00", b"\\ud800", b"[" * 40, b"[" * 5000, b"NaN", b'"', b"\xed\xa0\x80", b"1e999", b"9" * 40)
text_lists = st.lists(texts, max_size=10)
token_ids = st.lists(st.integers(-2, 31_000) | nasty_ints, max_size=6)
# Values of the right type (mostly) for each field, so that requests get past decoding into the
# engine's own checks and computation; anything else comes from ``json_values``.
PLAUSIBLE = {
    "inputs": texts | text_lists, "input": texts | text_lists, "query": texts, "texts": text_lists,
    "documents": st.lists(texts | texts.map(lambda t: {"text": t}) | texts.map(lambda t: {"type": "text", "value": t})
                          | texts.map(lambda t: {"type": "image", "value": t}), max_size=10),
    "ids": token_ids | st.lists(token_ids, max_size=4), "model": words | printable,
    "task_settings": st.fixed_dictionaries({}, optional={"top_n": nasty_ints | scalars,
                                                         "return_documents": scalars}),
    "min_weight": nasty_floats, "user": texts,
    **{name: st.booleans() | st.none() for name in ("normalize", "truncate", "return_text", "raw_scores",
                                                       "add_special_tokens", "skip_special_tokens",
                                                       "return_documents")},
    **{name: nasty_ints | st.none() for name in ("dimensions", "top_k", "top_n", "max_chunks_per_doc")},
    **{name: words | st.none() for name in ("truncation_direction", "prompt_name", "priority", "task",
                                            "encoding_format", "input_type", "usage_context")},
}
plausible_overrides = st.dictionaries(st.sampled_from(FIELD_NAMES), st.just(None), max_size=3).flatmap(
    lambda keys: st.fixed_dictionaries({key: PLAUSIBLE[key] for key in keys}))
hostile_overrides = st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=4)


@st.composite
def json_bodies(draw, route_path: str) -> bytes:
    """A request body: the route's valid body as it is or with plausible or hostile field values
    (some of its fields dropped), arbitrary JSON, mangled bytes, or nothing much."""
    base = VALID_BODIES.get(route_path, {"inputs": [f"{CANARY} text"]})
    kind = draw(st.sampled_from(["valid", "plausible", "plausible", "plausible", "hostile", "arbitrary", "bytes",
                                 "empty"]))
    if kind == "empty":
        return draw(st.sampled_from([b"", b" ", b"null", b"[]", b"{}", b'""']))
    if kind == "arbitrary":
        value = draw(json_values)
    elif kind == "valid":
        value = base
    else:
        value = {**base, **draw(plausible_overrides if kind == "plausible" else hostile_overrides)}
        for key in draw(st.lists(st.sampled_from(sorted(base)), max_size=1 if kind == "plausible" else 2)):
            value.pop(key, None)
    encoded = json.dumps(value, ensure_ascii=draw(st.booleans())).encode()
    if kind != "bytes":
        return encoded
    position = draw(st.integers(0, len(encoded)))
    splice = draw(st.binary(max_size=8) | st.sampled_from(SPLICES))
    cut = draw(st.integers(position, len(encoded)))
    return encoded[:position] + splice + encoded[cut:]


# What a client can send as a header value: no leading or trailing whitespace (h11 refuses it).
header_text = printable.map(str.strip)
headers_strategy = st.fixed_dictionaries(
    {},
    optional={
        "content-type": st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                         "application/json; charset=latin-1", ""]),
        "x-priority": words | header_text,
        "x-request-timeout": st.sampled_from(["0", "-1", "nan", "inf", "1e400", "0.000001", "abc", "30", ""])
        | st.floats(allow_nan=True).map(str),
        "x-elastic-product-use-case": words | header_text,
        "traceparent": header_text,
        "x-fuzz": header_text,
    },
)
auth_strategy = st.sampled_from(["valid"] * 9 + ["wrong", "missing", "no-scheme"])
query_strategy = st.dictionaries(st.sampled_from(["format", "timeout", "model", "x"]),
                                 st.sampled_from(["ids", "tokens", "30s", "1ms", "0s", "-1s", "1", "abc"]) | printable,
                                 max_size=3)


def fill_path(path: str, draw) -> str:
    """``path`` with every ``{param}`` filled by a known value or arbitrary (URL-quoted) text; as
    often, a concrete path of the route that the valid bodies name."""
    pattern = re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$")
    concrete = sorted(p for p in VALID_BODIES if "{" in path and pattern.match(p))
    if concrete and draw(st.booleans()):
        return draw(st.sampled_from(concrete))
    return re.sub(r"\{[^}]+\}",
                  lambda _: urllib.parse.quote(draw(st.sampled_from(PATH_VALUES) | printable) or "x", safe=""),
                  path)


def auth_header(choice: str) -> dict[str, str]:
    return {"valid": AUTH, "wrong": {"authorization": "Bearer nope"}, "missing": {},
            "no-scheme": {"authorization": API_KEY}}[choice]


# ---- checks ----------------------------------------------------------------------------------

def check_http(engine, path: str, method: str, headers: dict[str, str], query: dict[str, str],
               response: httpx.Response) -> None:
    sets_deadline = "x-request-timeout" in headers or "timeout" in query
    if response.status_code >= 500:
        assert response.status_code == 503 and sets_deadline and "deadline" in response.text.lower(), (
            method, path, headers, query, response.status_code, response.text[:500])
    if response.status_code >= 400 and method != "HEAD":
        assert_dialect_error(response, dialect_of(engine, path))


def check_logs(logs: LogCapture) -> None:
    assert not logs.tracebacks(), logs.tracebacks()
    assert CANARY not in logs.text(), [r.getMessage() for r in logs.records if CANARY in r.getMessage()]
    logs.clear()


# ---- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bert_dir):
    engine = build_engine(tmp_path_factory.mktemp("fuzz-models"), tiny_bert_dir)
    server = LoopServer(engine).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=HTTP_TIMEOUT_S, trust_env=False) as client:
        yield client


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}",
                               options=[("grpc.max_receive_message_length", -1)]) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield channel


def assert_healthy(server, http: httpx.Client, channel: grpc.Channel) -> None:
    assert http.get("/health").status_code == 200
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30).status
    assert status == health_pb2.HealthCheckResponse.SERVING


# ---- HTTP -----------------------------------------------------------------------------------

def app_route_table() -> list[tuple[str, tuple[str, ...]]]:
    """(path, methods) of every route the app serves, read from the app itself (no model loaded)."""
    engine = Engine(ServerConfig())
    try:
        return [(route.path, tuple(sorted(route.methods or ()))) for route in create_app(engine, load=False).routes
                if isinstance(route, Route)]
    finally:
        engine.shutdown()


ROUTE_TABLE = app_route_table()


def test_the_route_table_covers_the_valid_bodies():
    """Every route the valid bodies were written for is still served (else they fuzz nothing)."""
    patterns = [re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$") for path, _ in ROUTE_TABLE]
    assert all(any(p.match(path) for p in patterns) for path in VALID_BODIES)


@pytest.mark.parametrize(("route_path", "declared"), ROUTE_TABLE, ids=[path for path, _ in ROUTE_TABLE])
def test_every_route_of_every_dialect_survives_fuzzing(server, http, channel, route_path, declared):
    engine = server.engine

    @FUZZ
    @given(data=st.data())
    def fuzz_route(data) -> None:
        draw = data.draw
        path = fill_path(route_path, draw)
        method = draw(st.sampled_from([*declared] * 16 + [*METHODS]))
        headers = {**draw(st.just({}) | headers_strategy), **auth_header(draw(auth_strategy))}
        query = draw(query_strategy)
        body = draw(json_bodies(path if path in VALID_BODIES else route_path)) if method not in ("GET", "HEAD") else b""
        response = http.request(method, path, params=query, headers=headers, content=body)
        check_http(engine, path, method, headers, query, response)
        check_logs(logs)

    with LogCapture() as logs:
        fuzz_route()
    assert_healthy(server, http, channel)


def test_unknown_paths_get_the_owning_dialects_404(server, http):
    @FUZZ
    @given(path=st.sampled_from(["/", "/_inference/", "/api/v1/", "/v1/", "/embed/", "/x"]).flatmap(
        lambda prefix: printable.map(lambda tail: prefix + urllib.parse.quote(tail))), method=st.sampled_from(METHODS))
    def fuzz_path(path: str, method: str) -> None:
        response = http.request(method, path, headers=AUTH)
        check_http(server.engine, path, method, {}, {}, response)

    with LogCapture() as logs:
        fuzz_path()
        check_logs(logs)


# ---- gRPC -----------------------------------------------------------------------------------

INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_ENUM: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1), FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
proto_texts = st.builds(lambda a, b: f"{a}{CANARY}{b}", st.text(max_size=12), st.text(max_size=12))


def field_values(field: FieldDescriptor, depth: int) -> st.SearchStrategy:
    """Any value of ``field``'s type (known names get the values the server looks for too)."""
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    if field.type == FieldDescriptor.TYPE_STRING:
        if field.name in ("model", "prompt_name", "task", "model_name", "name", "datatype"):
            known = ["", *MODELS, "query", "passage", "retrieval.query", "text", "documents", "BYTES", "FP32"]
            return st.sampled_from(known) | proto_texts
        return proto_texts | st.just("")
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=16)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(width=32 if field.type == FieldDescriptor.TYPE_FLOAT else 64)
    low, high = INT_RANGES[field.type]
    small = st.integers(-3, 10).filter(lambda v: low <= v <= high)
    return small | st.sampled_from([low, high]) | st.integers(low, high)


OIP_PARAMETER_NAMES = st.sampled_from(["timeout", "dimensions", "normalize", "truncate", "top_k", "min_weight",
                                       "raw_scores", "priority", "binary_data_output", "binary_data_size"])


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def messages(descriptor, depth: int = 0) -> st.SearchStrategy:
    """Messages of ``descriptor`` with any subset of fields set to any values of their types."""
    cls = message_factory.GetMessageClass(descriptor)
    if depth > 2:
        return st.builds(cls)
    fields = {}
    for field in descriptor.fields:
        if _is_map(field):  # the Open Inference Protocol's parameters: name → InferParameter
            value_field = field.message_type.fields_by_name["value"]
            fields[field.name] = st.dictionaries(OIP_PARAMETER_NAMES | proto_texts, field_values(value_field, depth),
                                                 max_size=3)
            continue
        values = field_values(field, depth)
        fields[field.name] = st.lists(values, max_size=4) if field.is_repeated else values

    @st.composite
    def build(draw):
        message = cls()
        chosen = draw(st.lists(st.sampled_from(sorted(fields)), unique=True)) if fields else []
        for name in chosen:
            field = descriptor.fields_by_name[name]
            value = draw(fields[name])
            if _is_map(field):
                for key, item in value.items():
                    getattr(message, name)[key].CopyFrom(item)
            elif field.is_repeated and field.type == FieldDescriptor.TYPE_MESSAGE:
                for item in value:
                    getattr(message, name).add().CopyFrom(item)
            elif field.is_repeated:
                getattr(message, name).extend(value)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(message, name).CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return build()


def check_rpc_error(error: grpc.RpcError, sets_deadline: bool) -> None:
    code = error.code()
    assert code not in BAD_GRPC_CODES, (code, error.details())
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        assert sets_deadline, error.details()
    assert code != grpc.StatusCode.UNAVAILABLE, error.details()


def check_slot_error(error: pb.RequestError, sets_deadline: bool) -> None:
    """A stream's per-request error slot: the same rules as a call's status."""
    code = next(c for c in grpc.StatusCode if c.value[0] == error.code)
    assert code not in BAD_GRPC_CODES | {grpc.StatusCode.UNAVAILABLE}, (code, error.message)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        assert sets_deadline, error.message


def sets_deadline(message: Any) -> bool:
    """infercore.v1's timeout_ms, or the Open Inference Protocol's "timeout" parameter."""
    return bool(getattr(message, "timeout_ms", 0)) or "timeout" in getattr(message, "parameters", {})


@pytest.mark.parametrize("path", [f"/{service.full_name}/{m.name}" for service in SERVICES for m in service.methods])
def test_every_grpc_method_survives_fuzzing(server, http, channel, path):
    service_name, method = path.strip("/").split("/")
    service = next(s for s in SERVICES if s.full_name == service_name)
    descriptor = service.methods_by_name[method]
    metadata_strategy = st.sampled_from([(("authorization", f"Bearer {API_KEY}"),)] * 3
                                        + [(), (("authorization", "Bearer nope"),)])
    raw = st.binary(max_size=48)

    if descriptor.client_streaming:
        call = channel.stream_stream(path, request_serializer=None, response_deserializer=None)
        output = message_factory.GetMessageClass(descriptor.output_type)

        @FUZZ
        @given(requests=st.lists(messages(descriptor.input_type).map(lambda m: m.SerializeToString()) | raw,
                                 min_size=1, max_size=3),
               metadata=metadata_strategy)
        def fuzz(requests: list[bytes], metadata) -> None:
            parsed = [_parse(descriptor.input_type, r) for r in requests]
            deadline = any(sets_deadline(m) for m in parsed if m is not None)
            try:
                for answer in call(iter(requests), timeout=RPC_TIMEOUT_S, metadata=metadata):
                    response = output.FromString(answer)
                    if response.HasField("error"):
                        check_slot_error(response.error, deadline)
            except grpc.RpcError as error:
                check_rpc_error(error, deadline)
    else:
        call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)

        @FUZZ
        @given(request=messages(descriptor.input_type).map(lambda m: m.SerializeToString()) | raw,
               metadata=metadata_strategy)
        def fuzz(request: bytes, metadata) -> None:
            message = _parse(descriptor.input_type, request)
            try:
                call(request, timeout=RPC_TIMEOUT_S, metadata=metadata)
            except grpc.RpcError as error:
                check_rpc_error(error, message is not None and sets_deadline(message))

    with LogCapture() as logs:
        fuzz()
        check_logs(logs)
    assert_healthy(server, http, channel)


def _parse(descriptor, data: bytes):
    """The message ``data`` encodes, or None when it does not parse."""
    try:
        return message_factory.GetMessageClass(descriptor).FromString(data)
    except Exception:
        return None
