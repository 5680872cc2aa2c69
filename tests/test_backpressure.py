"""Backpressure: beyond the queued-token bound or the concurrent-request bound a request gets 429 with
a Retry-After (whole seconds, at least 1) in its dialect's error shape, and is served normally once
the queue drains. The Retry-After estimate (queued tokens over the measured drain rate) is checked on
the scheduler directly, and end to end with a drain rate the test sets.

The HTTP tests run an in-process server whose engine is configured from ``infercore serve`` flags;
the executors are held inside the model call so the queue is exactly as full as the test makes it."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from infercore.server.cli import build_parser, config_from_args
from infercore.server.engine import Engine
from infercore.server.errors import Overloaded, PayloadTooLarge
from infercore.server.scheduler import TokenBudgetScheduler
from tests.engine_harness import (
    InProcessServer,
    RunnerSpy,
    is_main_executor,
    sample,
    scrape,
    text_of_tokens,
    wait_for,
    work_items,
)

REJECTED = "infercore_rejected_requests_total"
MAX_QUEUED_TOKENS = 100
MAX_CONCURRENT_REQUESTS = 3


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


# ---- TokenBudgetScheduler: admission and the Retry-After estimate -------------------------------


def refusal(scheduler: TokenBudgetScheduler, loop, tokens: int) -> Overloaded:
    with pytest.raises(Overloaded) as info:
        scheduler.submit(work_items(loop, [tokens]))
    return info.value


def test_a_submission_beyond_max_queued_tokens_is_refused_whole(loop):
    scheduler = TokenBudgetScheduler(max_batch_tokens=100, max_queued_tokens=50)
    scheduler.submit(work_items(loop, [30]))
    with pytest.raises(Overloaded) as info:
        scheduler.submit(work_items(loop, [10, 5, 6]))  # 30 + 21 > 50: none of the three is queued
    assert info.value.status == 429
    assert "30" in info.value.message and "50" in info.value.message
    assert scheduler.queued_items == 1 and scheduler.queued_tokens == 30
    scheduler.submit(work_items(loop, [10, 10]))  # exactly at the limit is fine
    assert scheduler.queued_tokens == 50


def test_a_submission_larger_than_the_whole_queue_gets_413_naming_the_bound_under_any_load(loop):
    # Admitted only into an empty queue, it would starve behind steady competing load while its
    # client obeyed Retry-After; a 413 naming the bound tells the client to split it instead.
    scheduler = TokenBudgetScheduler(max_batch_tokens=100, max_queued_tokens=50)
    for queued in ([], [30], [10, 10, 10, 10, 10]):  # an empty, a busy and a full queue
        for tokens in queued:
            scheduler.submit(work_items(loop, [tokens]))
        with pytest.raises(PayloadTooLarge) as info:
            scheduler.submit(work_items(loop, [40, 11]))
        assert info.value.status == 413
        assert "51" in info.value.message and "50" in info.value.message and "--max-queued-tokens" in info.value.message
        assert scheduler.queued_tokens == sum(queued)
        while scheduler.next_batch(timeout_s=0):
            pass
    scheduler.submit(work_items(loop, [40, 10]))  # exactly the bound: admitted into the empty queue
    assert scheduler.queued_tokens == 50


def test_retry_after_is_the_queued_tokens_over_the_measured_drain_rate(loop):
    scheduler = TokenBudgetScheduler(max_batch_tokens=1000, max_queued_tokens=10_000)
    scheduler.record_drain(500, 1.0)  # 500 tokens per second
    scheduler.submit(work_items(loop, [2000]))
    assert refusal(scheduler, loop, 9000).retry_after_s == pytest.approx(4.0)
    scheduler.submit(work_items(loop, [6000]))
    assert refusal(scheduler, loop, 9000).retry_after_s == pytest.approx(16.0)


def test_retry_after_grows_as_the_drain_rate_falls(loop):
    scheduler = TokenBudgetScheduler(max_batch_tokens=1000, max_queued_tokens=1000)
    scheduler.submit(work_items(loop, [1000]))
    scheduler.record_drain(1000, 1.0)
    fast = refusal(scheduler, loop, 1).retry_after_s
    estimates = []
    for _ in range(5):
        scheduler.record_drain(100, 1.0)  # the model slowed down: batches drain 100 tokens/s
        estimates.append(refusal(scheduler, loop, 1).retry_after_s)
    assert fast == pytest.approx(1.0)
    assert estimates == sorted(estimates) and estimates[-1] > estimates[0] > fast
    assert estimates[-1] < 10.0  # a moving average, not the last batch alone
    for _ in range(200):
        scheduler.record_drain(100, 1.0)
    assert refusal(scheduler, loop, 1).retry_after_s == pytest.approx(10.0, rel=1e-3)


def test_the_drain_rate_is_a_moving_average_between_old_and_new_measurements():
    scheduler = TokenBudgetScheduler(max_batch_tokens=10)
    assert scheduler.drain_tokens_per_s is None
    scheduler.record_drain(1000, 1.0)
    assert scheduler.drain_tokens_per_s == pytest.approx(1000.0)
    scheduler.record_drain(4000, 1.0)
    assert 1000.0 < scheduler.drain_tokens_per_s < 4000.0
    rate = scheduler.drain_tokens_per_s
    scheduler.record_drain(10, 0.0)  # a batch with no measurable duration carries no information
    scheduler.record_drain(10, -1.0)
    assert scheduler.drain_tokens_per_s == rate


def test_executors_running_in_parallel_add_up_to_the_drain_rate(loop):
    # Two CPU executors each drain 500 tokens/s: the queue empties at 1000 tokens/s, not 500.
    scheduler = TokenBudgetScheduler(max_batch_tokens=1000, max_queued_tokens=10_000)
    scheduler.record_drain(500, 1.0, "main0")
    scheduler.record_drain(500, 1.0, "main1")
    assert scheduler.drain_tokens_per_s == pytest.approx(1000.0)
    scheduler.submit(work_items(loop, [8000]))
    assert refusal(scheduler, loop, 9000).retry_after_s == pytest.approx(8.0)


def test_retry_after_is_bounded_between_1_and_60_seconds(loop):
    unmeasured = TokenBudgetScheduler(max_batch_tokens=10, max_queued_tokens=10)
    unmeasured.submit(work_items(loop, [10]))
    assert refusal(unmeasured, loop, 1).retry_after_s == 1.0  # nothing measured yet

    fast = TokenBudgetScheduler(max_batch_tokens=10, max_queued_tokens=10)
    fast.record_drain(1_000_000, 1.0)
    fast.submit(work_items(loop, [10]))
    assert refusal(fast, loop, 1).retry_after_s == 1.0

    slow = TokenBudgetScheduler(max_batch_tokens=10, max_queued_tokens=1_000_000)
    slow.record_drain(1, 1.0)
    slow.submit(work_items(loop, [1_000_000]))
    assert refusal(slow, loop, 1).retry_after_s == 60.0


def test_scheduling_flags_of_infercore_serve_reach_the_server_config(tiny_bert_dir):
    args = build_parser().parse_args([
        "serve", "--model", f"tiny={tiny_bert_dir}", "--max-queued-tokens", "777", "--max-concurrent-requests", "9",
        "--max-batch-tokens", "2048", "--max-batch-requests", "5", "--cpu-workers", "3", "--cpu-threads", "2",
        "--request-timeout", "2.5", "--drain-timeout", "7",
    ])
    config = config_from_args(args)
    assert (config.max_queued_tokens, config.max_concurrent_requests) == (777, 9)
    assert (config.max_batch_tokens, config.max_batch_requests) == (2048, 5)
    assert (config.main_executors("cpu"), config.cpu_threads) == (3, 2)
    assert (config.request_timeout_s, config.drain_timeout_s) == (2.5, 7.0)


@pytest.mark.parametrize("flag", ["--max-queued-tokens", "--max-concurrent-requests"])
@pytest.mark.parametrize("value", ["0", "-5"])
def test_a_non_positive_admission_bound_is_refused_on_the_command_line(flag, value, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", flag, value])
    assert info.value.code == 2
    assert flag in capsys.readouterr().err


# ---- over HTTP -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_bert_dir):
    args = build_parser().parse_args([
        "serve", "--model", f"tiny={tiny_bert_dir}", "--cpu-workers", "1", "--tokenization-workers", "1",
        "--max-queued-tokens", str(MAX_QUEUED_TOKENS), "--max-concurrent-requests", str(MAX_CONCURRENT_REQUESTS),
    ])
    engine = Engine(config_from_args(args))
    engine.load()
    assert engine.models["tiny"].scheduler.max_queued_tokens == MAX_QUEUED_TOKENS
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    server = InProcessServer(engine).start()
    yield server
    server.stop()


def embed(server, texts: list[str], dialect: str = "native"):
    if dialect == "native":
        return server.post("/embed", json={"inputs": texts, "priority": "ingest"})
    return server.post("/v1/embeddings", json={"input": texts}, headers={"X-Priority": "ingest"})


def assert_overloaded(response, dialect: str, *fragments: str) -> int:
    """429 in the dialect's error shape with a Retry-After of whole seconds >= 1; returns it."""
    assert response.status_code == 429, response.text
    retry_after = response.headers.get("retry-after")
    assert retry_after is not None and retry_after.isdigit(), dict(response.headers)
    assert int(retry_after) >= 1
    body = response.json()
    if dialect == "native":
        assert set(body) == {"error", "error_type"}
        assert body["error_type"] == "Overloaded"
        message = body["error"]
    else:
        assert set(body) == {"error"}
        assert body["error"]["type"] == "rate_limit_error"
        assert body["error"]["code"] == "rate_limit_exceeded"
        message = body["error"]["message"]
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return int(retry_after)


