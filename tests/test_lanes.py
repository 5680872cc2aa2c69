"""Priority lanes: the scheduler's lane order and top-up, the search executor's share of the work,
the lane a request gets (by default and on request, in both dialects), and a search request that
overtakes a flood of ingest work. Queueing is made deterministic by holding executors inside the
model call (``RunnerSpy``), never by timing."""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from infercore.server.canonical import EmbedRequest
from infercore.server.engine import SEARCH_LANE_MAX_TOKENS
from infercore.server.executor import BULK_NICENESS
from infercore.server.scheduler import LANES, TokenBudgetScheduler
from tests.engine_harness import (
    RunnerSpy,
    async_wait_for,
    batch_names,
    is_main_executor,
    is_search_executor,
    make_engine,
    sample,
    scrape,
    text_of_tokens,
    token_ids,
    wait_for,
    work_items,
)


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


# ---- TokenBudgetScheduler ----------------------------------------------------------------------


def test_search_items_are_batched_before_ingest_and_batch_items_that_arrived_earlier(loop):
    scheduler = TokenBudgetScheduler(max_batch_tokens=100)
    scheduler.submit(work_items(loop, [5, 5], "batch", "b"))
    scheduler.submit(work_items(loop, [5, 5], "ingest", "i"))
    scheduler.submit(work_items(loop, [5, 5], "search", "s"))
    assert batch_names(scheduler.next_batch(timeout_s=0.01)) == ["s0", "s1", "i0", "i1", "b0", "b1"]


def test_a_batch_full_of_search_items_leaves_ingest_items_queued(loop):
    scheduler = TokenBudgetScheduler(max_batch_tokens=10)
    scheduler.submit(work_items(loop, [1], "ingest", "i"))
    scheduler.submit(work_items(loop, [5, 5, 5], "search", "s"))
    assert batch_names(scheduler.next_batch(timeout_s=0.01)) == ["s0", "s1"]
    assert batch_names(scheduler.next_batch(timeout_s=0.01)) == ["s2", "i0"]
    assert scheduler.queued_items == 0


def test_a_batch_is_topped_up_from_lower_lanes_within_the_token_budget(loop):
    scheduler = TokenBudgetScheduler(max_batch_tokens=10)
    scheduler.submit(work_items(loop, [3, 2, 5], "ingest", "i"))
    scheduler.submit(work_items(loop, [1], "batch", "b"))
    scheduler.submit(work_items(loop, [4], "search", "s"))
    first = scheduler.next_batch(timeout_s=0.01)
    assert batch_names(first) == ["s0", "i0", "i1"]  # 4 + 3 + 2 = 9; i2 (5) would exceed 10
    assert sum(item.num_tokens for item in first) <= 10
    assert batch_names(scheduler.next_batch(timeout_s=0.01)) == ["i2", "b0"]


def test_top_up_across_lanes_respects_max_batch_requests(loop):
    scheduler = TokenBudgetScheduler(max_batch_tokens=1000, max_batch_requests=3)
    scheduler.submit(work_items(loop, [1, 1], "ingest", "i"))
    scheduler.submit(work_items(loop, [1], "batch", "b"))
    scheduler.submit(work_items(loop, [1, 1], "search", "s"))
    assert batch_names(scheduler.next_batch(timeout_s=0.01)) == ["s0", "s1", "i0"]
    assert batch_names(scheduler.next_batch(timeout_s=0.01)) == ["i1", "b0"]


def test_the_search_executor_takes_only_search_work(loop):
    scheduler = TokenBudgetScheduler(max_batch_tokens=100)
    scheduler.submit(work_items(loop, [3, 3], "ingest", "i"))
    scheduler.submit(work_items(loop, [3], "batch", "b"))

    assert scheduler.next_batch(("search",), timeout_s=0.01) == []
    assert scheduler.queued_items == 3  # the ingest and batch work is still there for the main executors

    scheduler.submit(work_items(loop, [2, 2], "search", "s"))
    assert batch_names(scheduler.next_batch(("search",), timeout_s=0.01)) == ["s0", "s1"]
    assert batch_names(scheduler.next_batch(timeout_s=0.01)) == ["i0", "i1", "b0"]


