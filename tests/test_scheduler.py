"""The token-budget scheduler on its own, and the engine in-process: batching, ordering, cancellation
and batch invariance (the same input gives the same vector whatever it was batched with)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from infercore.models.tokenizer import TokenizedInput
from infercore.server.canonical import EmbedRequest
from infercore.server.engine import Engine
from infercore.server.errors import NotReady
from infercore.server.scheduler import TokenBudgetScheduler, WorkItem
from tests.engine_harness import RunnerSpy, async_wait_for, make_engine

# ---- TokenBudgetScheduler -----------------------------------------------------------------------


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def make_items(loop, sizes: list[int], tag: str = "") -> list[WorkItem]:
    """One work item per size; ``options`` carries a name to check identity and order."""
    return [
        WorkItem(
            tokens=TokenizedInput(ids=list(range(n)), type_ids=[0] * n, truncated=False),
            options=f"{tag}{i}",
            future=loop.create_future(),
            loop=loop,
            enqueued_at=0.0,
        )
        for i, n in enumerate(sizes)
    ]


def drain(scheduler: TokenBudgetScheduler, max_batches: int = 100) -> list[list[WorkItem]]:
    """Every batch until the queue is empty (non-blocking: a short timeout per call)."""
    batches = []
    for _ in range(max_batches):
        if scheduler.queued_items == 0:
            return batches
        batch = scheduler.next_batch(timeout_s=0.01)
        if batch:
            batches.append(batch)
    raise AssertionError("scheduler never ran empty")


def names(batches: list[list[WorkItem]]) -> list[list[str]]:
    return [[item.options for item in batch] for batch in batches]


def test_batches_never_exceed_the_token_budget(loop):
    scheduler = TokenBudgetScheduler(max_batch_tokens=10)
    sizes = [3, 4, 2, 5, 5, 1, 9, 2, 7, 3]
    scheduler.submit(make_items(loop, sizes))
    batches = drain(scheduler)

    assert [sum(i.num_tokens for i in b) for b in batches] == [9, 10, 10, 9, 3]
    assert all(sum(i.num_tokens for i in b) <= 10 for b in batches)
    assert sum(len(b) for b in batches) == len(sizes)
    assert scheduler.queued_tokens == 0


def test_an_item_over_the_budget_runs_alone(loop):
    scheduler = TokenBudgetScheduler(max_batch_tokens=8)
    scheduler.submit(make_items(loop, [2, 20, 2, 3]))
    assert names(drain(scheduler)) == [["0"], ["1"], ["2", "3"]]


def test_max_batch_requests_caps_inputs_per_batch(loop):
    scheduler = TokenBudgetScheduler(max_batch_tokens=1000, max_batch_requests=2)
    scheduler.submit(make_items(loop, [1] * 5))
    assert [len(b) for b in drain(scheduler)] == [2, 2, 1]


def test_items_come_out_in_arrival_order_across_submissions(loop):
    scheduler = TokenBudgetScheduler(max_batch_tokens=5)
    scheduler.submit(make_items(loop, [2, 2], "a"))
    scheduler.submit(make_items(loop, [3], "b"))
    scheduler.submit(make_items(loop, [1, 4, 1], "c"))
    flat = [name for batch in names(drain(scheduler)) for name in batch]
    assert flat == ["a0", "a1", "b0", "c0", "c1", "c2"]


def test_abandoned_items_are_skipped_and_never_returned(loop):
    scheduler = TokenBudgetScheduler(max_batch_tokens=100)
    items = make_items(loop, [5, 6, 7, 8])
    items[1].future.cancel()
    items[3].future.cancel()
    scheduler.submit(items)

    batches = drain(scheduler)
    assert names(batches) == [["0", "2"]]
    assert scheduler.queued_items == 0
    assert scheduler.queued_tokens == 0


def test_abandoned_items_do_not_count_against_the_budget(loop):
    scheduler = TokenBudgetScheduler(max_batch_tokens=10)
    items = make_items(loop, [4, 9, 5])
    items[1].future.cancel()
    scheduler.submit(items)
    assert names(drain(scheduler)) == [["0", "2"]]


def test_a_queue_of_only_abandoned_items_yields_no_work(loop):
    scheduler = TokenBudgetScheduler(max_batch_tokens=10)
    items = make_items(loop, [3, 3])
    for item in items:
        item.future.cancel()
    scheduler.submit(items)
    assert scheduler.next_batch(timeout_s=0.01) == []
    assert scheduler.queued_items == 0


def test_close_drains_what_is_queued_then_returns_none(loop):
    scheduler = TokenBudgetScheduler(max_batch_tokens=4)
    scheduler.submit(make_items(loop, [3, 3]))
    scheduler.close()

    assert names([scheduler.next_batch()]) == [["0"]]
    assert names([scheduler.next_batch()]) == [["1"]]
    assert scheduler.next_batch() is None
    assert scheduler.next_batch() is None
    # A request admitted just before the shutdown began gets a 503 to retry elsewhere, not a 500.
    with pytest.raises(NotReady, match="shutting down") as refused:
        scheduler.submit(make_items(loop, [1]))
    assert refused.value.status == 503


def test_next_batch_times_out_empty_and_wakes_on_submit(loop):
    scheduler = TokenBudgetScheduler(max_batch_tokens=10)
    assert scheduler.next_batch(timeout_s=0.01) == []

    got: list = []
    waiter = threading.Thread(target=lambda: got.append(scheduler.next_batch(timeout_s=30)))
    waiter.start()
    scheduler.submit(make_items(loop, [2]))
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    assert names(got) == [["0"]]


def test_close_wakes_a_waiting_executor(loop):
    scheduler = TokenBudgetScheduler(max_batch_tokens=10)
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(scheduler.next_batch()))
    waiter.start()
    scheduler.close()
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    assert got == [None]


def test_a_zero_token_budget_is_refused():
    with pytest.raises(ValueError):
        TokenBudgetScheduler(max_batch_tokens=0)


# ---- Engine in-process --------------------------------------------------------------------------------

TEXTS = [
    "short",
    "A medium-length sentence about harbours, copper kettles and winter meadows.",
    "Une phrase en français avec des accents : été, naïve, œuvre.",
    "東京の夜景はとても綺麗です。",
    "🚀 emoji and words 👩‍🚀",
    " ".join(["lantern"] * 120),
    "Κάθε μέρα πίνω καφέ στο ίδιο μικρό καφενείο.",
    "one two three four five six seven eight nine ten eleven twelve",
]


def hold_every_executor(thread_name: str) -> bool:
    """RunnerSpy holds: every executor waits inside the model call until released, so queued work
    piles up behind it (make_engine's single main executor leaves no twin to take it instead)."""
    return True


def computed_batch_sizes(spy: RunnerSpy) -> list[int]:
    return [len(batch.inputs) for batch in spy.batches]


@pytest.fixture(scope="module")
def minilm_engine(minilm_dir):
    engine = make_engine("minilm", minilm_dir, max_batch_tokens=4096)
    yield engine
    engine.shutdown()


def embed_one_at_a_time(engine: Engine, requests: list[EmbedRequest]) -> list[np.ndarray]:
    out = []
    for request in requests:
        for text in request.inputs:
            single = EmbedRequest([text], dimensions=request.dimensions, normalize=request.normalize)
            out.append(asyncio.run(engine.embed(single)).vectors[0])
    return out


def test_concurrent_requests_get_the_same_vectors_as_one_at_a_time(minilm_engine):
    # All in the ingest lane, so only the main executor computes them and they pile up behind it.
    requests = [EmbedRequest([t], priority="ingest") for t in TEXTS]
    requests += [EmbedRequest(TEXTS[i:i + 3], priority="ingest") for i in range(0, len(TEXTS), 3)]
    requests += [
        EmbedRequest(TEXTS[:4], dimensions=64, priority="ingest"),
        EmbedRequest(TEXTS[4:], normalize=False, priority="ingest"),
    ]
    alone = embed_one_at_a_time(minilm_engine, requests)

    async def all_at_once():
        with RunnerSpy(minilm_engine, "minilm", holds=hold_every_executor) as spy:
            first = asyncio.ensure_future(minilm_engine.embed(EmbedRequest(["hold the executor"], priority="ingest")))
            await async_wait_for(lambda: spy.held == 1, "the executor held")
            rest = [asyncio.ensure_future(minilm_engine.embed(r)) for r in requests]
            total = sum(len(r.inputs) for r in requests)
            await async_wait_for(lambda: minilm_engine.models["minilm"].scheduler.queued_items == total, "all queued")
            spy.release.set()
            await first
            return await asyncio.gather(*rest), computed_batch_sizes(spy)

    results, batch_sizes = asyncio.run(all_at_once())
    together = [v for result in results for v in result.vectors]

    assert max(batch_sizes) > 1, batch_sizes  # the requests really were computed in shared batches
    assert len(together) == len(alone)
    for got, want in zip(together, alone, strict=True):
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_cancelled_request_is_never_computed_and_does_not_break_others(tiny_engine):
    handle = tiny_engine.models["tiny"]
    a_texts, b_texts, c_texts = TEXTS[:2], TEXTS[2:6], TEXTS[6:]
    expected_a = embed_one_at_a_time(tiny_engine, [EmbedRequest(a_texts)])
    expected_c = embed_one_at_a_time(tiny_engine, [EmbedRequest(c_texts)])

    async def scenario():
        with RunnerSpy(tiny_engine, "tiny", holds=hold_every_executor) as spy:
            a = asyncio.ensure_future(tiny_engine.embed(EmbedRequest(a_texts)))
            await async_wait_for(lambda: spy.held == 1, "the executor held")
            b = asyncio.ensure_future(tiny_engine.embed(EmbedRequest(b_texts)))
            c = asyncio.ensure_future(tiny_engine.embed(EmbedRequest(c_texts)))
            await async_wait_for(lambda: handle.scheduler.queued_items == len(b_texts) + len(c_texts), "b, c queued")
            b.cancel()
            spy.release.set()
            result_a, result_c = await asyncio.gather(a, c)
            with pytest.raises(asyncio.CancelledError):
                await b
            after = await tiny_engine.embed(EmbedRequest(["after the cancellation"]))
            health = await tiny_engine.check_health()
            return result_a, result_c, after, health, computed_batch_sizes(spy)

    result_a, result_c, after, health, batch_sizes = asyncio.run(scenario())

    assert sum(batch_sizes[:2]) == len(a_texts) + len(c_texts), batch_sizes  # b's inputs never reached the model
    for got, want in zip(result_a.vectors + result_c.vectors, expected_a + expected_c, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert len(after.vectors) == 1
    assert health is None
    assert handle.scheduler.queued_items == 0 and handle.scheduler.queued_tokens == 0


def test_a_request_cancelled_by_a_closed_event_loop_does_not_stop_the_executor(tiny_engine):
    """A client that goes away (its loop closes) while its batch runs must not kill the executor."""

    async def start_and_abandon():
        with RunnerSpy(tiny_engine, "tiny", holds=hold_every_executor) as spy:
            task = asyncio.ensure_future(tiny_engine.embed(EmbedRequest(["abandoned"])))
            await async_wait_for(lambda: spy.held == 1, "the executor held")
            task.cancel()
            spy.release.set()

    asyncio.run(start_and_abandon())
    result = asyncio.run(tiny_engine.embed(EmbedRequest(["still served"])))
    assert len(result.vectors) == 1
    assert all(e.alive for e in tiny_engine.models["tiny"].executors)
    assert asyncio.run(tiny_engine.check_health()) is None


def test_engine_reports_token_counts_and_truncation(tiny_engine):
    long_text = " ".join(["lantern"] * 300)
    result = asyncio.run(tiny_engine.embed(EmbedRequest(["one two", long_text], truncate=True)))
    limit = tiny_engine.models["tiny"].model.max_input_tokens
    assert result.truncated == [False, True]
    assert result.input_tokens == 4 + limit
    assert result.model == "tiny"


def test_a_batch_budget_below_the_model_input_limit_is_raised_to_fit_one_input(minilm_dir):
    """--max-batch-tokens smaller than a model's input limit must not make max-length inputs unservable."""
    engine = make_engine("minilm", minilm_dir, max_batch_tokens=8)
    try:
        assert engine.models["minilm"].scheduler.max_batch_tokens == engine.models["minilm"].model.max_input_tokens
        long_text = " ".join(["word"] * 400)
        result = asyncio.run(engine.embed(EmbedRequest([long_text, "short"], truncate=True)))
        assert [len(v) for v in result.vectors] == [384, 384]
    finally:
        engine.shutdown()


def test_cpu_batch_budget_defaults_to_the_cpu_default(tiny_engine):
    from infercore.server.config import DEFAULT_MAX_BATCH_TOKENS

    assert tiny_engine.models["tiny"].scheduler.max_batch_tokens == DEFAULT_MAX_BATCH_TOKENS["cpu"]
