"""Image input end to end, on a tiny jina-clip-v2 (tests/tiny_jina.py) served beside a text-only
model: the same image through the native, Jina-style, Elasticsearch, EIS and gRPC routes and the
Python client gives the vector ``embed_images`` gives on the preprocessed pixels; texts and images
share one space and keep their order; hostile images all get a 4xx in the dialect's shape and the
server stays healthy; image URLs are refused unless their host is allowed; no image data reaches a log.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import logging
import socketserver
import struct
import threading
import time
import types
import zlib

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from infercore.client import Client
from infercore.client import Image as ClientImage
from infercore.models.embedding import EmbedOptions
from infercore.models.images import preprocess_image
from infercore.models.repository import ModelSource
from infercore.models.tokenizer import TokenizedInput
from infercore.proto.v1 import inference_pb2 as pb
from infercore.proto.v1 import inference_pb2_grpc as pb_grpc
from infercore.server.config import ServerConfig
from infercore.server.engine import Engine
from infercore.server.errors import DeadlineExceeded, PayloadTooLarge, ValidationError
from infercore.server.image_input import PixelBudget, fetch_image
from infercore.server.scheduler import TokenBudgetScheduler, WorkItem
from tests.engine_harness import InProcessServer
from tests.test_grpc import LoopServer
from tests.tiny_jina import build_jina_clip_v2

CLIP, TEXT_ONLY = "clip", "tiny"
# Small enough that the hostile-input tests can exceed them with small images.
MAX_IMAGE_REQUEST_BYTES = 300_000
MAX_DECODING_PIXELS = 2_000_000


def png(width: int, height: int, seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, "PNG")
    return buffer.getvalue()


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{b64(data)}"


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR declaring ``width`` × ``height`` (and no pixel data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


PHOTO = png(90, 70, seed=1)
OTHER = encoded(Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 80, 3), dtype=np.uint8)), "JPEG",
                quality=90)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_jina_clip_v2(tmp_path_factory.mktemp("clip") / "jina-clip-v2")


@pytest.fixture(scope="module")
def served(clip_dir, tiny_bert_dir):
    config = ServerConfig(
        models=[ModelSource(CLIP, clip_dir), ModelSource(TEXT_ONLY, tiny_bert_dir)], grpc_port=0, cpu_workers=1,
        tokenization_workers=2, max_image_request_bytes=MAX_IMAGE_REQUEST_BYTES,
        max_decoding_pixels=MAX_DECODING_PIXELS,
    )
    engine = Engine(config)
    engine.load()
    server = LoopServer(engine).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http_client(served):
    with httpx.Client(base_url=served.url, timeout=60.0, trust_env=False) as client:
        yield client


@pytest.fixture(scope="module")
def stub(served):
    with grpc.insecure_channel(served.address) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield pb_grpc.InferenceServiceStub(channel)


def reference(engine: Engine, data: bytes, dimensions: int | None = None) -> np.ndarray:
    """``embed_images`` called directly on the preprocessed pixels."""
    model = engine.models[CLIP].model
    prepared = preprocess_image(data, model.image_processor)
    return model.images.embed_images(prepared.pixels[None], [EmbedOptions(normalize=True, dimensions=dimensions)])[0]


def grpc_vectors(message: pb.DenseVectors) -> np.ndarray:
    return np.frombuffer(message.data, dtype="<f4").reshape(message.count, message.dimensions)


def embed_native(client: httpx.Client, inputs: list, **options) -> np.ndarray:
    response = client.post("/embed", json={"inputs": inputs, "model": CLIP, **options})
    assert response.status_code == 200, response.text
    return np.asarray(response.json(), dtype=np.float32)


# ---- one image, every route, one vector ------------------------------------------------------------


def test_the_same_image_gives_the_same_vector_on_every_route(served, http_client, stub):
    expected = reference(served.engine, PHOTO)
    assert expected.shape == (32,) and abs(np.linalg.norm(expected) - 1) < 1e-5
    got = {}
    got["native base64"] = embed_native(http_client, [{"image": b64(PHOTO)}])[0]
    got["native data URI"] = embed_native(http_client, [{"image": data_uri(PHOTO)}])[0]
    jina = http_client.post("/v1/embeddings", json={"model": CLIP, "input": [{"image": data_uri(PHOTO)}]})
    assert jina.status_code == 200, jina.text
    assert jina.json()["data"][0]["index"] == 0
    got["jina"] = jina.json()["data"][0]["embedding"]
    es = http_client.post(f"/_inference/embedding/{CLIP}", json={
        "input": [{"content": {"type": "image", "format": "base64", "value": data_uri(PHOTO)}}],
        "input_type": "ingest",
    })
    assert es.status_code == 200, es.text
    assert set(es.json()) == {"embeddings"}
    got["elasticsearch"] = es.json()["embeddings"][0]["embedding"]
    eis = http_client.post("/api/v1/embed/dense", json={
        "input": [{"content": [{"type": "image", "format": "base64", "value": data_uri(PHOTO)}]}],
        "model": CLIP, "usage_context": "ingest",
    }, headers={"X-elastic-product-use-case": "internal_ingest"})
    assert eis.status_code == 200, eis.text
    got["eis"] = eis.json()["data"][0]
    message = pb.EmbedRequest(items=[pb.EmbedInput(image=PHOTO)], model=CLIP)
    got["grpc"] = grpc_vectors(stub.Embed(message, timeout=60).embeddings)[0]
    streamed = list(stub.EmbedStream(iter([message, message]), timeout=60))
    assert len(streamed) == 2
    got["grpc stream"] = grpc_vectors(streamed[1].response.embeddings)[0]
    for url in (served.url, f"grpc://{served.address}"):
        with Client(url) as client:
            got[f"client {url.split(':')[0]}"] = client.embed([ClientImage(PHOTO)], model=CLIP)[0]
    for route, vector in got.items():
        np.testing.assert_allclose(np.asarray(vector, dtype=np.float32), expected, atol=2e-6, err_msg=route)


def test_text_and_image_vectors_share_one_space_and_keep_their_order(served, http_client, stub):
    text = "a red fishing boat in the harbour"
    alone = {
        "text": embed_native(http_client, [text])[0],
        "photo": embed_native(http_client, [{"image": b64(PHOTO)}])[0],
        "other": embed_native(http_client, [{"image": data_uri(OTHER, "image/jpeg")}])[0],
    }
    # A text and an image request to the same model: same dimensions, unit length, comparable.
    assert alone["text"].shape == alone["photo"].shape == (32,)
    for vector in alone.values():
        assert abs(np.linalg.norm(vector) - 1) < 1e-5
    assert -1.0 <= float(alone["text"] @ alone["photo"]) <= 1.0
    np.testing.assert_allclose(alone["other"], reference(served.engine, OTHER), atol=2e-6)

    mixed = embed_native(http_client, [{"image": b64(OTHER)}, text, {"image": b64(PHOTO)}, {"text": text}])
    for got, name in zip(mixed, ["other", "text", "photo", "text"]):
        np.testing.assert_allclose(got, alone[name], atol=2e-6, err_msg=name)

    jina = http_client.post("/v1/embeddings", json={"model": CLIP, "input": [{"text": text}, {"image": b64(PHOTO)}]})
    assert [d["index"] for d in jina.json()["data"]] == [0, 1]
    np.testing.assert_allclose(jina.json()["data"][0]["embedding"], alone["text"], atol=2e-6)
    np.testing.assert_allclose(jina.json()["data"][1]["embedding"], alone["photo"], atol=2e-6)

    answer = stub.Embed(pb.EmbedRequest(items=[pb.EmbedInput(image=PHOTO), pb.EmbedInput(text=text)], model=CLIP),
                        timeout=60)
    np.testing.assert_allclose(grpc_vectors(answer.embeddings), np.stack([alone["photo"], alone["text"]]), atol=2e-6)
    assert list(answer.truncated) == [False, False]

    # Matryoshka truncation applies to images as to texts.
    short = embed_native(http_client, [{"image": b64(PHOTO)}, text], dimensions=16)
    np.testing.assert_allclose(short[0], reference(served.engine, PHOTO, dimensions=16), atol=2e-6)
    assert short.shape == (2, 16)


def test_a_group_of_several_items_is_the_normalised_mean_of_their_vectors(served, http_client):
    text = "a red fishing boat"
    photo, words = embed_native(http_client, [{"image": b64(PHOTO)}, text])
    expected = (photo + words) / np.linalg.norm(photo + words)
    group = {"content": [{"type": "image", "format": "base64", "value": data_uri(PHOTO)},
                         {"type": "text", "format": "text", "value": text}]}
    eis = http_client.post("/api/v1/embed/dense", json={"input": [group, {"content": [group["content"][1]]}],
                                                        "model": CLIP})
    assert eis.status_code == 200, eis.text
    data = np.asarray(eis.json()["data"], dtype=np.float32)
    assert data.shape == (2, 32)
    np.testing.assert_allclose(data[0], expected, atol=2e-6)
    es = http_client.post(f"/_inference/embedding/{CLIP}", json={"input": group})
    np.testing.assert_allclose(es.json()["embeddings"][0]["embedding"], expected, atol=2e-6)


def test_models_say_whether_they_take_images(served, http_client, stub):
    info = http_client.get("/info").json()
    assert info["max_image_request_bytes"] == MAX_IMAGE_REQUEST_BYTES and info["image_url_hosts"] == []
    models = {m["model_id"]: m for m in http_client.get("/v1/models").json()["data"]}
    assert models[CLIP]["modalities"] == ["text", "image"] and models[CLIP]["image_tokens"] == 17
    assert models[TEXT_ONLY]["modalities"] == ["text"]
    infos = {m.id: m for m in stub.Info(pb.InfoRequest(), timeout=10).models}
    assert infos[CLIP].image_input and infos[CLIP].image_tokens == 17 and not infos[TEXT_ONLY].image_input
    with Client(f"grpc://{served.address}") as client:
        assert {m.id: m.image_input for m in client.list_models()} == {CLIP: True, TEXT_ONLY: False}

    endpoints = {e["id"]: e for e in http_client.get("/api/v2/authorizations").json()["inference_endpoints"]}
    clip = endpoints[f".{CLIP}"]
    assert clip["task_types"] == {"eis": "embed/dense", "elasticsearch": "embedding"}
    assert clip["configuration"]["dimensions"] == 32
    assert clip["configuration"]["similarity"] == "cosine" and clip["configuration"]["element_type"] == "float"
    assert endpoints[f".{TEXT_ONLY}"]["task_types"] == {"eis": "embed/text/dense", "elasticsearch": "text_embedding"}


# ---- scheduling and execution ------------------------------------------------------------------------


def test_images_are_batched_by_their_patch_tokens_inside_the_token_budget():
    loop = asyncio.new_event_loop()
    try:
        def item(name: str, text_tokens: int = 0, image_tokens: int = 0) -> WorkItem:
            tokens = TokenizedInput(list(range(text_tokens)), [0] * text_tokens, False) if text_tokens else None
            image = types.SimpleNamespace(tokens=image_tokens) if image_tokens else None
            return WorkItem(tokens=tokens, options=name, future=loop.create_future(), loop=loop, enqueued_at=0.0,
                            image=image)

        scheduler = TokenBudgetScheduler(max_batch_tokens=40)
        scheduler.submit([item("image a", image_tokens=17), item("image b", image_tokens=17),
                          item("text", text_tokens=5), item("image c", image_tokens=17)])
        assert scheduler.queued_tokens == 56
        first = scheduler.next_batch(timeout_s=0.1)
        assert [i.options for i in first] == ["image a", "image b", "text"]  # 39 tokens; the next image is over
        assert [i.options for i in scheduler.next_batch(timeout_s=0.1)] == ["image c"]
    finally:
        loop.close()


def test_a_batch_mixing_texts_and_images_answers_each_input_in_order(served):
    handle = served.engine.models[CLIP]
    model, executor = handle.model, handle.executors[0]
    loop = asyncio.new_event_loop()
    try:
        text_options = model.runner.default_options()
        image_options = EmbedOptions(normalize=True)

        def item(payload) -> WorkItem:
            is_image = not isinstance(payload, TokenizedInput)
            return WorkItem(tokens=None if is_image else payload, image=payload if is_image else None,
                            options=image_options if is_image else text_options, future=loop.create_future(),
                            loop=loop, enqueued_at=0.0)

        texts = model.tokenizer.encode_batch(["a red boat", "the harbour at night, lit by lanterns"], truncate=True)
        images = [preprocess_image(data, model.image_processor) for data in (PHOTO, OTHER)]
        mixed = executor._compute([item(images[0]), item(texts[0]), item(images[1]), item(texts[1])])
        text_alone = executor._compute([item(t) for t in texts])
        image_alone = executor._compute([item(i) for i in images])
    finally:
        loop.close()
    for got, want in zip(mixed, [image_alone[0], text_alone[0], image_alone[1], text_alone[1]]):
        np.testing.assert_allclose(got, want, atol=2e-6)
    np.testing.assert_allclose(image_alone[0], reference(served.engine, PHOTO), atol=2e-6)


# ---- hostile input ----------------------------------------------------------------------------------

HOSTILE = {
    "not an image": b"this is plain text, not a picture" * 4,
    "truncated PNG": PHOTO[: len(PHOTO) // 2],
    "bomb (header declares 100000x100000)": png_header(100_000, 100_000),
    "0x0": png_header(0, 0),
    "100000x1": encoded(Image.new("RGB", (100_000, 1), (200, 10, 10)), "PNG"),
    "unsupported format (BMP)": encoded(Image.new("RGB", (8, 8)), "BMP"),
    "over the decoding budget (2000x1100)": encoded(Image.new("L", (2000, 1100)), "PNG"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_images_get_a_4xx_in_every_dialect_and_the_server_stays_healthy(served, http_client, stub, name):
    data = HOSTILE[name]
    native = http_client.post("/embed", json={"inputs": ["fine text", {"image": b64(data)}], "model": CLIP})
    assert 400 <= native.status_code < 500, (name, native.status_code, native.text)
    assert (native.json()["error"] and "input 1" in native.json()["error"]) or native.status_code == 413
    jina = http_client.post("/v1/embeddings", json={"model": CLIP, "input": [{"image": data_uri(data)}]})
    assert 400 <= jina.status_code < 500 and jina.json()["error"]["type"] == "invalid_request_error"
    eis = http_client.post("/api/v1/embed/dense", json={
        "input": [{"content": [{"type": "image", "format": "base64", "value": data_uri(data)}]}], "model": CLIP})
    assert eis.status_code in (400, 413) and isinstance(eis.json()["error"], str)
    es = http_client.post(f"/_inference/embedding/{CLIP}", json={"input": {"content": {"type": "image",
                                                                                         "value": data_uri(data)}}})
    assert 400 <= es.status_code < 500 and es.json()["error"]["type"] == "illegal_argument_exception"
    with pytest.raises(grpc.RpcError) as raised:
        stub.Embed(pb.EmbedRequest(items=[pb.EmbedInput(image=data)], model=CLIP), timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # On a stream, the bad image fails its own message only.
    answers = list(stub.EmbedStream(iter([pb.EmbedRequest(items=[pb.EmbedInput(image=data)], model=CLIP),
                                          pb.EmbedRequest(items=[pb.EmbedInput(image=PHOTO)], model=CLIP)]),
                                    timeout=60))
    assert answers[0].WhichOneof("result") == "error"
    assert answers[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert answers[1].WhichOneof("result") == "response"
    assert http_client.get("/health").status_code == 200
    assert embed_native(http_client, [{"image": b64(PHOTO)}]).shape == (1, 32)


@pytest.mark.parametrize(("name", "item", "status", "words"), [
    ("invalid base64", {"image": "not*base64*at*all"}, 422, "base64"),
    ("data URI of another type", {"image": "data:text/plain;base64,aGVsbG8="}, 422, "not an image type"),
    ("a URL while URLs are off", {"image": "http://127.0.0.1:9/cat.png"}, 422, "--image-url-hosts"),
    ("an empty image", {"image": ""}, 422, "empty"),
    ("an unknown item", {"audio": "abc"}, 422, "image"),
])
def test_bad_image_items_get_a_4xx_naming_the_problem(http_client, name, item, status, words):
    response = http_client.post("/embed", json={"inputs": [item], "model": CLIP})
    assert response.status_code == status, (name, response.text)
    assert words in response.json()["error"]


def test_an_image_sent_to_a_text_only_model_is_refused_naming_the_model(http_client, stub):
    response = http_client.post("/embed", json={"inputs": ["text", {"image": b64(PHOTO)}], "model": TEXT_ONLY})
    assert response.status_code == 422 and repr(TEXT_ONLY) in response.json()["error"]
    assert "text only" in response.json()["error"]
    eis = http_client.post("/api/v1/embed/dense", json={
        "input": [{"content": {"type": "image", "value": data_uri(PHOTO)}}], "model": TEXT_ONLY})
    assert eis.status_code == 400 and TEXT_ONLY in eis.json()["error"]
    with pytest.raises(grpc.RpcError) as raised:
        stub.Embed(pb.EmbedRequest(items=[pb.EmbedInput(image=PHOTO)], model=TEXT_ONLY), timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and TEXT_ONLY in raised.value.details()
    # Text alone through the multimodal routes still works for a text-only model.
    ok = http_client.post("/api/v1/embed/dense", json={"input": [{"content": {"type": "text", "value": "hi"}}],
                                                       "model": TEXT_ONLY})
    assert ok.status_code == 200


def test_content_types_other_than_text_and_image_are_refused(http_client):
    for body in (
        {"input": [{"content": {"type": "audio", "format": "base64", "value": "data:audio/wav;base64,AAAA"}}],
         "model": CLIP},
        {"input": [{"content": {"type": "image", "format": "text", "value": "x"}}], "model": CLIP},
        {"input": [{"content": []}], "model": CLIP},
    ):
        response = http_client.post("/api/v1/embed/dense", json=body)
        assert response.status_code == 400, response.text


def test_the_images_of_one_request_are_bounded_in_bytes(http_client, stub):
    noisy = png(200, 200, seed=3)  # random pixels: ~120 kB that do not compress
    assert MAX_IMAGE_REQUEST_BYTES / 3 < len(noisy) < MAX_IMAGE_REQUEST_BYTES
    assert embed_native(http_client, [{"image": b64(noisy)}]).shape == (1, 32)
    response = http_client.post("/embed", json={"inputs": [{"image": b64(noisy)}] * 3, "model": CLIP})
    assert response.status_code == 413 and "--max-image-request-bytes" in response.json()["error"]
    with pytest.raises(grpc.RpcError) as raised:
        stub.Embed(pb.EmbedRequest(items=[pb.EmbedInput(image=noisy)] * 3, model=CLIP), timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_refuses_inputs_and_items_together(stub):
    with pytest.raises(grpc.RpcError) as raised:
        stub.Embed(pb.EmbedRequest(inputs=["a"], items=[pb.EmbedInput(text="b")], model=CLIP), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_no_image_data_reaches_the_log(served, http_client, caplog):
    marked = png(40, 40, seed=99)
    encoded_image = b64(marked)
    with caplog.at_level(logging.DEBUG):
        embed_native(http_client, [{"image": encoded_image}, "text"])
        http_client.post("/embed", json={"inputs": [{"image": encoded_image[:-8] + "!!!!"}], "model": CLIP})
        http_client.post("/embed", json={"inputs": [{"image": encoded_image}], "model": TEXT_ONLY})
        http_client.post("/embed", json={"inputs": [{"image": b64(marked[:100])}], "model": CLIP})
        http_client.post("/api/v1/embed/dense", json={"input": [{"content": {"type": "video", "value": encoded_image}}],
                                                      "model": CLIP})
    text = "\n".join(record.getMessage() + str(record.exc_info or "") for record in caplog.records)
    assert any(record.levelno == logging.DEBUG for record in caplog.records)
    for piece in (encoded_image[:24], encoded_image[200:224], encoded_image[-24:-4]):
        assert piece not in text


# ---- image URLs -------------------------------------------------------------------------------------


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/photo.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PHOTO)))
            self.end_headers()
            self.wfile.write(PHOTO)
        elif self.path == "/same-host-redirect":
            self.send_response(302)
            self.send_header("Location", "/photo.png")
            self.end_headers()
        elif self.path == "/other-host-redirect":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/photo.png")
            self.end_headers()
        elif self.path == "/big":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"\0" * 5000)
        elif self.path == "/slow":
            time.sleep(2.0)
            self.send_response(200)
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def image_host():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _ImageHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def url_server(clip_dir):
    config = ServerConfig(models=[ModelSource(CLIP, clip_dir)], cpu_workers=1, tokenization_workers=1,
                          image_url_hosts=("127.0.0.1",), image_url_timeout_s=5.0,
                          max_image_request_bytes=len(PHOTO) + 100)
    engine = Engine(config)
    engine.load()
    server = InProcessServer(engine).start()
    yield server
    server.stop()
    engine.shutdown()


def test_image_urls_are_fetched_only_from_allowed_hosts(served, url_server, image_host):
    expected = reference(served.engine, PHOTO)
    with url_server.client() as client:
        for path in ("/photo.png", "/same-host-redirect"):
            vector = embed_native(client, [{"image": image_host + path}])[0]
            np.testing.assert_allclose(vector, expected, atol=2e-6, err_msg=path)
        for path, words in (("/other-host-redirect", "another host"), ("/missing", "HTTP 404")):
            response = client.post("/embed", json={"inputs": [{"image": image_host + path}], "model": CLIP})
            assert response.status_code == 422 and words in response.json()["error"], path
        # A fetched body counts against the request's image bytes like base64 does.
        twice = client.post("/embed", json={"inputs": [{"image": image_host + "/photo.png"}] * 2, "model": CLIP})
        assert twice.status_code == 413 and "--max-image-request-bytes" in twice.json()["error"]
        port = image_host.rsplit(":", 1)[1]
        response = client.post("/embed", json={"inputs": [{"image": f"http://localhost:{port}/photo.png"}]})
        assert response.status_code == 422 and "'localhost'" in response.json()["error"]
        assert client.get("/health").status_code == 200


def test_image_url_fetches_are_bounded_in_size_and_time(image_host):
    hosts = ("127.0.0.1",)

    def fetch(url: str, max_bytes: int = 1000, timeout_s: float = 5.0) -> bytes:
        return asyncio.run(fetch_image(url, hosts, max_bytes=max_bytes, timeout_s=timeout_s))

    assert fetch(image_host + "/photo.png", max_bytes=len(PHOTO)) == PHOTO
    with pytest.raises(ValidationError, match="limit of 1000 bytes"):
        fetch(image_host + "/big")
    started = time.perf_counter()
    with pytest.raises(ValidationError, match=r"longer than 0\.3s"):
        fetch(image_host + "/slow", timeout_s=0.3)
    assert time.perf_counter() - started < 1.5
    with pytest.raises(ValidationError, match="credentials"):
        fetch("http://user:pw@127.0.0.1/photo.png")
    with pytest.raises(ValidationError, match="http"):
        fetch("ftp://127.0.0.1/photo.png")
    with pytest.raises(ValidationError, match="--image-url-hosts"):
        asyncio.run(fetch_image(image_host + "/photo.png", (), max_bytes=len(PHOTO), timeout_s=1.0))


# ---- the pixel budget -------------------------------------------------------------------------------


def test_the_pixel_budget_makes_decodes_wait_and_refuses_what_never_fits():
    budget = PixelBudget(100)
    with pytest.raises(PayloadTooLarge, match="--max-decoding-pixels"):
        with budget.reserve(101, time.perf_counter() + 1):
            pass
    entered = threading.Event()
    with budget.reserve(80, time.perf_counter() + 1):
        def second() -> None:
            with budget.reserve(30, time.perf_counter() + 5):
                entered.set()

        waiter = threading.Thread(target=second)
        waiter.start()
        assert not entered.wait(0.2), "a reservation beyond the budget must wait"
        with pytest.raises(DeadlineExceeded):
            with budget.reserve(30, time.perf_counter() + 0.05):
                pass
    waiter.join(5)
    assert entered.is_set() and budget.in_use == 0


# ---- a fresh `infercore serve` with a jina-clip-v2 directory ----------------------------------------


def test_a_served_clip_directory_answers_images_on_every_route_and_logs_none_of_them(clip_dir, tmp_path):
    from tests.server_process import start_server

    server = start_server(["--model", f"{CLIP}={clip_dir}", "--log-level", "debug"], tmp_path, "clip")
    try:
        with httpx.Client(base_url=server.url, timeout=60.0, trust_env=False) as client:
            formats = {
                "PNG": PHOTO,
                "JPEG": OTHER,
                "WebP": encoded(Image.open(io.BytesIO(PHOTO)), "WEBP", lossless=True),
                "GIF": encoded(Image.open(io.BytesIO(PHOTO)).convert("P"), "GIF"),
            }
            for name, data in formats.items():
                uri = data_uri(data, f"image/{name.lower()}")
                vectors = [
                    client.post("/embed", json={"inputs": [{"image": b64(data)}]}).json()[0],
                    client.post("/v1/embeddings", json={"input": [{"image": uri}]}).json()["data"][0]["embedding"],
                    client.post(f"/_inference/embedding/{CLIP}", json={
                        "input": {"content": {"type": "image", "value": uri}}}).json()["embeddings"][0]["embedding"],
                    client.post("/api/v1/embed/dense", json={"model": CLIP, "input": [
                        {"content": [{"type": "image", "format": "base64", "value": uri}]}]}).json()["data"][0],
                ]
                for vector in vectors[1:]:
                    np.testing.assert_allclose(vector, vectors[0], atol=2e-6, err_msg=name)
            text, image = client.post("/embed", json={"inputs": ["a boat", {"image": b64(PHOTO)}]}).json()
            assert len(text) == len(image) == 32
            for name, data in HOSTILE.items():
                response = client.post("/embed", json={"inputs": [{"image": b64(data)}]})
                # (2000x1100 is within the default decoding budget: only the module's server is that tight)
                assert 400 <= response.status_code < 500 or "budget" in name, name
            assert client.get("/health").status_code == 200
    finally:
        server.stop()
    log = server.log()
    assert "DEBUG" in log
    for data in (PHOTO, OTHER, *HOSTILE.values()):
        encoded_text = b64(data)
        # Pieces from the middle and the end: the start of every PNG's base64 is the same signature.
        for piece in (encoded_text[len(encoded_text) // 2:][:20], encoded_text.rstrip("=")[-20:]):
            assert piece not in log