def test_lane_depths_count_items_and_tokens_per_lane(loop):
    scheduler = TokenBudgetScheduler(max_batch_tokens=100)
    scheduler.submit(work_items(loop, [3, 4], "ingest"))
    scheduler.submit(work_items(loop, [7], "batch"))
    assert scheduler.lane_depths() == {"search": (0, 0), "ingest": (2, 7), "batch": (1, 7)}


# ---- the lane a request gets --------------------------------------------------------------------


class SubmitSpy:
    """Records the lane of every item the engine queues for one model."""

    def __init__(self, engine, model_id: str):
        self.scheduler = engine.models[model_id].scheduler
        self.original = self.scheduler.submit
        self.lanes: list[list[str]] = []

    def __call__(self, items):
        self.lanes.append([item.lane for item in items])
        return self.original(items)

    def __enter__(self) -> SubmitSpy:
        self.scheduler.submit = self
        return self

    def __exit__(self, *exc) -> None:
        del self.scheduler.submit


def embed_and_record_lane(engine, request: EmbedRequest) -> tuple[str, list[str]]:
    """(the lane the result reports, the lanes its inputs were queued in)"""
    with SubmitSpy(engine, "tiny") as spy:
        result = asyncio.run(engine.embed(request))
    assert len(spy.lanes) == 1
    return result.lane, spy.lanes[0]


def test_one_input_of_at_most_64_tokens_goes_to_the_search_lane_by_default(tiny_engine):
    for n in (3, SEARCH_LANE_MAX_TOKENS):
        text = text_of_tokens(tiny_engine, "tiny", n)
        assert embed_and_record_lane(tiny_engine, EmbedRequest([text])) == ("search", ["search"]), n


def test_one_input_over_64_tokens_goes_to_the_ingest_lane_by_default(tiny_engine):
    text = text_of_tokens(tiny_engine, "tiny", SEARCH_LANE_MAX_TOKENS + 1)
    assert embed_and_record_lane(tiny_engine, EmbedRequest([text])) == ("ingest", ["ingest"])


def test_several_short_inputs_go_to_the_ingest_lane_by_default(tiny_engine):
    lane, queued = embed_and_record_lane(tiny_engine, EmbedRequest(["red", "green"]))
    assert (lane, queued) == ("ingest", ["ingest", "ingest"])


@pytest.mark.parametrize(
    ("inputs", "priority"),
    [(["red"], "ingest"), (["red"], "batch"), (["red", "green", "blue"], "search"),
     ([" ".join(["word"] * 100)], "search"), (["red", "green"], "batch")],
    ids=["short_as_ingest", "short_as_batch", "several_as_search", "long_as_search", "several_as_batch"],
)
def test_an_explicit_priority_overrides_the_default_lane(tiny_engine, inputs, priority):
    lane, queued = embed_and_record_lane(tiny_engine, EmbedRequest(inputs, priority=priority))
    assert lane == priority
    assert queued == [priority] * len(inputs)


