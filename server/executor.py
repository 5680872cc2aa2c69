"""Executor threads: take batches from a model's scheduler, run the model, resolve futures.

Each model has main executors (one on CUDA; one single-threaded executor per core on CPU) serving
every lane in priority order, and a search executor serving only the search lane, so a search input
never waits for an ingest batch that is already computing (they run concurrently; on CUDA the
search executor uses a high-priority stream). On CPU a batch that leaves nothing queued also runs
on the cores of the main executors idle beside it, lent to it until it is done (``_widen_for``);
the search executor, which has no core of its own, runs one thread unless it can borrow theirs.

Executors are the only code that touches the model's tensors. A batch that runs out of device
memory is split in halves and retried; only an input that does not fit on its own fails, with a
413 naming its size.

On CUDA, batches are packed into pinned host memory, and the main executor has the next batch formed,
packed and copied to the device (on a copy stream) while the current one computes
(``NextBatchStager``). Before the main executor starts, it runs a full token budget through the
model (``warm_up_full_batch``), so a budget that does not fit in device memory fails at boot
rather than under load.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..models.loader import ServedModel
from ..models.packing import PackedBatch, pack_sequences
from .errors import BackendError, PayloadTooLarge
from .metrics import Metrics
from .scheduler import LANES, TokenBudgetScheduler, WorkItem

log = logging.getLogger("infercore.executor")


@dataclass(frozen=True, slots=True)
class Lenders:
    """CPU: the executors whose cores a batch may also run on while they idle (``borrow_idle``):
    those serving ``lanes``, ``threads`` intra-op threads each."""

    lanes: tuple[str, ...]
    threads: int


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
        lenders: Lenders | None = None,
        own_cores: int | None = None,
    ):
        """``threads``: intra-op threads of a batch that borrows nothing. ``lenders`` (CPU): whose
        idle cores a batch may borrow (``_widen_for``); ``own_cores``: the cores this executor has
        to itself (default ``threads``; the search executor has none, it runs beside the main ones)."""
        self.model = model
        self.scheduler = scheduler
        self.metrics = metrics
        self.lanes = tuple(lanes)
        self.name = name
        self.healthy = True
        self._stream_priority = stream_priority
        self._threads = threads
        self._lenders = lenders if model.device.type == "cpu" else None
        self._own_cores = (threads or 1) if own_cores is None else own_cores
        # The backend instance this executor runs with (its thread count; ONNX: the sessions of that count).
        self._backend = model.backend
        self._running_threads = threads
        self._thread = threading.Thread(target=self._loop, name=f"executor-{model.id}-{name}", daemon=True)

    @property
    def _stages_batches(self) -> bool:
        """CUDA main executors overlap the next batch's packing and copy with the current forward;
        the search executor's batches are small and latency-bound, so it packs when it runs them."""
        return self.model.device.type == "cuda" and self.lanes != ("search",) and not self.model.backend.is_padded

    def start(self) -> None:
        if self._stages_batches:
            warm_up_full_batch(self.model, self.scheduler.max_batch_tokens, self.scheduler.max_batch_requests)
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
            if self.lanes != ("search",):
                lower_thread_priority()
            if self._lenders is not None:
                # What a batch borrowing the idle cores runs with is ready before the first one (an ONNX
                # session per thread count); see _widen_for.
                self.model.backend.for_executor(max(os.cpu_count() or 1, self._threads or 1))
            self._backend = self.model.backend.for_executor(self._threads)
        with self._stream():
            stager = NextBatchStager(self.model, self.scheduler, self.lanes) if self._stages_batches else None
            while True:
                if stager is None:
                    batch, packed = self.scheduler.next_batch(self.lanes), None
                else:
                    batch, packed = stager.take()
                if batch is None:
                    return
                if batch:
                    lent = self._widen_for(batch)
                    try:
                        self._run_batch(batch, packed)
                    finally:
                        if lent:
                            self.scheduler.give_back(self._lenders.lanes, lent)

    def _widen_for(self, items: list[WorkItem]) -> int:
        """CPU: a batch that leaves nothing queued runs with the threads of the lenders idle beside
        it too (a lone request uses the whole machine, not one core); otherwise with this executor's
        own. The idle lenders are lent (they take no work) until the batch is done; returns how many.
        The next batch taken sets the count again.

        The search executor has no core of its own: a query runs on one thread beside busy main
        executors, on every core when they all idle, and on the cores of those it borrowed otherwise,
        so its threads never land on a core a main executor computes on. It used to run on every
        core always, which beside busy main executors oversubscribed them (a two-thread ONNX Runtime
        session spins; without spinning, two threads ran a 15-token int8 MiniLM query slower than one
        in an ad-hoc timing), costing concurrent single queries throughput and tail latency
        (bench-cpu's query sweep; README, "ONNX Runtime backend and int8")."""
        if self._lenders is None:
            return 0
        cores = os.cpu_count() or 1
        wanted = -(-max(cores - self._own_cores, 0) // self._lenders.threads)
        lent = self.scheduler.borrow_idle(self._lenders.lanes, wanted) if wanted else 0
        threads = max(min(self._own_cores + lent * self._lenders.threads, cores), self._threads or 1)
        if threads != self._running_threads:
            self._backend = self.model.backend.for_executor(threads)
            self._running_threads = threads
        return lent

    def _run_batch(self, items: list[WorkItem], packed: PackedBatch | None = None) -> None:
        started = time.perf_counter()
        for item in items:
            item.started_at = started
        outcomes = self._compute(items, packed)
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

    def _compute(self, items: list[WorkItem], packed: PackedBatch | None = None) -> list[Any]:
        """One result or one exception per item; ``packed``: the text items already on the device."""
        try:
            results = self._forward(items, packed)
            self.healthy = True
            return results
        except Exception as exc:
            if self._backend.is_out_of_memory(exc):
                return self._split_after_oom(items)
            # A model failure on valid input: report it, keep serving, let /health probe.
            log.exception("model %s failed on a batch of %d inputs", self.model.id, len(items))
            self.healthy = False
            message = f"model {self.model.id!r} failed while computing this batch"
            return [BackendError(message) for _ in items]

    def _forward(self, items: list[WorkItem], packed: PackedBatch | None) -> list[Any]:
        """The batch's texts through the backend and its images through the vision tower (a batch
        may hold both: they share the model's queue and budget), results in the items' order."""
        texts = [item for item in items if item.image is None]
        images = [item for item in items if item.image is not None]
        if not images:
            return self._run_texts(items, packed)
        by_item: dict[int, Any] = {}
        if texts:
            by_item.update(zip(map(id, texts), self._run_texts(texts, packed)))
        # Image towers run on torch whatever the text side's backend (onnx exports the text side only).
        pixels = torch.stack([item.image.pixels for item in images])
        vectors = self.model.images.embed_images(pixels, [item.options for item in images])
        by_item.update(zip(map(id, images), vectors))
        return [by_item[id(item)] for item in items]

    def _run_texts(self, texts: list[WorkItem], packed: PackedBatch | None) -> list[Any]:
        """Text items through this executor's backend; ``packed``: their batch staged already (the
        torch path on CUDA). Padded backends report the padding they computed."""
        options = [item.options for item in texts]
        batch = packed if packed is not None else self._backend.make_batch(
            [item.tokens.ids for item in texts], [item.tokens.type_ids for item in texts], options)
        if self._backend.is_padded:
            waste = self._backend.computed_tokens(batch) - sum(item.num_tokens for item in texts)
            self.metrics.observe_padding(self.model.id, waste)
        return list(self._backend.run(batch, options))

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


def pack_items(items: list[WorkItem], device: torch.device) -> PackedBatch | None:
    """The text items' tokens packed on ``device``, through pinned host memory on CUDA (asynchronous
    copy); None when the items are all images (their pixels go to the tower as they are)."""
    texts = [item for item in items if item.image is None]
    if not texts:
        return None
    return pack_sequences(
        [item.tokens.ids for item in texts],
        [item.tokens.type_ids for item in texts],
        device=device,
        pin_memory=device.type == "cuda",
    )


class NextBatchStager:
    """Forms, packs and copies the next batch while the executor computes the current one (CUDA).

    A helper thread takes a batch from the scheduler as soon as the executor has taken the previous
    one, packs it into pinned host memory and starts its copy on a copy stream. ``take`` hands it
    to the executor, whose stream waits for that copy on the device, not on the host. One batch at
    most is staged, so a batch is formed at most one forward pass before it runs. Packing that
    fails (no device memory for the copy) hands the items over unpacked: the executor packs them
    itself and its out-of-memory handling applies.
    """

    def __init__(self, model: ServedModel, scheduler: TokenBudgetScheduler, lanes: tuple[str, ...]):
        self._device = model.device
        self._scheduler = scheduler
        self._lanes = lanes
        self._copy_stream = torch.cuda.Stream(device=model.device)
        self._staged: queue.Queue = queue.Queue(maxsize=1)
        self._may_form = threading.Semaphore(1)  # released each time the executor takes a batch
        threading.Thread(target=self._loop, name=f"stager-{model.id}", daemon=True).start()

    def _loop(self) -> None:
        try:
            with torch.cuda.stream(self._copy_stream):
                while True:
                    self._may_form.acquire()
                    items = self._scheduler.next_batch(self._lanes)
                    if items is None:
                        return
                    try:
                        packed = pack_items(items, self._device)
                        ready = torch.cuda.Event() if packed is not None else None
                        if ready is not None:
                            ready.record(self._copy_stream)
                    except Exception as exc:
                        log.warning("could not stage a batch of %d inputs (%s); it is packed when it runs",
                                    len(items), exc)
                        packed = ready = None
                    self._staged.put((items, packed, ready))
        finally:  # however the loop ends, the executor's take() returns instead of waiting forever
            self._staged.put(None)

    def take(self) -> tuple[list[WorkItem] | None, PackedBatch | None]:
        """(items, their packed batch or None), or (None, None) once the scheduler is closed."""
        staged = self._staged.get()
        self._may_form.release()
        if staged is None:
            return None, None
        items, packed, ready = staged
        if packed is not None:
            compute = torch.cuda.current_stream(self._device)
            compute.wait_event(ready)
            for tensor in (packed.input_ids, packed.token_type_ids, packed.positions, packed.cu_seqlens):
                if tensor is not None:  # allocated on the copy stream, used and freed on this one
                    tensor.record_stream(compute)
        return items, packed


def warm_up_full_batch(model: ServedModel, max_batch_tokens: int, max_batch_requests: int | None = None) -> None:
    """Run the largest batches the scheduler can form through the model once: ``max_batch_tokens``
    tokens as full-length inputs (the biggest attention and activation tensors), then as the
    shortest possible inputs (the most output rows: pooled vectors, SPLADE's [inputs, vocab]).

    Raises RuntimeError naming the budget when that does not fit in the device's memory.
    """
    token = model.tokenizer.encode_batch(["warm up"], truncate=True)[0].ids[0]
    shortest = model.tokenizer.num_special_tokens + 1
    for length in (model.max_input_tokens, shortest):
        count = max(1, max_batch_tokens // length)
        if max_batch_requests:
            count = min(count, max_batch_requests)
        try:
            model.run_ids([[token] * length] * count)
        except Exception as exc:
            if not model.backend.is_out_of_memory(exc):
                raise
            raise RuntimeError(
                f"model {model.id}: a full batch ({count} inputs of {length} tokens, budget {max_batch_tokens} "
                f"tokens) does not fit in the memory of {model.device}; lower --max-batch-tokens"
            ) from exc
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


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
