"""Deadlines and cancellation: work whose deadline passed, or whose client went away, is dropped from
the queue and never reaches the model; the request gets 503 DeadlineExceeded (a timeout) or nothing
(a client that is gone). The executors are held inside the model call (``RunnerSpy``) so that work
waits in the queue for as long as the test needs, whatever the machine's speed."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from infercore.server.canonical import EmbedRequest
from infercore.server.cli import build_parser, config_from_args
from infercore.server.errors import DeadlineExceeded
from infercore.server.scheduler import TokenBudgetScheduler
from tests.engine_harness import (
    InProcessServer,
    RunnerSpy,
    async_wait_for,
    batch_names,
    is_main_executor,
    make_engine,
    sample,
    token_ids,
    wait_for,
    work_items,
)

DROPPED = "infercore_dropped_inputs_total"


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


# ---- TokenBudgetScheduler -------------------------------------------------------------------------


class DropLog:
    def __init__(self):
        self.drops: list[tuple[str, int]] = []

    def __call__(self, reason: str, n: int) -> None:
        self.drops.append((reason, n))


def test_an_item_past_its_deadline_is_dropped_at_batch_formation_and_fails_with_deadline_exceeded(loop):
    drops = DropLog()
    scheduler = TokenBudgetScheduler(max_batch_tokens=100, on_drop=drops)
    live = work_items(loop, [4], tag="live")
    expired = work_items(loop, [5], tag="expired", deadline=time.perf_counter() - 1.0)
    later = work_items(loop, [6], tag="later")
    scheduler.submit(live + expired + later)

    assert batch_names(scheduler.next_batch(timeout_s=0.01)) == ["live0", "later0"]
    assert drops.drops == [("deadline", 1)]
    assert scheduler.queued_items == 0 and scheduler.queued_tokens == 0
    loop.run_until_complete(asyncio.sleep(0))  # the failure is delivered on the item's own loop
    assert isinstance(expired[0].future.exception(), DeadlineExceeded)
    assert not live[0].future.done()


def test_expired_items_of_a_lower_lane_are_dropped_while_topping_up(loop):
    drops = DropLog()
    scheduler = TokenBudgetScheduler(max_batch_tokens=100, on_drop=drops)
    scheduler.submit(work_items(loop, [3], "search", "s"))
    scheduler.submit(work_items(loop, [3, 3], "batch", "b", deadline=time.perf_counter() - 1.0))
    assert batch_names(scheduler.next_batch(timeout_s=0.01)) == ["s0"]
    assert drops.drops == [("deadline", 1), ("deadline", 1)]
    assert scheduler.lane_depths()["batch"] == (0, 0)


def test_an_item_whose_request_was_cancelled_is_dropped_with_reason_cancelled(loop):
    drops = DropLog()
    scheduler = TokenBudgetScheduler(max_batch_tokens=100, on_drop=drops)
    items = work_items(loop, [2, 2, 2])
    items[1].future.cancel()
    scheduler.submit(items)
    assert batch_names(scheduler.next_batch(timeout_s=0.01)) == ["0", "2"]
    assert drops.drops == [("cancelled", 1)]


def test_expired_items_do_not_take_room_in_the_batch(loop):
    scheduler = TokenBudgetScheduler(max_batch_tokens=10, max_batch_requests=2)
    scheduler.submit(work_items(loop, [6], tag="a"))
    scheduler.submit(work_items(loop, [9, 9], tag="old", deadline=time.perf_counter() - 1.0))
    scheduler.submit(work_items(loop, [4], tag="b"))
    assert batch_names(scheduler.next_batch(timeout_s=0.01)) == ["a0", "b0"]


# ---- Engine in-process -------------------------------------------------------------------------------


def run_past_deadline_scenario(engine, late_texts: list[str], timeout_s: float = 0.3):
    """Hold the main executor in a batch, queue ``late_texts`` with a short deadline behind it, and let
    the deadline pass before releasing. Returns (the late request's exception, the spy)."""
    scheduler = engine.models["tiny"].scheduler

    async def scenario():
        with RunnerSpy(engine, "tiny", holds=is_main_executor) as spy:
            holder = asyncio.ensure_future(engine.embed(EmbedRequest(["hold the executor"], priority="ingest")))
            await async_wait_for(lambda: spy.held == 1, "main executor held")
            late = asyncio.ensure_future(
                engine.embed(EmbedRequest(late_texts, priority="ingest", timeout_s=timeout_s))
            )
            await async_wait_for(lambda: scheduler.queued_items == len(late_texts), "late inputs queued")
            await asyncio.wait({late}, timeout=30)
            spy.release.set()
            await holder
            # queued after the late inputs, in the same lane: once it is computed, the executor has
            # been past the late inputs' place in the queue
            await engine.embed(EmbedRequest(["after the deadline"], priority="ingest"))
            return late.exception(), spy

    return asyncio.run(scenario())


def test_a_request_whose_deadline_passes_in_the_queue_gets_503_and_its_inputs_are_never_computed(tiny_engine):
    late_texts = ["late river", "late stone", "late lantern"]
    error, spy = run_past_deadline_scenario(tiny_engine, late_texts)

    assert isinstance(error, DeadlineExceeded), error
    assert error.status == 503 and error.error_type == "DeadlineExceeded"
    computed = spy.computed_inputs()
    for text in late_texts:
        assert token_ids(tiny_engine, "tiny", text) not in computed
    assert token_ids(tiny_engine, "tiny", "after the deadline") in computed
    scheduler = tiny_engine.models["tiny"].scheduler
    assert scheduler.queued_items == 0 and scheduler.queued_tokens == 0


def test_inputs_dropped_because_their_deadline_passed_are_counted_with_reason_deadline(tiny_engine):
    """Operators tell timeouts (server too slow) from disconnects (client gave up) by this label."""
    before = sample(tiny_engine, DROPPED, model="tiny", reason="deadline")
    error, _ = run_past_deadline_scenario(tiny_engine, ["deadline one", "deadline two"])
    assert isinstance(error, DeadlineExceeded)
    assert sample(tiny_engine, DROPPED, model="tiny", reason="deadline") - before == 2


def test_a_timeout_that_is_not_positive_is_refused(tiny_engine):
    for timeout_s in (0.0, -1.0):
        with pytest.raises(Exception, match="positive") as info:
            asyncio.run(tiny_engine.embed(EmbedRequest(["x"], timeout_s=timeout_s)))
        assert info.value.status == 422


@pytest.mark.parametrize("flag", ["--request-timeout", "--drain-timeout"])
@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_a_non_positive_timeout_on_the_command_line_is_refused(tiny_bert_dir, flag, value):
    args = build_parser().parse_args(["serve", "--model", f"tiny={tiny_bert_dir}", flag, value])
    with pytest.raises(ValueError, match=flag):
        config_from_args(args)


# ---- over HTTP ----------------------------------------------------------------------------------------


def error_type(response) -> str:
    body = response.json()
    if isinstance(body.get("error"), dict):
        return body["error"]["type"]
    return body["error_type"]


@pytest.mark.parametrize(
    ("path", "body", "expected_type"),
    [("/embed", {"inputs": ["too late"] * 2}, "DeadlineExceeded"),
     ("/v1/embeddings", {"input": ["too late"] * 2}, "server_error")],
    ids=["native", "openai"],
)
def test_x_request_timeout_makes_a_queued_request_fail_with_503_deadline_exceeded(
    tiny_engine, tiny_server, path, body, expected_type
):
    scheduler = tiny_engine.models["tiny"].scheduler
    late_ids = token_ids(tiny_engine, "tiny", "too late")
    with ThreadPoolExecutor(8) as pool, RunnerSpy(tiny_engine, "tiny", holds=is_main_executor) as spy:
        holder = pool.submit(tiny_server.post, "/embed", json={"inputs": "hold"}, headers={"X-Priority": "ingest"})
        wait_for(lambda: spy.held == 1, "main executor held")
        late = pool.submit(
            tiny_server.post, path, json=body, headers={"X-Priority": "ingest", "X-Request-Timeout": "0.3"}
        )
        response = late.result(timeout=60)  # answered while the executor is still held
        assert spy.held == 1
        spy.release.set()
        assert holder.result(timeout=60).status_code == 200
        after = tiny_server.post("/embed", json={"inputs": "after"}, headers={"X-Priority": "ingest"})
        assert after.status_code == 200
    assert response.status_code == 503, response.text
    assert error_type(response) == expected_type
    assert "deadline" in response.text
    assert late_ids not in spy.computed_inputs()
    assert token_ids(tiny_engine, "tiny", "after") in spy.computed_inputs()
    assert scheduler.queued_items == 0


def test_without_the_header_the_server_request_timeout_applies_and_the_header_can_extend_it(tiny_bert_dir):
    engine = make_engine("tiny", tiny_bert_dir, request_timeout_s=0.3)
    server = InProcessServer(engine).start()
    try:
        with ThreadPoolExecutor(8) as pool, RunnerSpy(engine, "tiny", holds=is_main_executor) as spy:
            ingest_for_60s = {"X-Priority": "ingest", "X-Request-Timeout": "60"}
            holder = pool.submit(server.post, "/embed", json={"inputs": "hold"}, headers=ingest_for_60s)
            wait_for(lambda: spy.held == 1, "main executor held")
            patient = pool.submit(server.post, "/embed", json={"inputs": "patient"}, headers=ingest_for_60s)
            default = pool.submit(server.post, "/embed", json={"inputs": "default"}, headers={"X-Priority": "ingest"})
            default_response = default.result(timeout=60)
            # the default deadline has passed: the request with a longer header deadline still waits
            assert not patient.done()
            spy.release.set()
            patient_response = patient.result(timeout=60)
            assert holder.result(timeout=60).status_code == 200
        assert default_response.status_code == 503, default_response.text
        assert default_response.json()["error_type"] == "DeadlineExceeded"
        assert patient_response.status_code == 200, patient_response.text
    finally:
        server.stop()
        engine.shutdown()


@pytest.mark.parametrize("value", ["abc", "", "0", "-1", "-0.5", "inf", "-inf", "nan", "1e400", "5s", "0x10"])
@pytest.mark.parametrize("path", ["/embed", "/v1/embeddings"])
def test_a_bad_x_request_timeout_gets_422_in_the_dialects_error_shape(tiny_server, path, value):
    body = {"inputs": "x"} if path == "/embed" else {"input": "x"}
    response = tiny_server.post(path, json=body, headers={"X-Request-Timeout": value})
    assert response.status_code == 422, (value, response.text)
    payload = response.json()
    if path == "/embed":
        assert set(payload) == {"error", "error_type"} and payload["error_type"] == "Validation"
        message = payload["error"]
    else:
        assert payload["error"]["type"] == "invalid_request_error"
        message = payload["error"]["message"]
    assert "X-Request-Timeout" in message


def test_a_fractional_x_request_timeout_is_accepted(tiny_server):
    response = tiny_server.post("/embed", json={"inputs": "x"}, headers={"X-Request-Timeout": "12.5"})
    assert response.status_code == 200, response.text


def test_a_client_that_disconnects_while_queued_has_its_inputs_dropped_never_computed(tiny_engine, tiny_server):
    scheduler = tiny_engine.models["tiny"].scheduler
    gone_texts = ["gone river", "gone stone", "gone lantern"]
    cancelled_before = sample(tiny_engine, DROPPED, model="tiny", reason="cancelled")
    status_499_before = sample(tiny_engine, "infercore_requests_total", route="/embed", status="499", model="")

    with ThreadPoolExecutor(8) as pool, RunnerSpy(tiny_engine, "tiny", holds=is_main_executor) as spy:
        holder = pool.submit(tiny_server.post, "/embed", json={"inputs": "hold"}, headers={"X-Priority": "ingest"})
        wait_for(lambda: spy.held == 1, "main executor held")
        sock = tiny_server.open_raw_request(
            "/embed", json.dumps({"inputs": gone_texts}).encode(), {"X-Priority": "ingest"}
        )
        try:
            wait_for(lambda: scheduler.queued_items == len(gone_texts), "the request's inputs queued")
            assert tiny_engine.admitted == 2
        finally:
            sock.close()
        # the server notices the disconnect and gives the request up while the executor is still held
        wait_for(lambda: tiny_engine.admitted == 1, "the disconnected request given up")
        spy.release.set()
        assert holder.result(timeout=60).status_code == 200
        # queued behind where the dropped inputs were: once it is answered, they are behind us
        after = tiny_server.post("/embed", json={"inputs": "after the disconnect"}, headers={"X-Priority": "ingest"})
        assert after.status_code == 200

    computed = spy.computed_inputs()
    for text in gone_texts:
        assert token_ids(tiny_engine, "tiny", text) not in computed
    assert sample(tiny_engine, DROPPED, model="tiny", reason="cancelled") - cancelled_before == len(gone_texts)
    status_499 = sample(tiny_engine, "infercore_requests_total", route="/embed", status="499", model="")
    assert status_499 - status_499_before == 1
    assert scheduler.queued_items == 0