@pytest.mark.parametrize(
    ("path", "body", "headers", "lane"),
    [
        ("/embed", {"inputs": "red"}, {}, "search"),
        ("/embed", {"inputs": ["red", "green"]}, {}, "ingest"),
        ("/embed", {"inputs": "red", "priority": "batch"}, {}, "batch"),
        ("/embed", {"inputs": ["red", "green"], "priority": "search"}, {}, "search"),
        ("/embed", {"inputs": "red"}, {"X-Priority": "ingest"}, "ingest"),
        ("/embed", {"inputs": "red"}, {"X-Priority": "Batch"}, "batch"),
        ("/embed", {"inputs": "red", "priority": "search"}, {"X-Priority": "batch"}, "search"),
        ("/v1/embeddings", {"input": "red"}, {}, "search"),
        ("/v1/embeddings", {"input": ["red", "green"]}, {}, "ingest"),
        ("/v1/embeddings", {"input": "red"}, {"X-Priority": "batch"}, "batch"),
        ("/v1/embeddings", {"input": ["red", "green"]}, {"X-Priority": "search"}, "search"),
    ],
    ids=[
        "native_default_search", "native_default_ingest", "native_field", "native_field_many_as_search",
        "native_header", "native_header_any_case", "native_field_wins_over_header", "openai_default_search",
        "openai_default_ingest", "openai_header", "openai_header_many_as_search",
    ],
)
def test_the_lane_is_chosen_by_field_header_or_size_and_reported_in_x_lane(
    tiny_engine, tiny_server, path, body, headers, lane
):
    with SubmitSpy(tiny_engine, "tiny") as spy:
        response = tiny_server.post(path, json=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["x-lane"] == lane
    assert [set(lanes) for lanes in spy.lanes] == [{lane}]


@pytest.mark.parametrize(
    ("path", "body", "headers"),
    [
        ("/embed", {"inputs": "red", "priority": "urgent"}, {}),
        ("/embed", {"inputs": "red", "priority": "SEARCH!"}, {}),
        ("/embed", {"inputs": "red"}, {"X-Priority": "urgent"}),
        ("/v1/embeddings", {"input": "red"}, {"X-Priority": "urgent"}),
        ("/v1/embeddings", {"input": "red"}, {"X-Priority": "realtime"}),
    ],
    ids=["native_field", "native_field_garbage", "native_header", "openai_header", "openai_header_other"],
)
def test_an_unknown_priority_gets_422_naming_the_lanes_in_the_dialects_error_shape(
    tiny_engine, tiny_server, path, body, headers
):
    with SubmitSpy(tiny_engine, "tiny") as spy:
        response = tiny_server.post(path, json=body, headers=headers)
    assert response.status_code == 422, response.text
    payload = response.json()
    if path == "/embed":
        assert set(payload) == {"error", "error_type"}
        assert payload["error_type"] == "Validation"
        message = payload["error"]
    else:
        assert set(payload) == {"error"}
        assert payload["error"]["type"] == "invalid_request_error"
        message = payload["error"]["message"]
    assert "priority" in message
    for lane in LANES:
        assert lane in message
    assert spy.lanes == []  # refused before anything was queued


def test_a_non_string_priority_field_gets_422(tiny_server):
    response = tiny_server.post("/embed", json={"inputs": "red", "priority": 1})
    assert response.status_code == 422, response.text
    assert "priority" in response.json()["error"]


def test_queue_duration_metric_is_labelled_with_the_lane(tiny_engine, tiny_server):
    name = "infercore_queue_duration_seconds_count"
    before = {lane: sample(tiny_engine, name, model="tiny", lane=lane) for lane in LANES}
    for priority in LANES:
        response = tiny_server.post("/embed", json={"inputs": "red", "priority": priority})
        assert response.status_code == 200
    response = tiny_server.post("/embed", json={"inputs": "red"})
    assert response.headers["x-lane"] == "search"
    after = {lane: sample(tiny_engine, name, model="tiny", lane=lane) for lane in LANES}
    assert {lane: after[lane] - before[lane] for lane in LANES} == {"search": 2, "ingest": 1, "batch": 1}

    exposed = scrape(tiny_server, name)
    for lane in LANES:
        assert exposed[frozenset({"model": "tiny", "lane": lane}.items())] == after[lane]


def test_queue_gauges_show_waiting_items_and_tokens_per_lane(tiny_engine, tiny_server):
    """While the executors are held, /metrics reports what waits in each lane; afterwards zero."""
    ingest_texts = [text_of_tokens(tiny_engine, "tiny", n) for n in (10, 12, 14)]
    batch_text = text_of_tokens(tiny_engine, "tiny", 9)

    def gauges() -> dict[tuple[str, str], float]:
        values = {}
        for name in ("infercore_queue_items", "infercore_queue_tokens"):
            for labels, value in scrape(tiny_server, name).items():
                labels = dict(labels)
                if labels["model"] == "tiny":
                    values[(name.removeprefix("infercore_queue_"), labels["lane"])] = value
        return values

    scheduler = tiny_engine.models["tiny"].scheduler
    with ThreadPoolExecutor(8) as pool, RunnerSpy(tiny_engine, "tiny", holds=lambda name: True) as spy:
        # the main executor takes the ingest request, then the search executor the search one
        held = [pool.submit(tiny_server.post, "/embed", json={"inputs": "hold", "priority": "ingest"})]
        wait_for(lambda: spy.held == 1, "main executor held")
        held.append(pool.submit(tiny_server.post, "/embed", json={"inputs": "hold", "priority": "search"}))
        wait_for(lambda: spy.held == 2, "search executor held")
        queued = [
            pool.submit(tiny_server.post, "/embed", json={"inputs": ingest_texts}),
            pool.submit(tiny_server.post, "/embed", json={"inputs": batch_text, "priority": "batch"}),
        ]
        wait_for(lambda: scheduler.queued_items == 4, "four inputs queued")
        during = gauges()
        spy.release.set()
        responses = [f.result(timeout=60) for f in held + queued]
    assert [r.status_code for r in responses] == [200] * 4
    assert during == {
        ("items", "search"): 0, ("tokens", "search"): 0,
        ("items", "ingest"): 3, ("tokens", "ingest"): 36,
        ("items", "batch"): 1, ("tokens", "batch"): 9,
    }
    assert set(gauges().values()) == {0}


# ---- search is never starved by ingest -------------------------------------------------------------


def test_a_search_request_completes_while_a_flood_of_ingest_work_holds_the_main_executors(tiny_bert_dir):
    """Both main executors are held inside ingest batches and the ingest lane is deep: a search
    query is still answered, by the search executor, while all of that ingest work waits."""
    engine = make_engine("tiny", tiny_bert_dir, cpu_workers=2, max_batch_requests=4)
    scheduler = engine.models["tiny"].scheduler
    ingest_text = text_of_tokens(engine, "tiny", 100)
    query = "where is the lighthouse"
    ingest_requests, inputs_per_request = 6, 8
    total_inputs = ingest_requests * inputs_per_request

    async def scenario():
        with RunnerSpy(engine, "tiny", holds=is_main_executor) as spy:
            ingest = [
                asyncio.ensure_future(engine.embed(EmbedRequest([ingest_text] * inputs_per_request)))
                for _ in range(ingest_requests)
            ]
            await async_wait_for(lambda: spy.held == 2, "both main executors held")
            await async_wait_for(lambda: scheduler.queued_items == total_inputs - 2 * 4, "ingest queue filled")

            search = await asyncio.wait_for(engine.embed(EmbedRequest([query])), timeout=30)

            ingest_queue_after_search = scheduler.lane_depths()["ingest"][0]
            held_after_search = spy.held
            ingest_done_after_search = sum(task.done() for task in ingest)
            spy.release.set()
            ingest_results = await asyncio.gather(*ingest)
            return (search, ingest_queue_after_search, held_after_search, ingest_done_after_search,
                    ingest_results, spy)

    try:
        search, ingest_queued, held, ingest_done, ingest_results, spy = asyncio.run(scenario())
        assert search.lane == "search"
        assert len(search.vectors) == 1
        assert ingest_queued == total_inputs - 8  # nothing of the ingest flood moved meanwhile
        assert held == 2  # the held ingest batches had not finished: search did not wait for them
        assert ingest_done == 0
        search_batches = spy.batches_of(is_search_executor)
        assert [batch.inputs for batch in search_batches] == [(token_ids(engine, "tiny", query),)]
        assert all(len(result.vectors) == inputs_per_request for result in ingest_results)
        # the search executor took none of the ingest work, the main executors did it all
        main_inputs = sum(len(batch.inputs) for batch in spy.batches_of(is_main_executor))
        assert main_inputs == total_inputs
    finally:
        engine.shutdown()


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="thread niceness is a POSIX facility")
def test_on_cpu_the_main_executors_run_below_the_search_executor_and_the_event_loop(tiny_bert_dir):
    """Two cores shared by bulk batches and a query: the kernel scheduler must favour the query's
    thread (and the event loop), or search latency under ingest load triples."""
    engine = make_engine("tiny", tiny_bert_dir, cpu_workers=2)
    try:
        executors = engine.models["tiny"].executors
        ours = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        def niceness(executor) -> int:
            return os.getpriority(os.PRIO_PROCESS, executor._thread.native_id)

        main = [e for e in executors if e.lanes != ("search",)]
        search = [e for e in executors if e.lanes == ("search",)]
        assert len(main) == 2 and len(search) == 1
        expected = min(ours + BULK_NICENESS, 19)
        wait_for(lambda: all(niceness(e) == expected for e in main), "main executors lowered their priority")
        assert niceness(search[0]) == ours
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == ours  # this thread untouched
    finally:
        engine.shutdown()


