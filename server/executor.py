"""Executor threads: take batches from a model's scheduler, run the model, resolve futures.

Each model has main executors (one on CUDA; one single-threaded executor per core on CPU) serving
every lane in priority order, and a search executor serving only the search lane, so a search input
never waits for an ingest batch that is already computing (they run concurrently; on CUDA the
search executor uses a high-priority stream).

Executors are the only code that touches the model's tensors. A batch that runs out of device
memory is split in halves and retried; only an input that does not fit on its own fails, with a
413 naming its size.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..models.loader import ServedModel
from ..models.packing import pack_sequences
from .errors import BackendError, PayloadTooLarge
from .metrics import Metrics
from .scheduler import LANES, TokenBudgetScheduler, WorkItem

log = logging.getLogger("infercore.executor")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    message = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


@dataclass(frozen=True, slots=True)
class ItemResult:
    value: Any
    queue_s: float
    inference_s: float


class ModelExecutor:
    def __init__(
        self,
        model: ServedModel,
        scheduler: TokenBudgetScheduler,
        metrics: Metrics,
        lanes: Iterable[str] = LANES,
        name: str = "main",
        stream_priority: int = 0,
        threads: int | None = None,
    ):
        self.model = model
        self.scheduler = scheduler
        self.metrics = metrics
        self.lanes = tuple(lanes)
        self.name = name
        self.healthy = True
        self._stream_priority = stream_priority
        self._threads = threads
        self._thread = threading.Thread(target=self._loop, name=f"executor-{model.id}-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout_s: float | None = None) -> None:
        self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _stream(self) -> contextlib.AbstractContextManager:
        if self.model.device.type != "cuda":
            return contextlib.nullcontext()
        stream = torch.cuda.Stream(device=self.model.device, priority=self._stream_priority)
        return torch.cuda.stream(stream)

    def _loop(self) -> None:
        if self.model.device.type == "cpu":
            if self._threads:
                # OpenMP and MKL thread counts are per calling thread: this sets this executor's only.
                torch.set_num_threads(self._threads)
            if self.lanes != ("search",):
                lower_thread_priority()
        with self._stream():
            while True:
                batch = self.scheduler.next_batch(self.lanes)
                if batch is None:
                    return
                if batch:
                    self._run_batch(batch)

    def _run_batch(self, items: list[WorkItem]) -> None:
        started = time.perf_counter()
        for item in items:
            item.started_at = started
        outcomes = self._compute(items)
        elapsed = time.perf_counter() - started
        tokens = sum(item.num_tokens for item in items)
        if self.lanes != ("search",):  # the search executor never drains the bulk of the queue
            self.scheduler.record_drain(tokens, elapsed, self.name)
        self.metrics.observe_batch(self.model.id, len(items), tokens, elapsed)

        by_loop: dict[int, list[tuple[WorkItem, Any]]] = {}
        for item, outcome in zip(items, outcomes):
            by_loop.setdefault(id(item.loop), []).append((item, outcome))
        for group in by_loop.values():
            try:
                group[0][0].loop.call_soon_threadsafe(_resolve, group, elapsed)
            except RuntimeError:  # that event loop has closed: nobody is waiting any more
                pass

    def _compute(self, items: list[WorkItem]) -> list[Any]:
        """One result or one exception per item."""
        try:
            packed = pack_sequences(
                [item.tokens.ids for item in items],
                [item.tokens.type_ids for item in items],
                device=self.model.device,
            )
            results = self.model.runner.run(packed, [item.options for item in items])
            self.healthy = True
            return list(results)
        except Exception as exc:
            if is_out_of_memory(exc):
                return self._split_after_oom(items)
            # A model failure on valid input: report it, keep serving, let /health probe.
            log.exception("model %s failed on a batch of %d inputs", self.model.id, len(items))
            self.healthy = False
            message = f"model {self.model.id!r} failed while computing this batch"
            return [BackendError(message) for _ in items]

    def _split_after_oom(self, items: list[WorkItem]) -> list[Any]:
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(items) == 1:
            n = items[0].num_tokens
            log.warning("model %s: a single input of %d tokens does not fit in %s memory", self.model.id, n,
                        self.model.device)
            return [
                PayloadTooLarge(
                    f"an input of {n} tokens does not fit in the memory of {self.model.device} next to the "
                    "other work; send a shorter input"
                )
            ]
        log.warning("model %s: out of memory on a batch of %d inputs (%d tokens); splitting it", self.model.id,
                    len(items), sum(i.num_tokens for i in items))
        self.metrics.oom_splits.labels(self.model.id).inc()
        middle = len(items) // 2
        return self._compute(items[:middle]) + self._compute(items[middle:])


# CPU: main executors run at this niceness above the rest of the process, so a search batch, the
# event loop and tokenization take a core from bulk work when they need one (Linux nice is per thread).
BULK_NICENESS = 10


def lower_thread_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BULK_NICENESS)
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed: priorities stay as they are
        log.debug("could not lower the priority of %s: %s", threading.current_thread().name, exc)


def _resolve(group: list[tuple[WorkItem, Any]], inference_s: float) -> None:
    """Runs on the event loop that owns the futures."""
    for item, outcome in group:
        if item.future.done():  # cancelled, or timed out, while the batch ran
            continue
        if isinstance(outcome, Exception):
            item.future.set_exception(outcome)
        else:
            item.future.set_result(ItemResult(outcome, item.started_at - item.enqueued_at, inference_s))
