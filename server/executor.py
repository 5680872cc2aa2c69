"""One thread per model per device: takes batches from the scheduler, runs the model, resolves futures.

The executor is the only code that touches the model's tensors. It packs the batch's token ids,
calls the model's head (``runner.run``), and hands each input's host-side result back to the event
loop that waits for it, one callback per batch.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..models.loader import ServedModel
from ..models.packing import pack_sequences
from .errors import BackendError
from .metrics import Metrics
from .scheduler import TokenBudgetScheduler, WorkItem

log = logging.getLogger("infercore.executor")


class ModelExecutor:
    def __init__(self, model: ServedModel, scheduler: TokenBudgetScheduler, metrics: Metrics):
        self.model = model
        self.scheduler = scheduler
        self.metrics = metrics
        self.healthy = True
        self._thread = threading.Thread(target=self._loop, name=f"executor-{model.id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float | None = None) -> None:
        """Finish what is queued, then end the thread."""
        self.scheduler.close()
        self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            batch = self.scheduler.next_batch()
            if batch is None:
                return
            if batch:
                self._run_batch(batch)

    def _run_batch(self, items: list[WorkItem]) -> None:
        started = time.perf_counter()
        for item in items:
            item.started_at = started
        try:
            packed = pack_sequences(
                [item.tokens.ids for item in items],
                [item.tokens.type_ids for item in items],
                device=self.model.device,
            )
            results = self.model.runner.run(packed, [item.options for item in items])
            error = None
            self.healthy = True
        except Exception:  # a model failure on valid input: report it, keep serving
            log.exception("model %s failed on a batch of %d inputs", self.model.id, len(items))
            results = None
            error = BackendError(f"model {self.model.id!r} failed while computing this batch")
            self.healthy = False
        elapsed = time.perf_counter() - started
        self.metrics.observe_batch(self.model.id, len(items), sum(i.num_tokens for i in items), elapsed)
        outcomes = list(zip(items, results)) if error is None else [(item, None) for item in items]
        by_loop: dict[int, list[tuple[WorkItem, Any]]] = {}
        for outcome in outcomes:
            by_loop.setdefault(id(outcome[0].loop), []).append(outcome)
        for group in by_loop.values():
            try:
                group[0][0].loop.call_soon_threadsafe(_resolve, group, error, elapsed)
            except RuntimeError:  # that event loop has closed: nobody is waiting any more
                pass


@dataclass(frozen=True, slots=True)
class ItemResult:
    value: Any
    queue_s: float
    inference_s: float


def _resolve(group: list[tuple[WorkItem, Any]], error: Exception | None, inference_s: float) -> None:
    """Runs on the event loop that owns the futures."""
    for item, value in group:
        if item.future.done():  # cancelled while the batch ran
            continue
        if error is not None:
            item.future.set_exception(error)
        else:
            item.future.set_result(ItemResult(value, item.started_at - item.enqueued_at, inference_s))