def test_on_cpu_one_request_is_shared_among_the_idle_executors(tiny_bert_dir):
    """Data-parallel CPU executors: 16 inputs arriving at an idle server become two batches of 8,
    one per core, not one batch of 16 on one core while the other idles."""
    engine = make_engine("tiny", tiny_bert_dir, cpu_workers=2)
    text = text_of_tokens(engine, "tiny", 30)
    try:
        with RunnerSpy(engine, "tiny") as spy:
            wait_for(lambda: engine.models["tiny"].scheduler._idle.get(LANES) == 2, "both main executors idle")
            result = asyncio.run(engine.embed(EmbedRequest([text] * 16, priority="ingest")))
        assert len(result.vectors) == 16
        main = spy.batches_of(is_main_executor)
        assert sorted(len(batch.inputs) for batch in main) == [8, 8]
        assert len({batch.executor for batch in main}) == 2
    finally:
        engine.shutdown()


def test_work_arriving_while_an_executor_is_busy_is_shared_with_it_not_taken_whole(loop):
    """Two executors: one still runs a batch of 400 tokens when a request of 8 x 100 arrives. The
    idle one takes an even share of all 1,200 tokens (6 inputs), not all 8: the busy one takes the
    rest when it is done, instead of idling while the first runs 8 inputs on one core."""
    scheduler = TokenBudgetScheduler(max_batch_tokens=10_000, spread=True)
    other = threading.Thread(target=lambda: scheduler.next_batch(LANES))
    scheduler.submit(work_items(loop, [400]))
    other.start()
    other.join()  # the other executor took a batch and is running it
    scheduler.submit(work_items(loop, [100] * 8))
    assert len(scheduler.next_batch(LANES)) == 6
    # Done with its share while the other is still busy: an even share of the 200 queued and 400
    # running tokens is more than what is left: it takes the rest in one batch (no halving tail).
    assert len(scheduler.next_batch(LANES)) == 2
    # Without spreading (CUDA: one executor per device) a batch takes what the budget allows.
    whole = TokenBudgetScheduler(max_batch_tokens=10_000)
    whole.submit(work_items(loop, [100] * 8))
    assert len(whole.next_batch(LANES)) == 8


