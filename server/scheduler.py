"""Per-model work queue that hands the executor batches bounded by a token budget.

Work items (one per input) are queued by the event loop and taken by the model's executor thread.
A batch is filled in arrival order until the next item would push it past ``max_batch_tokens``
(packed execution: the sum of real token counts) or ``max_batch_requests``; an item bigger than the
whole budget still runs, alone. There is no artificial wait: an idle executor takes whatever is
queued the moment it arrives.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..models.tokenizer import TokenizedInput


@dataclass(slots=True, eq=False)
class WorkItem:
    """One input on its way through the model. The future resolves on ``loop``."""

    tokens: TokenizedInput
    options: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued_at: float
    started_at: float = field(default=0.0)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens.ids)

    def abandoned(self) -> bool:
        """True once nobody waits for the result (the request was cancelled)."""
        return self.future.done()


class TokenBudgetScheduler:
    """Thread-safe FIFO: ``submit`` from the event loop, ``next_batch`` from the executor thread."""

    def __init__(self, max_batch_tokens: int, max_batch_requests: int | None = None):
        if max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be positive")
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max_batch_requests or 1 << 30
        self._queue: deque[WorkItem] = deque()
        self._queued_tokens = 0
        self._cond = threading.Condition()
        self._closed = False

    def submit(self, items: list[WorkItem]) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("scheduler is closed")
            self._queue.extend(items)
            self._queued_tokens += sum(item.num_tokens for item in items)
            self._cond.notify()

    @property
    def queued_items(self) -> int:
        return len(self._queue)

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    def next_batch(self, timeout_s: float | None = None) -> list[WorkItem] | None:
        """Block until work is queued; return the next batch, [] on timeout, None once closed and empty."""
        with self._cond:
            if not self._queue:
                if self._closed:
                    return None
                self._cond.wait(timeout_s)
                if not self._queue:
                    return None if self._closed else []
            batch: list[WorkItem] = []
            tokens = 0
            while self._queue:
                item = self._queue[0]
                n = item.num_tokens
                if item.abandoned():
                    self._queue.popleft()
                    self._queued_tokens -= n
                    continue
                if batch and (tokens + n > self.max_batch_tokens or len(batch) >= self.max_batch_requests):
                    break
                self._queue.popleft()
                self._queued_tokens -= n
                batch.append(item)
                tokens += n
            return batch

    def close(self) -> None:
        """Stop accepting work; ``next_batch`` drains what is queued, then returns None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