class HeldServer:
    """The main executor held inside a one-input batch; ``queue`` more ingest work behind it."""

    def __init__(self, engine, server):
        self.engine = engine
        self.server = server
        self.scheduler = engine.models["tiny"].scheduler
        self.spy = RunnerSpy(engine, "tiny", holds=is_main_executor)
        self.pool = ThreadPoolExecutor(8)
        self.pending = []

    def __enter__(self) -> HeldServer:
        self.spy.__enter__()
        self.pending.append(self.pool.submit(embed, self.server, ["hold"]))
        wait_for(lambda: self.spy.held == 1, "main executor held")
        return self

    def queue(self, texts: list[str]) -> None:
        tokens_before = self.scheduler.queued_tokens
        admitted_before = self.engine.admitted
        self.pending.append(self.pool.submit(embed, self.server, texts))
        wait_for(lambda: self.engine.admitted == admitted_before + 1 and self.scheduler.queued_tokens > tokens_before,
                 "request queued")

    def release(self) -> list:
        """Let everything run; the statuses of the held and queued requests."""
        self.spy.release.set()
        return [future.result(timeout=60).status_code for future in self.pending]

    def __exit__(self, *exc) -> None:
        self.spy.__exit__(*exc)
        self.pool.shutdown(wait=True)


@pytest.mark.parametrize("dialect", ["native", "openai"])
def test_a_full_queue_gets_429_with_retry_after_then_the_request_succeeds_once_it_drains(engine, server, dialect):
    forty = text_of_tokens(engine, "tiny", 40)
    before = sample(engine, REJECTED, reason="queue_full")
    with HeldServer(engine, server) as held:
        held.queue([forty, forty])  # 80 of 100 tokens waiting
        assert held.scheduler.queued_tokens == 80
        refused = embed(server, [forty], dialect)
        assert held.scheduler.queued_tokens == 80  # nothing of the refused request was queued
        statuses = held.release()
    assert_overloaded(refused, dialect, "queue", str(MAX_QUEUED_TOKENS))
    assert statuses == [200, 200]
    assert sample(engine, REJECTED, reason="queue_full") - before == 1
    retried = embed(server, [forty], dialect)
    assert retried.status_code == 200, retried.text