def test_a_batch_that_leaves_nothing_queued_may_borrow_the_idle_executors(loop):
    scheduler = TokenBudgetScheduler(max_batch_tokens=1000, spread=True)
    scheduler._idle[LANES] = 1  # one other main executor waits
    scheduler.submit(work_items(loop, [300]))  # one long input: cannot be split
    assert len(scheduler.next_batch(LANES)) == 1
    assert scheduler.borrow_idle(LANES, most=1) == 1
    assert scheduler.borrow_idle(LANES, most=1) == 0  # lent already
    scheduler.give_back(LANES, 1)
    scheduler.submit(work_items(loop, [300, 300]))  # queued work left: the idle executor will take it
    scheduler.next_batch(LANES, timeout_s=0)
    assert scheduler.borrow_idle(LANES, most=1) == 0
    assert TokenBudgetScheduler(max_batch_tokens=1000).borrow_idle(LANES, most=1) == 0  # no spreading (CUDA)


def test_a_lent_executor_takes_no_work_until_the_borrowing_batch_gives_it_back(loop):
    """The borrowed cores run the borrowing batch's threads: work arriving meanwhile waits for it
    instead of running beside it on the same cores."""
    scheduler = TokenBudgetScheduler(max_batch_tokens=1000, spread=True)
    scheduler._idle[LANES] = 1  # the executor that will be lent, waiting in next_batch
    scheduler.submit(work_items(loop, [300]))
    assert len(scheduler.next_batch(LANES)) == 1
    assert scheduler.borrow_idle(LANES, most=1) == 1
    scheduler.submit(work_items(loop, [100, 100]))
    scheduler._idle[LANES] = 0  # the lent one is now the caller
    assert scheduler.next_batch(LANES, timeout_s=0.05) == []  # lent: nothing taken
    scheduler.give_back(LANES, 1)
    assert [item.num_tokens for item in scheduler.next_batch(LANES, timeout_s=0.05)] == [100, 100]


