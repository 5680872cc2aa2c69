"""Per-model work queue: priority lanes, token-budget batches, deadlines, admission in tokens.

Work items (one per input) are queued by the event loop and taken by the model's executor threads.

- Lanes: ``search`` before ``ingest`` before ``batch``. A batch is filled from the highest lane
  first, then topped up from the lower ones, so search inputs never wait behind queued ingest work.
- Budget: a batch grows in arrival order (within a lane) until the next item would push it past
  ``max_batch_tokens`` (the sum of real token counts for padding-free backends; inputs times the
  longest input's tokens for ``padded`` ones) or
  ``max_batch_requests``; an item bigger than the budget still runs, alone. No artificial wait: an
  idle executor takes whatever is queued the moment it arrives. With ``spread`` (CPU, one executor
  per core) the work is shared evenly among the executors of the same lanes: an idle executor takes
  an even share of the queued tokens plus those the busy executors are running, so one request of 16
  passages runs on every core rather than on one, and a request arriving while a core is still busy
  is not taken whole by the core that frees first while the other then idles.
- Deadlines and cancellation: an item whose deadline passed, or whose request was cancelled (the
  client went away), is dropped when a batch is formed and never reaches the model.
- Admission: queued tokens per model are bounded by ``max_queued_tokens``; ``submit`` refuses work
  beyond it with ``Overloaded``, whose ``retry_after_s`` is the queue's size over the measured
  drain rate. A submission larger than the whole bound could only ever be admitted into an empty
  queue, which steady competing load never leaves: a client obeying Retry-After would wait forever.
  It gets ``PayloadTooLarge`` (413) naming the bound instead, at once and whatever the load, so the
  client splits it; every submission within the bound is admitted as soon as the queue has room.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..models.tokenizer import TokenizedInput
from .errors import DeadlineExceeded, NotReady, Overloaded, PayloadTooLarge

LANES = ("search", "ingest", "batch")
# Retry-After bounds, in seconds
_MIN_RETRY_AFTER_S = 1.0
_MAX_RETRY_AFTER_S = 60.0
# Weight of the newest batch in the drain-rate average
_DRAIN_RATE_SMOOTHING = 0.2


@dataclass(slots=True, eq=False)
class WorkItem:
    """One input on its way through the model: a text's ``tokens``, or an ``image`` (a
    ``models.images.PreparedImage``, ``tokens`` None) that costs its patch tokens in the budget. The
    future resolves on ``loop``."""

    tokens: TokenizedInput | None
    options: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued_at: float
    deadline: float = float("inf")  # time.perf_counter() value
    lane: str = "ingest"
    started_at: float = field(default=0.0)
    image: Any = None

    @property
    def num_tokens(self) -> int:
        return self.image.tokens if self.tokens is None else len(self.tokens.ids)

    def abandoned(self) -> bool:
        """True once nobody waits for the result (the request was cancelled or already failed)."""
        return self.future.done()


class TokenBudgetScheduler:
    """Thread-safe lanes: ``submit`` from the event loop, ``next_batch`` from executor threads."""

    def __init__(
        self,
        max_batch_tokens: int,
        max_batch_requests: int | None = None,
        max_queued_tokens: int | None = None,
        on_drop: Callable[[str, int], None] | None = None,
        spread: bool = False,
        padded: bool = False,
    ):
        if max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be positive")
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max_batch_requests or 1 << 30
        self.max_queued_tokens = max_queued_tokens or 1 << 62
        self._lanes: dict[str, deque[WorkItem]] = {lane: deque() for lane in LANES}
        self._lane_tokens = dict.fromkeys(LANES, 0)
        self._cond = threading.Condition()
        self._closed = False
        self._drain_rates: dict[str, float] = {}  # executor → its smoothed tokens/s
        self._on_drop = on_drop or (lambda reason, n: None)
        # CPU data parallelism: queued work is shared among the idle executors of the same lanes
        # instead of the first one taking a whole budget while the others stay idle.
        self._spread = spread
        self._idle: dict[tuple[str, ...], int] = {}
        # Executor threads running a batch they took from these lanes → its tokens (until they ask
        # for the next one).
        self._running: dict[tuple[str, ...], dict[int, int]] = {}
        # Idle executors whose cores a running batch borrowed (borrow_idle): they take no batch until
        # it gives them back, so the borrowed threads do not share cores with another batch.
        self._lent: dict[tuple[str, ...], int] = {}
        # Padded backends (onnx) compute every input at the batch's longest length: the budget
        # counts those padded tokens (an upper bound: the backend pads length groups separately).
        self._padded = padded

    # ---- event loop side -----------------------------------------------------------------------

    def submit(self, items: list[WorkItem]) -> None:
        """Queue all of ``items`` or none: Overloaded if they would exceed ``max_queued_tokens``,
        NotReady (503) once closed (a request admitted just before the shutdown began)."""
        tokens = sum(item.num_tokens for item in items)
        with self._cond:
            if self._closed:
                raise NotReady("the server is shutting down and accepts no new requests")
            if tokens > self.max_queued_tokens:
                raise PayloadTooLarge(
                    f"the request's {tokens} tokens are more than this model's whole queue holds "
                    f"({self.max_queued_tokens} tokens, --max-queued-tokens); split it into requests of at most "
                    f"{self.max_queued_tokens} tokens"
                )
            queued = self.queued_tokens
            if queued + tokens > self.max_queued_tokens:
                raise Overloaded(
                    f"the queue of this model is full ({queued} tokens waiting, limit {self.max_queued_tokens}); "
                    "retry later",
                    retry_after_s=self._retry_after_s(queued),
                )
            for item in items:
                self._lanes[item.lane].append(item)
                self._lane_tokens[item.lane] += item.num_tokens
            self._cond.notify_all()

    def _retry_after_s(self, queued_tokens: int) -> float:
        rate = self.drain_tokens_per_s
        if not rate:
            return _MIN_RETRY_AFTER_S
        return min(max(queued_tokens / rate, _MIN_RETRY_AFTER_S), _MAX_RETRY_AFTER_S)

    # ---- state -------------------------------------------------------------------------------

    @property
    def queued_tokens(self) -> int:
        return sum(self._lane_tokens.values())

    @property
    def queued_items(self) -> int:
        return sum(len(q) for q in self._lanes.values())

    def lane_depths(self) -> dict[str, tuple[int, int]]:
        """lane → (queued items, queued tokens)"""
        with self._cond:
            return {lane: (len(self._lanes[lane]), self._lane_tokens[lane]) for lane in LANES}

    @property
    def drain_tokens_per_s(self) -> float | None:
        """The queue's drain rate: the sum over the executors that run in parallel."""
        return sum(self._drain_rates.values()) if self._drain_rates else None

    def record_drain(self, tokens: int, seconds: float, executor: str = "main") -> None:
        """Feed the measured throughput of one batch of ``executor`` into the Retry-After estimate."""
        if seconds <= 0:
            return
        rate = tokens / seconds
        previous = self._drain_rates.get(executor)
        self._drain_rates[executor] = rate if previous is None else previous + _DRAIN_RATE_SMOOTHING * (rate - previous)

    # ---- executor side -----------------------------------------------------------------------

    def next_batch(self, lanes: Iterable[str] = LANES, timeout_s: float | None = None) -> list[WorkItem] | None:
        """The next batch from ``lanes`` (in priority order).

        Blocks until work is queued; returns [] on timeout and None once closed with nothing left.
        """
        lanes = tuple(lanes)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        caller = threading.get_ident()
        with self._cond:
            running = self._running.setdefault(lanes, {})
            running.pop(caller, None)  # its last batch is done
            self._idle[lanes] = self._idle.get(lanes, 0) + 1
            try:
                while True:
                    # Only an executor that is not lent takes work (idle executors are interchangeable).
                    if self._idle[lanes] > self._lent.get(lanes, 0):
                        batch = self._form_batch(lanes, self._budget(lanes))
                        if batch:
                            running[caller] = sum(item.num_tokens for item in batch)
                            return batch
                    if self._closed and not any(self._lanes[lane] for lane in lanes):
                        return None
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return []
                    self._cond.wait(remaining)
            finally:
                self._idle[lanes] -= 1

    def borrow_idle(self, lanes: Iterable[str], most: int) -> int:
        """Up to ``most`` executors of ``lanes`` idle right now, when nothing of those lanes is queued:
        the cores a batch that was just taken may run on too (threads), since no queued work would use
        them. They are lent until ``give_back``: work arriving meanwhile waits for the borrowing batch
        instead of running beside it on cores its threads already use (on 2 cores, an int8 MiniLM
        request beside a borrowing one cost ~10 % of the throughput at 2 clients)."""
        lanes = tuple(lanes)
        with self._cond:
            if not self._spread or most <= 0 or any(self._lane_tokens[lane] for lane in lanes):
                return 0
            lent = self._lent.get(lanes, 0)
            n = max(0, min(most, self._idle.get(lanes, 0) - lent))
            self._lent[lanes] = lent + n
            return n

    def give_back(self, lanes: Iterable[str], n: int) -> None:
        """The executors ``borrow_idle`` lent take work again."""
        if n <= 0:
            return
        lanes = tuple(lanes)
        with self._cond:
            self._lent[lanes] -= n
            self._cond.notify_all()

    def _budget(self, lanes: tuple[str, ...]) -> int:
        """Tokens this batch may hold: the budget, or with ``spread`` an even share of the work among
        the executors of these lanes that are idle right now (this one included) or running a batch:
        the queued tokens plus those running, shared evenly. A busy executor comes back for the rest
        when done: counting only the idle ones, the first executor to free took a whole request (8
        BERT-base passages, 2 clients) and the other, freeing a moment later, idled until it was done
        (1.3 of 2 cores busy)."""
        running = self._running.get(lanes, {})
        executors = self._idle.get(lanes, 1) - self._lent.get(lanes, 0) + len(running)
        if not self._spread or executors <= 1:
            return self.max_batch_tokens
        work = sum(self._lane_tokens[lane] for lane in lanes) + sum(running.values())
        return min(self.max_batch_tokens, -(-work // executors))

    def _form_batch(self, lanes: tuple[str, ...], share: int) -> list[WorkItem]:
        """Items in lane order while their real tokens stay near ``share`` (``_budget``) and within
        ``max_batch_tokens``, and for a padded backend their padded tokens within ``max_batch_tokens``
        too. The even share is counted in real tokens on both kinds of backend: counted padded, a
        spread request of unequal lengths left its first executor fewer inputs than the rest (3 of 8
        BERT-base passages), which then idled."""
        batch: list[WorkItem] = []
        tokens = 0
        longest = 0
        now = time.perf_counter()
        for lane in lanes:
            queue = self._lanes[lane]
            while queue:
                item = queue[0]
                n = item.num_tokens
                # Deadline first: a request that timed out has cancelled its futures too, and must
                # still be counted as a deadline drop, not as a client that went away.
                if item.deadline <= now:
                    self._pop(lane)
                    self._on_drop("deadline", 1)
                    _fail_soon(item, DeadlineExceeded("the request's deadline passed while it waited in the queue"))
                    continue
                if item.abandoned():
                    self._pop(lane)
                    self._on_drop("cancelled", 1)
                    continue
                over = tokens + n > share
                if over and batch and share < self.max_batch_tokens and tokens + n <= self.max_batch_tokens:
                    # An even share (spreading): the input that crosses it joins when the batch ends
                    # nearer the share with it than without (else 8 inputs split 3 + 5, not 4 + 4).
                    over = tokens + n - share > share - tokens
                if self._padded:
                    over = over or (len(batch) + 1) * max(longest, n) > self.max_batch_tokens
                if batch and (over or len(batch) >= self.max_batch_requests):
                    return batch
                self._pop(lane)
                batch.append(item)
                tokens += n
                longest = max(longest, n)
        return batch

    def _pop(self, lane: str) -> None:
        item = self._lanes[lane].popleft()
        self._lane_tokens[lane] -= item.num_tokens

    def close(self) -> None:
        """Stop accepting work; ``next_batch`` drains what is queued, then returns None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def _fail_soon(item: WorkItem, error: Exception) -> None:
    def fail() -> None:
        if not item.future.done():
            item.future.set_exception(error)

    try:
        item.loop.call_soon_threadsafe(fail)
    except RuntimeError:  # the loop has closed: nobody waits
        pass