@pytest.mark.parametrize("dialect", ["native", "openai"])
def test_a_request_larger_than_the_whole_queue_gets_413_naming_the_bound_under_steady_load(engine, server, dialect):
    # Before, it was admitted only into an empty queue: under steady competing load it got 429 with a
    # Retry-After every time and starved. Now it is told at once, idle or busy, to split itself.
    long_input = text_of_tokens(engine, "tiny", 70)  # two of them: 140 tokens, more than the bound of 100
    forty = text_of_tokens(engine, "tiny", 40)
    idle = embed(server, [long_input, long_input], dialect)
    with HeldServer(engine, server) as held:
        held.queue([forty])  # competing work waits in the queue
        busy = [embed(server, [long_input, long_input], dialect) for _ in range(3)]
        assert held.scheduler.queued_tokens == 40
        statuses = held.release()
    assert statuses == [200, 200]
    for response in (idle, *busy):
        assert response.status_code == 413, response.text
        assert "retry-after" not in response.headers
        message = response.json()["error"] if dialect == "native" else response.json()["error"]["message"]
        assert "140" in message and str(MAX_QUEUED_TOKENS) in message and "--max-queued-tokens" in message
    halves = [embed(server, [long_input], dialect) for _ in range(2)]  # split: each within the bound
    assert [r.status_code for r in halves] == [200, 200]