def test_on_cpu_a_lone_input_runs_with_the_idle_executors_threads_too(tiny_bert_dir):
    """One input that cannot be split: the main executor that takes it runs it with both cores'
    threads while the other main executor idles; with work for both, each runs on its own core."""
    import torch

    engine = make_engine("tiny", tiny_bert_dir, cpu_workers=2, cpu_threads=1)
    seen: list[int] = []
    try:
        with RunnerSpy(engine, "tiny", fault=lambda batch, options: seen.append(torch.get_num_threads())) as spy:
            wait_for(lambda: engine.models["tiny"].scheduler._idle.get(LANES) == 2, "both main executors idle")
            asyncio.run(engine.embed(EmbedRequest([text_of_tokens(engine, "tiny", 100)], priority="ingest")))
            assert len(spy.batches_of(is_main_executor)) == 1
        assert seen == [min(2, os.cpu_count() or 1)]
    finally:
        engine.shutdown()


def test_on_cpu_a_query_takes_only_the_cores_no_main_executor_computes_on(tiny_bert_dir):
    """The search executor runs beside the main ones: a query on an idle server runs on every core,
    one next to two busy main executors on one thread, not on threads that land on their cores
    (a spinning ONNX Runtime session there took the cores from the main executors and the HTTP
    side, and concurrent int8 queries lost throughput and tail latency)."""
    import torch

    engine = make_engine("tiny", tiny_bert_dir, cpu_workers=2, cpu_threads=1)
    seen: list[tuple[str, int]] = []
    ingest_text = text_of_tokens(engine, "tiny", 100)

    def record(batch, options):
        seen.append((threading.current_thread().name, torch.get_num_threads()))

    async def busy_then_query():
        with RunnerSpy(engine, "tiny", holds=is_main_executor, fault=record) as spy:
            # Two inputs in one request: one to each main executor (an even share), none borrowing.
            ingest = asyncio.ensure_future(engine.embed(EmbedRequest([ingest_text] * 2)))
            await async_wait_for(lambda: spy.held == 2, "both main executors held")
            query = await asyncio.wait_for(engine.embed(EmbedRequest(["where is the lighthouse"])), timeout=30)
            spy.release.set()
            await ingest
            return query

    try:
        wait_for(lambda: engine.models["tiny"].scheduler._idle.get(LANES) == 2, "both main executors idle")
        with RunnerSpy(engine, "tiny", fault=record):
            asyncio.run(engine.embed(EmbedRequest(["where is the lighthouse"])))
        assert [threads for _, threads in seen] == [os.cpu_count() or 1]  # whichever executor took it
        seen.clear()
        wait_for(lambda: engine.models["tiny"].scheduler._idle.get(LANES) == 2, "both main executors idle")
        assert asyncio.run(busy_then_query()).lane == "search"
        assert [threads for name, threads in seen if is_search_executor(name)] == [1]
    finally:
        engine.shutdown()


