"""Graceful drain of a real ``infercore serve`` process: on SIGTERM readiness turns false at once, new
requests get 503, every request admitted before the signal is answered in full, and the process
exits 0. Requests are made long (hundreds of maximum-length inputs on one single-threaded worker) so
that they are still computing when the signal arrives; the test proves they were all admitted by
counting their inputs on /metrics, never by sleeping."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.engine_harness import scrape
from tests.server_process import start_server

LONG_REQUESTS = 3
INPUTS_PER_REQUEST = 1024
MAX_BATCH_REQUESTS = 16  # inputs one batch takes off the queue at most
WORDS = ("red", "green", "blue")
# each text is cut to the tiny model's 128 tokens (--auto-truncate)
TEXTS = [f"{word} " + "lantern " * 200 for word in WORDS]
EXIT_TIMEOUT_S = 90.0
SIGNAL_EFFECT_TIMEOUT_S = 15.0


def drain_server_args(model_dir) -> list[str]:
    return [
        "--model", f"tiny={model_dir}",
        "--cpu-workers", "1",
        "--tokenization-workers", "1",
        "--max-batch-requests", str(MAX_BATCH_REQUESTS),
        "--max-queued-tokens", "10000000",
        "--auto-truncate",
        "--request-timeout", "300",
        "--drain-timeout", "300",
    ]


def total(server_url: str, name: str) -> float:
    return sum(scrape(server_url, name).values())


def poll(predicate, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout_s:.0f}s")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_drains_admitted_requests_refuses_new_ones_and_exits_0(tiny_bert_dir, tmp_path):
    server = start_server(drain_server_args(tiny_bert_dir), tmp_path, "drain")
    client = httpx.Client(base_url=server.url, timeout=120.0, trust_env=False)
    try:
        reference = np.array(client.post("/embed", json={"inputs": TEXTS}).json())
        computed_before = total(server.url, "infercore_batch_size_sum")

        inputs = [TEXTS[i % len(TEXTS)] for i in range(INPUTS_PER_REQUEST)]
        with ThreadPoolExecutor(LONG_REQUESTS) as pool:
            long_requests = [
                pool.submit(httpx.post, server.url + "/embed", json={"inputs": inputs}, timeout=300.0,
                            trust_env=False)
                for _ in range(LONG_REQUESTS)
            ]

            def all_admitted() -> bool:
                for done in (f for f in long_requests if f.done()):
                    raise AssertionError(f"a long request ended before the signal: {done.result().status_code}")
                # queued + computed inputs exceed what all but one request could hold (an input in a
                # running batch is in neither count): so every request's inputs were queued
                queued = total(server.url, "infercore_queue_items")
                computed = total(server.url, "infercore_batch_size_sum") - computed_before
                return queued + computed > (LONG_REQUESTS - 1) * INPUTS_PER_REQUEST + MAX_BATCH_REQUESTS

            poll(all_admitted, "all long requests queued", 60.0)

            server.proc.send_signal(signal.SIGTERM)

            poll(lambda: client.get("/health").status_code == 503, "/health 503 after SIGTERM",
                 SIGNAL_EFFECT_TIMEOUT_S)
            health = client.get("/health")
            refused_native = client.post("/embed", json={"inputs": "new work"})
            refused_openai = client.post("/v1/embeddings", json={"input": "new work"})
            draining_rejections = scrape(server.url, "infercore_rejected_requests_total").get(
                frozenset({"reason": "draining"}.items()), 0.0
            )
            still_running = sum(not f.done() for f in long_requests)

            responses = [f.result(timeout=EXIT_TIMEOUT_S) for f in long_requests]

        exit_code = server.proc.wait(timeout=EXIT_TIMEOUT_S)
    finally:
        client.close()
        server.stop()

    assert still_running > 0, "the drain was observed only after the admitted work had finished"
    assert health.status_code == 503 and "shutting down" in health.json()["error"]
    assert refused_native.status_code == 503, refused_native.text
    assert refused_native.json()["error_type"] == "Unhealthy"
    assert "shutting down" in refused_native.json()["error"]
    assert refused_openai.status_code == 503, refused_openai.text
    assert refused_openai.json()["error"]["type"] == "server_error"
    assert draining_rejections >= 2

    for response in responses:
        assert response.status_code == 200, response.text
        vectors = np.array(response.json())
        assert vectors.shape == (INPUTS_PER_REQUEST, reference.shape[1])
        expected = reference[np.arange(INPUTS_PER_REQUEST) % len(TEXTS)]
        np.testing.assert_allclose(vectors, expected, rtol=0, atol=1e-6)

    assert exit_code == 0, server.log()[-3000:]
    assert not server.killed


@pytest.mark.slow
def test_sigterm_on_an_idle_server_exits_0_promptly(tiny_bert_dir, tmp_path):
    server = start_server(["--model", f"tiny={tiny_bert_dir}", "--cpu-workers", "1"], tmp_path, "idle")
    try:
        assert httpx.post(server.url + "/embed", json={"inputs": "x"}, trust_env=False).status_code == 200
        server.proc.send_signal(signal.SIGTERM)
        exit_code = server.proc.wait(timeout=30.0)
    finally:
        server.stop()
    assert exit_code == 0, server.log()[-3000:]