def test_an_oversize_request_gets_413_every_time_under_steady_competing_load(engine, server):
    # Real competing traffic this time (bounded: 2 clients x 15 requests), not a held queue; two, so
    # that with the oversize client they stay within MAX_CONCURRENT_REQUESTS (3) and every refusal
    # seen is the queue's.
    long_input = text_of_tokens(engine, "tiny", 70)
    forty = text_of_tokens(engine, "tiny", 40)
    with ThreadPoolExecutor(2) as pool:
        competing = [pool.submit(lambda: [embed(server, [forty]).status_code for _ in range(15)]) for _ in range(2)]
        oversize = []
        while not all(f.done() for f in competing) and len(oversize) < 20:
            oversize.append(embed(server, [long_input, long_input]))
        statuses = [status for f in competing for status in f.result(timeout=120)]
    assert oversize and all(r.status_code == 413 for r in oversize), [r.status_code for r in oversize]
    assert all("--max-queued-tokens" in r.json()["error"] for r in oversize)
    assert set(statuses) <= {200, 429} and 200 in statuses  # the competing load was served meanwhile


def test_retry_after_reflects_the_measured_drain_rate(engine, server):
    forty = text_of_tokens(engine, "tiny", 40)
    with HeldServer(engine, server) as held:
        held.queue([forty, forty])
        main = [e.name for e in engine.models["tiny"].executors if e.lanes != ("search",)]

        def drained_per_second(tokens: int) -> None:
            for _ in range(300):
                for name in main:  # the executors run in parallel: their rates add up
                    held.scheduler.record_drain(tokens / len(main), 1.0, name)

        # As if the last batches had drained 10 tokens per second: 80 queued tokens take 8 s.
        drained_per_second(10)
        slow = embed(server, [forty])
        drained_per_second(40)
        faster = embed(server, [forty])
        held.release()
    assert assert_overloaded(slow, "native") == 8
    assert assert_overloaded(faster, "native") == 2


@pytest.mark.parametrize("dialect", ["native", "openai"])
def test_too_many_concurrent_requests_get_429_with_retry_after(engine, server, dialect):
    before = sample(engine, REJECTED, reason="concurrency")
    with HeldServer(engine, server) as held:
        held.queue(["waiting one"])
        held.queue(["waiting two"])
        assert engine.admitted == MAX_CONCURRENT_REQUESTS
        refused = embed(server, ["one too many"], dialect)
        statuses = held.release()
    assert_overloaded(refused, dialect, str(MAX_CONCURRENT_REQUESTS), "--max-concurrent-requests")
    assert statuses == [200, 200, 200]
    assert sample(engine, REJECTED, reason="concurrency") - before == 1
    wait_for(lambda: engine.admitted == 0, "all requests answered")
    assert embed(server, ["one too many"], dialect).status_code == 200


def test_rejections_are_counted_by_reason_in_the_metrics_exposition(engine, server):
    forty = text_of_tokens(engine, "tiny", 40)
    before = scrape(server, REJECTED)
    with HeldServer(engine, server) as held:
        held.queue([forty, forty])
        assert embed(server, [forty]).status_code == 429
        held.queue(["third"])
        assert embed(server, ["fourth"]).status_code == 429
        held.release()
    after = scrape(server, REJECTED)

    def delta(reason: str) -> float:
        key = frozenset({"reason": reason}.items())
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert (delta("queue_full"), delta("concurrency"), delta("draining")) == (1, 1, 0)
    # the 429 answers are counted per route and status too (no model answered them)
    statuses = scrape(server, "infercore_requests_total")
    assert statuses[frozenset({"route": "/embed", "status": "429", "model": ""}.items())] >= 2
