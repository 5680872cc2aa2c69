"""The full-budget warm-up CUDA main executors run before serving: the largest batches the scheduler
can form (longest inputs and shortest inputs, up to the token budget and the request cap) go through
the model once, and a budget that does not fit in device memory fails with a message naming it.
The function is device-agnostic, so it is exercised here on CPU; the CUDA-only parts of the
executor (pinned packing, the next-batch stager) cannot run without a GPU."""

from __future__ import annotations

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