def test_padded_backends_count_padded_tokens_against_the_budget(loop):
    packed = TokenBudgetScheduler(max_batch_tokens=400)
    padded = TokenBudgetScheduler(max_batch_tokens=400, padded=True)
    for scheduler in (packed, padded):
        scheduler.submit(work_items(loop, [10, 10, 10, 150, 10]))
    assert [i.num_tokens for i in packed.next_batch(LANES)] == [10, 10, 10, 150, 10]  # 190 real tokens
    # padded: 4 inputs at 150 tokens = 600 > 400, so the long input waits for the next batch
    assert [i.num_tokens for i in padded.next_batch(LANES)] == [10, 10, 10]
    assert [i.num_tokens for i in padded.next_batch(LANES)] == [150, 10]


def test_a_padded_backend_spreads_by_real_tokens_within_the_padded_budget(loop):
    scheduler = TokenBudgetScheduler(max_batch_tokens=4096, spread=True, padded=True)
    scheduler._idle[LANES] = 1  # one other executor waits: 1,200 queued tokens, a share of 600 each
    scheduler.submit(work_items(loop, [100, 300, 120, 280, 110, 290]))
    # 520 real tokens (900 padded): counted padded against the share, only [100, 300] would go, and
    # the other executor would get 800 of the 1,200 tokens.
    assert [item.num_tokens for item in scheduler.next_batch(LANES)] == [100, 300, 120]
    scheduler._idle[LANES] = 0
    assert [item.num_tokens for item in scheduler.next_batch(LANES)] == [280, 110, 290]
    # The padded budget still caps a batch: 1,700 real tokens, but 4 inputs padded to 1,100 are 4,400.
    scheduler.submit(work_items(loop, [200, 200, 200, 1100]))
    assert [item.num_tokens for item in scheduler.next_batch(LANES)] == [200, 200, 200]
    assert [item.num_tokens for item in scheduler.next_batch(LANES)] == [1100]


def test_spreading_never_splits_below_one_input_and_stays_within_the_budget(loop):
    scheduler = TokenBudgetScheduler(max_batch_tokens=100, spread=True)
    scheduler._idle[LANES] = 4  # four other executors of the same lanes are waiting
    scheduler.submit(work_items(loop, [70, 70]))  # a share of 28 tokens each: still one whole input
    assert [item.num_tokens for item in scheduler.next_batch(LANES)] == [70]
    scheduler.next_batch(LANES)
    scheduler._idle[LANES] = 1
    scheduler.submit(work_items(loop, [30] * 10))  # a share of 150 for two: capped by the budget
    assert [item.num_tokens for item in scheduler.next_batch(LANES)] == [30, 30, 30]
    scheduler._idle[LANES] = 2
    scheduler.submit(work_items(loop, [10] * 3))  # 7 x 30 + 3 x 10 = 240 queued, 3 idle: 80 each
    # 90 tokens is nearer the share of 80 than 60 is; still within the budget of 100
    assert [item.num_tokens for item in scheduler.next_batch(LANES)] == [30, 30, 30]
