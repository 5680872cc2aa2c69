"""Injected faults: out of memory splits a batch and retries (same vectors, bit for bit on CPU), an
input that does not fit alone gets 413 naming its size while its batch-mates succeed, and any other
model failure answers 500 for the failed batch only and makes /health probe until a forward pass
works again. (test_api_errors.py covers the plain always-failing model; these extend it.)

Faults are injected by ``RunnerSpy`` around the model's real runner."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from infercore.server.canonical import EmbedRequest
from infercore.server.errors import PayloadTooLarge
from tests.engine_harness import (
    RunnerSpy,
    async_wait_for,
    is_main_executor,
    make_engine,
    sample,
    text_of_tokens,
    token_ids,
    wait_for,
)

SPLITS = "infercore_oom_batch_splits_total"
OOM_LIMIT_TOKENS = 48

TEXTS = [
    "The lighthouse keeper counted gulls.",
    "Copper kettles hung above the stove.",
    "A quiet harbour at dawn, nets drying on the quay.",
    "Seventeen lanterns, one for every missing boat.",
    "Winter meadows glitter under a thin crust of frost.",
    "Le boulanger a oublié la fève.",
    "東京の夜景はとても綺麗です。",
    "def f(x): return x ** 2",
    "Violet candles in the window of the old mill.",
    "short",
    "The signal box at the junction was painted green every spring.",
    "Marble steps, worn smooth by a century of footsteps.",
]


class OutOfMemoryAbove:
    """Fails like a device out of memory whenever a batch carries more than ``limit_tokens`` tokens."""

    def __init__(self, limit_tokens: int, make_error: Callable[[int], Exception]):
        self.limit_tokens = limit_tokens
        self.make_error = make_error
        self.failed_batch_sizes: list[int] = []  # inputs in each batch that ran out of memory

    def __call__(self, batch, options) -> None:
        tokens = sum(batch.seq_lens[: len(options)])
        if tokens > self.limit_tokens:
            self.failed_batch_sizes.append(len(options))
            raise self.make_error(tokens)


OOM_ERRORS = {
    "torch_oom": lambda n: torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {n} MiB"),
    "cpu_allocator": lambda n: RuntimeError(
        f"DefaultCPUAllocator: can't allocate memory: you tried to allocate {n * 4096} bytes. "
        "Error code 12 (Cannot allocate memory)"
    ),
    "runtime_out_of_memory": lambda n: RuntimeError("CUDA error: out of memory"),
}


@pytest.mark.parametrize("error", list(OOM_ERRORS), ids=list(OOM_ERRORS))
def test_out_of_memory_splits_the_batch_and_every_input_gets_the_same_vector_as_without_the_fault(
    minilm_engine, error
):
    for text in TEXTS:
        assert len(token_ids(minilm_engine, "minilm", text)) <= OOM_LIMIT_TOKENS
    reference = asyncio.run(minilm_engine.embed(EmbedRequest(TEXTS))).vectors
    splits_before = sample(minilm_engine, SPLITS, model="minilm")

    fault = OutOfMemoryAbove(OOM_LIMIT_TOKENS, OOM_ERRORS[error])
    with RunnerSpy(minilm_engine, "minilm", fault=fault):
        result = asyncio.run(minilm_engine.embed(EmbedRequest(TEXTS)))

    assert fault.failed_batch_sizes and fault.failed_batch_sizes[0] == len(TEXTS)  # it really ran out of memory
    assert 1 not in fault.failed_batch_sizes  # every single input fits
    for got, want in zip(result.vectors, reference, strict=True):
        np.testing.assert_array_equal(got, want)
    assert sample(minilm_engine, SPLITS, model="minilm") - splits_before == len(fault.failed_batch_sizes)
    assert all(e.healthy for e in minilm_engine.models["minilm"].executors)


def test_an_input_too_big_for_memory_alone_gets_413_naming_its_tokens_while_its_batch_mates_succeed(minilm_engine):
    big = text_of_tokens(minilm_engine, "minilm", 100)
    first, second = TEXTS[:4], TEXTS[4:7]
    reference_first = asyncio.run(minilm_engine.embed(EmbedRequest(first))).vectors
    reference_second = asyncio.run(minilm_engine.embed(EmbedRequest(second))).vectors
    scheduler = minilm_engine.models["minilm"].scheduler
    fault = OutOfMemoryAbove(OOM_LIMIT_TOKENS, OOM_ERRORS["torch_oom"])

    async def scenario():
        with RunnerSpy(minilm_engine, "minilm", holds=is_main_executor, fault=fault) as spy:
            holder = asyncio.ensure_future(minilm_engine.embed(EmbedRequest(["hold"], priority="ingest")))
            await async_wait_for(lambda: spy.held == 1, "main executor held")
            # all three wait in the ingest lane and then form one batch together
            requests = [
                asyncio.ensure_future(minilm_engine.embed(EmbedRequest(texts, priority="ingest")))
                for texts in (first, [big], second)
            ]
            await async_wait_for(lambda: scheduler.queued_items == len(first) + 1 + len(second), "all queued")
            spy.release.set()
            await holder
            return await asyncio.gather(*requests, return_exceptions=True), spy

    (got_first, got_big, got_second), spy = asyncio.run(scenario())

    assert spy.batches_of(is_main_executor)[1].inputs[len(first)] == token_ids(minilm_engine, "minilm", big)
    assert isinstance(got_big, PayloadTooLarge), got_big
    assert got_big.status == 413 and "100 tokens" in got_big.message
    for got, want in zip(got_first.vectors + got_second.vectors, reference_first + reference_second, strict=True):
        np.testing.assert_array_equal(got, want)
    assert all(e.healthy for e in minilm_engine.models["minilm"].executors)


@pytest.mark.parametrize(
    ("path", "key"), [("/embed", "inputs"), ("/v1/embeddings", "input")], ids=["native", "openai"]
)
def test_an_input_that_does_not_fit_in_memory_gets_413_over_http_and_the_server_stays_healthy(
    minilm_engine, minilm_server, path, key
):
    big = text_of_tokens(minilm_engine, "minilm", 90)
    fault = OutOfMemoryAbove(OOM_LIMIT_TOKENS, OOM_ERRORS["cpu_allocator"])
    with RunnerSpy(minilm_engine, "minilm", fault=fault):
        refused = minilm_server.post(path, json={key: [TEXTS[0], big]})
        served = minilm_server.post(path, json={key: TEXTS[:3]})
        health = minilm_server.client().get("/health")
    assert refused.status_code == 413, refused.text
    if path == "/embed":
        assert refused.json()["error_type"] == "Validation"
        assert "90 tokens" in refused.json()["error"]
    else:
        assert refused.json()["error"]["code"] == "context_length_exceeded"
        assert "90 tokens" in refused.json()["error"]["message"]
    assert served.status_code == 200, served.text
    assert health.status_code == 200, health.text


# ---- other model failures ----------------------------------------------------------------------------

POISON = "volcano"


class FailOnPoison:
    """A model bug that only some inputs trigger: any batch holding the poison token fails."""

    def __init__(self, poison_id: int):
        self.poison_id = poison_id
        self.failures = 0

    def __call__(self, batch, options) -> None:
        if self.poison_id in batch.input_ids.tolist():
            self.failures += 1
            raise RuntimeError("simulated kernel fault")


@pytest.fixture(scope="module")
def tiny_engine(tiny_bert_dir):
    # One input per batch, so requests queued together still run in batches of their own.
    engine = make_engine("tiny", tiny_bert_dir, max_batch_requests=1)
    yield engine
    engine.shutdown()


def test_a_failing_batch_gets_500_while_other_requests_queued_with_it_are_served(tiny_engine, tiny_server):
    poison_id = token_ids(tiny_engine, "tiny", POISON)[1]
    fault = FailOnPoison(poison_id)
    scheduler = tiny_engine.models["tiny"].scheduler
    ingest = {"X-Priority": "ingest"}
    with ThreadPoolExecutor(8) as pool, RunnerSpy(tiny_engine, "tiny", holds=is_main_executor, fault=fault) as spy:
        holder = pool.submit(tiny_server.post, "/embed", json={"inputs": "hold"}, headers=ingest)
        wait_for(lambda: spy.held == 1, "main executor held")
        requests = []
        for path, body in [
            ("/embed", {"inputs": f"a {POISON} erupts"}),
            ("/embed", {"inputs": "a quiet meadow"}),
            ("/v1/embeddings", {"input": f"the {POISON} sleeps"}),
            ("/v1/embeddings", {"input": "a calm harbour"}),
        ]:
            queued = scheduler.queued_items
            requests.append(pool.submit(tiny_server.post, path, json=body, headers=ingest))
            wait_for(lambda q=queued: scheduler.queued_items == q + 1, "request queued")
        spy.release.set()
        responses = [future.result(timeout=60) for future in (holder, *requests)]

    assert [r.status_code for r in responses] == [200, 500, 200, 500, 200], [r.text for r in responses]
    assert responses[1].json()["error_type"] == "Backend"
    assert "tiny" in responses[1].json()["error"]
    assert responses[3].json()["error"]["type"] == "server_error"
    assert fault.failures == 2
    # after a failure the server needs a health probe; it passes (no poison in it) and clears the flag
    assert tiny_server.client().get("/health").status_code == 200
    assert all(e.healthy for e in tiny_engine.models["tiny"].executors)


def test_health_probes_the_model_only_after_a_failure(tiny_engine, tiny_server):
    poison_id = token_ids(tiny_engine, "tiny", POISON)[1]
    probe_ids = token_ids(tiny_engine, "tiny", "health")
    with RunnerSpy(tiny_engine, "tiny", fault=FailOnPoison(poison_id)) as spy, tiny_server.client() as client:
        assert client.get("/health").status_code == 200
        assert spy.computed_inputs() == []  # a healthy server answers /health without a forward pass
        assert client.post("/embed", json={"inputs": POISON}).status_code == 500
        assert not all(e.healthy for e in tiny_engine.models["tiny"].executors)
        assert client.get("/health").status_code == 200
        assert spy.computed_inputs().count(probe_ids) == 1  # the probe ran, and passed
        assert client.post("/embed", json={"inputs": "still here"}).status_code == 200
        assert client.get("/health").status_code == 200
        assert spy.computed_inputs().count(probe_ids) == 1  # healthy again: no further probing


def test_health_stays_503_while_every_forward_pass_fails_and_recovers_when_the_fault_is_gone(
    tiny_engine, tiny_server
):
    def device_fault(batch, options):
        raise RuntimeError("simulated device fault")

    probe_ids = token_ids(tiny_engine, "tiny", "health")
    with tiny_server.client() as client:
        with RunnerSpy(tiny_engine, "tiny", fault=device_fault) as spy:
            assert client.post("/embed", json={"inputs": "x"}).status_code == 500
            openai = client.post("/v1/embeddings", json={"input": "x"})
            assert openai.status_code == 500 and openai.json()["error"]["type"] == "server_error"
            for _ in range(3):
                health = client.get("/health")
                assert health.status_code == 503, health.text
                assert "forward pass" in health.json()["error"]
            assert spy.computed_inputs().count(probe_ids) == 3  # each /health probed again
            assert client.post("/embed", json={"inputs": "y"}).status_code == 500
        assert client.get("/health").status_code == 200
        assert client.post("/embed", json={"inputs": "x"}).status_code == 200
        assert all(e.alive for e in tiny_engine.models["tiny"].executors)
