"""The full-budget warm-up CUDA main executors run before serving: the largest batches the scheduler
can form (longest inputs and shortest inputs, up to the token budget and the request cap) go through
the model once, and a budget that does not fit in device memory fails with a message naming it.
The function is device-agnostic, so it is exercised here on CPU; the CUDA-only parts of the
executor cannot run without a GPU: the next-batch stager's logic is exercised here with CUDA's
stream and event API faked, pinned memory and real streams are not."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from infercore.models.loader import load_model
from infercore.server.executor import warm_up_full_batch


@pytest.fixture
def model(tiny_bert_dir):
    return load_model("tiny", tiny_bert_dir, device="cpu")


def _spy_on_batches(model, monkeypatch, fail: Exception | None = None) -> list[tuple[int, ...]]:
    seen: list[tuple[int, ...]] = []
    run = model.runner.run

    def spy(batch, options):
        assert len(options) == batch.num_inputs
        seen.append(batch.seq_lens[: batch.num_inputs])
        if fail is not None:
            raise fail
        return run(batch, options)

    monkeypatch.setattr(model.runner, "run", spy)
    return seen


def test_warm_up_runs_the_budget_as_longest_then_shortest_inputs(model, monkeypatch):
    seen = _spy_on_batches(model, monkeypatch)
    warm_up_full_batch(model, max_batch_tokens=4 * model.max_input_tokens)
    shortest = model.tokenizer.num_special_tokens + 1
    assert seen[0] == (model.max_input_tokens,) * 4
    assert seen[1] == (shortest,) * (4 * model.max_input_tokens // shortest)


def test_warm_up_respects_the_request_cap(model, monkeypatch):
    seen = _spy_on_batches(model, monkeypatch)
    warm_up_full_batch(model, max_batch_tokens=4 * model.max_input_tokens, max_batch_requests=3)
    assert [len(batch) for batch in seen] == [3, 3]


def test_a_budget_that_does_not_fit_fails_naming_it(model, monkeypatch):
    _spy_on_batches(model, monkeypatch, fail=torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    with pytest.raises(RuntimeError, match=r"budget 512 tokens\) does not fit .* lower --max-batch-tokens"):
        warm_up_full_batch(model, max_batch_tokens=512)


def test_other_failures_pass_through_unchanged(model, monkeypatch):
    _spy_on_batches(model, monkeypatch, fail=ValueError("broken weights"))
    with pytest.raises(ValueError, match="broken weights"):
        warm_up_full_batch(model, max_batch_tokens=512)


# ---- the next-batch stager, with CUDA's stream API faked on CPU ----------------------------------


class FakeStream:
    def __init__(self, device=None, priority=0):
        self.waited: list[FakeEvent] = []

    def wait_event(self, event):
        self.waited.append(event)


class FakeEvent:
    recorded: ClassVar[list[FakeEvent]] = []

    def record(self, stream=None):
        FakeEvent.recorded.append(self)


def fake_staged_cuda_api(monkeypatch) -> tuple[FakeStream, list]:
    """The executor's CUDA main path (stager thread, events, stream waits) on CPU tensors: streams
    and events are stand-ins that record what the executor asks of them."""
    import contextlib

    from infercore.server import executor as executor_module

    compute = FakeStream()
    FakeEvent.recorded = []
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    recorded_on: list = []
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: recorded_on.append(stream), raising=False)
    monkeypatch.setattr(executor_module.ModelExecutor, "_stages_batches",
                        property(lambda self: self.lanes != ("search",)))
    return compute, recorded_on


def test_staged_executor_serves_every_request_with_the_unstaged_results(monkeypatch, tiny_bert_dir):
    import asyncio

    import numpy as np

    from infercore.server.canonical import EmbedRequest
    from tests.engine_harness import make_engine

    texts = [f"passage number {i} " + "word " * (i % 7 * 9) for i in range(40)]

    def embed_all():
        engine = make_engine("tiny", tiny_bert_dir, max_batch_tokens=256)

        async def go():
            replies = [engine.embed(EmbedRequest([t], priority="ingest")) for t in texts]
            return [r.vectors[0] for r in await asyncio.gather(*replies)]

        try:
            return asyncio.run(asyncio.wait_for(go(), 120))  # a lost batch fails the test, not hangs it
        finally:
            engine.shutdown()

    expected = embed_all()  # CPU executors: no stager
    compute, recorded_on = fake_staged_cuda_api(monkeypatch)
    staged = embed_all()
    # Every staged batch made the compute stream wait for its copy, and its tensors were handed over
    # to that stream (input ids, positions, cu_seqlens at least).
    assert len(compute.waited) >= 2, "the stager was not used"
    assert compute.waited == FakeEvent.recorded[: len(compute.waited)]
    assert recorded_on and all(stream is compute for stream in recorded_on)
    np.testing.assert_allclose(np.array(staged), np.array(expected), rtol=1e-5, atol=1e-6)
