"""The engine: loaded models, their schedulers and executors, and the request pipeline.

admission (readiness, concurrency) → validate → tokenize (worker pool, off the event loop) → pick a
lane → queue one work item per input (admission in tokens) → executors batch and compute → futures
resolve → a canonical result. Dialects call the engine with canonical requests; the engine never
sees JSON and never touches tensors itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..models.checkpoint import CheckpointError
from ..models.embedding import EmbedOptions
from ..models.listwise import ListwiseReranker
from ..models.loader import ServedModel, load_model, resolve_devices
from ..models.repository import resolve_sources
from ..models.sparse import SparseOptions
from ..models.tokenizer import InputTooLong, Token, TokenizedInput
from .canonical import (
    DecodeRequest,
    EmbedRequest,
    EmbedResult,
    Ranked,
    RerankRequest,
    RerankResult,
    SparseEmbedRequest,
    Timings,
    TokenizeRequest,
)
from .config import ServerConfig
from .errors import (
    DeadlineExceeded,
    ModelNotFound,
    ModelRetired,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    ValidationError,
)
from .executor import ItemResult, ModelExecutor
from .metrics import Metrics
from .scheduler import LANES, TokenBudgetScheduler, WorkItem

log = logging.getLogger("infercore.engine")

HEALTH_PROBE_TIMEOUT_S = 30.0
# A document longer than this many windows is cut after the last one.
MAX_RERANK_WINDOWS = 32
# A request with one input of at most this many tokens and no explicit lane is a search.
SEARCH_LANE_MAX_TOKENS = 64


@dataclass(frozen=True)
class BiEncoderReranker:
    """The starter set's stand-in when no cross-encoder is loaded: cosine similarity of an
    embedding model's vectors of the query and of each document. Named and described as what it
    is; a configured cross-encoder replaces it."""

    id: str
    embedder: ModelHandle

    @property
    def description(self) -> str:
        return (
            f"bi-encoder reranker, not a cross-encoder: the cosine similarity of {self.embedder.id} embeddings "
            "of the query and of each document (scores in [-1, 1])"
        )


@dataclass
class ModelHandle:
    """One served model: a replica per device (same weights, same tokenizer), the one queue every
    replica takes batches from, and the executors of all replicas."""

    replicas: list[ServedModel]
    scheduler: TokenBudgetScheduler
    executors: list[ModelExecutor]

    @property
    def model(self) -> ServedModel:
        """The first replica: tokenizer, task and metadata are the same on every replica."""
        return self.replicas[0]

    @property
    def devices(self) -> list[str]:
        return [str(replica.device) for replica in self.replicas]

    @property
    def id(self) -> str:
        return self.model.id

    @property
    def healthy(self) -> bool:
        return all(e.healthy for e in self.executors)


class Engine:
    def __init__(self, config: ServerConfig, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self.models: dict[str, ModelHandle] = {}
        self.bi_encoder_rerankers: dict[str, BiEncoderReranker] = {}
        self.state = "starting"  # starting → ready → draining → stopped; or failed
        self.failure: str | None = None
        # Requests between admission and their answer (tokenizing, queued or computing).
        self.admitted = 0
        self._tokenizer_pool = ThreadPoolExecutor(config.tokenization_workers, thread_name_prefix="tokenize")
        self.metrics.watch_queues(self._queue_depths)

    # ---- lifecycle -------------------------------------------------------------------------

    def load(self) -> None:
        """Load, warm up and start every configured model (blocking). Sets state to ready or failed."""
        try:
            for source in resolve_sources(self.config.models, self.config.models_dir):
                self._load_one(source.id, source.path)
        except Exception as exc:
            self.failure = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            raise
        self._add_bi_encoder_reranker()
        if self.state == "starting":  # not if a drain began while loading
            self.state = "ready"

    def _add_bi_encoder_reranker(self) -> None:
        """The starter set (no model configured) without a cross-encoder reranks with its first
        embedding model."""
        if self.config.models or self.config.models_dir:
            return
        if any(h.model.task == "rerank" for h in self.models.values()):
            return
        embedder = next((h for h in self.models.values() if h.model.task == "text_embedding"), None)
        if embedder is not None:
            reranker = BiEncoderReranker(f"{embedder.id}-bi-encoder-rerank", embedder)
            self.bi_encoder_rerankers[reranker.id] = reranker

    def _load_one(self, model_id: str, path) -> None:
        """Load the model once per configured device (a replica each, warmed up), and start every
        replica's executors on one shared scheduler: whichever replica is idle takes the next batch."""
        started = time.perf_counter()
        replicas = []
        for device in resolve_devices(self.config.device):
            replica = load_model(model_id, path, str(device), self.config.dtype, self.config.max_input_tokens,
                                 self.config.backend, self.config.quantize)
            replica.warmup()
            replicas.append(replica)
        model = replicas[0]
        device_type = model.device.type
        budget = self.config.batch_token_budget(device_type, model.max_input_tokens)
        scheduler = TokenBudgetScheduler(
            budget,
            self.config.max_batch_requests,
            self.config.queued_token_limit(device_type, budget, len(replicas)),
            on_drop=lambda reason, n: self.metrics.dropped.labels(model_id, reason).inc(n),
            spread=device_type == "cpu",
            padded=model.backend.is_padded,
        )
        executors = []
        for replica in replicas:
            # Names are unique across replicas: the scheduler keeps a drain rate per executor name.
            executors += [
                ModelExecutor(replica, scheduler, self.metrics, LANES, f"{replica.device}/main{i}",
                              threads=self.config.cpu_threads)
                for i in range(self.config.main_executors(device_type))
            ]
            # The search executor gets every core: it runs alone when the server is idle, and a short
            # query next to busy main executors costs little. CUDA stream priorities: lower is higher.
            executors.append(
                ModelExecutor(replica, scheduler, self.metrics, ("search",), f"{replica.device}/search",
                              stream_priority=-1, threads=os.cpu_count() or 1)
            )
        for executor in executors:
            executor.start()
        handle = ModelHandle(replicas, scheduler, executors)
        self.models[model.id] = handle
        for replica in replicas:
            self.metrics.set_model_info(model.id, replica.backend.name, replica.backend.precision, str(replica.device))
        log.info(
            "loaded model %s (%s, %s, %s %s on %s, max %d tokens per input, %d per batch, %d executors) in %.1fs",
            model.id, model.task, model.family, model.backend.name, model.backend.precision, ", ".join(handle.devices),
            model.max_input_tokens, budget, len(executors), time.perf_counter() - started,
        )

    def begin_drain(self) -> None:
        """Readiness false at once; new requests get 503; admitted ones finish."""
        if self.state in ("starting", "ready"):
            self.state = "draining"
            log.info("draining: %d admitted requests to finish", self.admitted)

    def shutdown(self) -> None:
        """Stop accepting work, let executors finish what is queued, release the workers."""
        self.begin_drain()
        for handle in self.models.values():
            handle.scheduler.close()
        for handle in self.models.values():
            for executor in handle.executors:
                executor.join(timeout_s=60)
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        self.state = "stopped"

    def _queue_depths(self) -> Iterator[tuple[str, str, int, int]]:
        for handle in list(self.models.values()):
            for lane, (items, tokens) in handle.scheduler.lane_depths().items():
                yield handle.id, lane, items, tokens

    # ---- admission and model lookup ---------------------------------------------------------

    def require_ready(self) -> None:
        if self.state == "ready":
            return
        if self.state == "starting":
            raise NotReady("the server is still loading its models")
        if self.state == "failed":
            raise NotReady(f"model loading failed: {self.failure}")
        raise NotReady("the server is shutting down and accepts no new requests")

    @contextlib.contextmanager
    def admission(self) -> Iterator[None]:
        """Count a request from admission to answer; refuse it when not ready or at capacity."""
        try:
            self.require_ready()
        except NotReady:
            if self.state == "draining":
                self.metrics.rejected.labels("draining").inc()
            raise
        if self.admitted >= self.config.max_concurrent_requests:
            self.metrics.rejected.labels("concurrency").inc()
            raise Overloaded(
                f"{self.admitted} requests are already in progress (--max-concurrent-requests "
                f"{self.config.max_concurrent_requests}); retry later",
                retry_after_s=1.0,
            )
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    def resolve(self, name: str | None, task: str) -> ModelHandle:
        """The model a request names, or the first model serving ``task`` when it names none."""
        self.require_ready()
        if name is not None:
            handle = self.models.get(name)
            if handle is None:
                raise ModelNotFound(f"model {name!r} is not served here; available models: {sorted(self.models)}")
            if handle.model.task != task:
                raise ValidationError(f"model {name!r} serves {handle.model.task}, not {task}")
            return self._check_end_of_life(handle)
        for handle in self.models.values():
            if handle.model.task == task:
                return self._check_end_of_life(handle)
        raise ModelNotFound(f"no model serving {task} is loaded; available models: {sorted(self.models)}")

    @staticmethod
    def _check_end_of_life(handle: ModelHandle) -> ModelHandle:
        end = handle.model.end_of_life_date
        if end is not None and dt.date.today() > end:
            raise ModelRetired(
                f"model {handle.id!r} reached its end of life on {end.isoformat()} and no longer serves requests; "
                "use a newer model"
            )
        return handle

    # ---- pipeline --------------------------------------------------------------------------

    def _check_inputs(self, inputs: list[str]) -> None:
        if not inputs:
            raise ValidationError("inputs must not be empty")
        limit = self.config.max_client_batch_size
        if len(inputs) > limit:
            raise PayloadTooLarge(
                f"batch size {len(inputs)} is larger than the maximum of {limit} inputs per request "
                "(--max-client-batch-size)"
            )
        for i, text in enumerate(inputs):
            if not text:
                raise ValidationError(f"input {i} is empty")

    def _deadline(self, timeout_s: float | None, started: float) -> float:
        if timeout_s is None:
            timeout_s = self.config.request_timeout_s
        elif not timeout_s > 0:
            raise ValidationError(f"the request timeout must be a positive number of seconds, got {timeout_s}")
        return started + timeout_s

    @staticmethod
    def _check_priority(priority: str | None) -> None:
        if priority is not None and priority not in LANES:
            raise ValidationError(f"priority must be one of {', '.join(LANES)}, got {priority!r}")

    @staticmethod
    def _lane(priority: str | None, tokenized: list[TokenizedInput]) -> str:
        """The request's lane, or by default: search for one short input, ingest otherwise."""
        if priority is not None:
            return priority
        if len(tokenized) == 1 and len(tokenized[0]) <= SEARCH_LANE_MAX_TOKENS:
            return "search"
        return "ingest"

    def _prompt(self, model: ServedModel, prompt_name: str | None) -> tuple[str | None, str]:
        name = prompt_name if prompt_name is not None else model.default_prompt_name
        if name is None:
            return None, ""
        try:
            return name, model.prompts[name]
        except KeyError:
            available = sorted(model.prompts) or "none"
            raise ValidationError(
                f"prompt_name {name!r} is not defined for model {model.id!r} (prompts: {available})"
            ) from None

    @staticmethod
    def _task(model: ServedModel, task: str | None) -> tuple[str | None, str]:
        """(the task, its instruction prefix) for multi-task models; (None, "") otherwise."""
        if task is None:
            task = model.default_task
            if task is None:
                return None, ""
        if task not in model.tasks:
            known = ", ".join(sorted(model.tasks)) or "none: this model has no tasks"
            raise ValidationError(f"task {task!r} is not a task of model {model.id!r} (tasks: {known})")
        return task, model.tasks[task]

    async def _tokenize(self, model: ServedModel, texts: list[str], truncate: bool, left: bool) -> list[TokenizedInput]:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._tokenizer_pool, model.tokenizer.encode_batch, texts, truncate, left
            )
        except InputTooLong as exc:
            raise PayloadTooLarge(str(exc)) from None

    async def _compute(
        self, handle: ModelHandle, tokenized: list[TokenizedInput], options: list, lane: str, deadline: float
    ) -> list[ItemResult]:
        """Queue one item per input and wait for all of them, at most until ``deadline``.

        Cancellation (the client went away) and timeouts cancel the item futures, which makes the
        scheduler drop whatever has not started computing.
        """
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        if deadline <= now:
            raise DeadlineExceeded("the request's deadline passed before its inputs could be queued")
        items = [
            WorkItem(tokens=t, options=o, future=loop.create_future(), loop=loop, enqueued_at=now,
                     deadline=deadline, lane=lane)
            for t, o in zip(tokenized, options)
        ]
        try:
            handle.scheduler.submit(items)
        except Overloaded:
            self.metrics.rejected.labels("queue_full").inc()
            raise
        gathered = asyncio.gather(*(item.future for item in items))
        # When the wait below is cancelled or times out, nobody reads the gather's outcome.
        gathered.add_done_callback(_consume_outcome)
        try:
            return list(await asyncio.wait_for(gathered, deadline - time.perf_counter()))
        except asyncio.TimeoutError:
            raise DeadlineExceeded(
                "the request's deadline passed before all of its inputs were computed"
            ) from None

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        started = time.perf_counter()
        with self.admission():
            handle = self.resolve(request.model, "text_embedding")
            model = handle.model
            self._check_inputs(request.inputs)
            if request.dimensions is not None and not 0 < request.dimensions <= model.dimensions:
                raise ValidationError(
                    f"dimensions must be between 1 and {model.dimensions} for model {model.id!r}, "
                    f"got {request.dimensions}"
                )
            prompt_name, prompt = self._prompt(model, request.prompt_name)
            task, instruction = self._task(model, request.task)
            prefix = instruction + prompt
            texts = [prefix + text for text in request.inputs] if prefix else request.inputs
            options = EmbedOptions(
                normalize=request.normalize,
                dimensions=request.dimensions,
                skip_leading=model.prompt_skip_tokens(prompt_name),
                task=task,
            )
            return await self._run(handle, texts, options, request.truncate, request.truncate_left,
                                   request.priority, request.timeout_s, started)

    async def embed_sparse(self, request: SparseEmbedRequest) -> EmbedResult:
        """Term ids and weights per input, heaviest first (``SparseVector``s in ``vectors``)."""
        started = time.perf_counter()
        with self.admission():
            handle = self.resolve(request.model, "sparse_embedding")
            self._check_inputs(request.inputs)
            if request.top_k is not None and request.top_k < 1:
                raise ValidationError(f"top_k must be a positive number of terms, got {request.top_k}")
            if not request.min_weight >= 0:  # also refuses NaN
                raise ValidationError(f"min_weight must be a non-negative number, got {request.min_weight}")
            options = SparseOptions(top_k=request.top_k, min_weight=request.min_weight)
            return await self._run(handle, request.inputs, options, request.truncate, request.truncate_left,
                                   request.priority, request.timeout_s, started)

    async def rerank(self, request: RerankRequest) -> RerankResult:
        """Cross-encoder scores of every document against the query (max over a long document's
        windows), a listwise model's cosines, or with the bi-encoder stand-in the cosine of their
        embeddings; best first."""
        started = time.perf_counter()
        with self.admission():
            target = self.resolve_reranker(request.model)
            self._check_rerank_request(request)
            deadline = self._deadline(request.timeout_s, started)
            self._check_priority(request.priority)
            lane = request.priority or "search"  # reranking happens at query time
            if isinstance(target, BiEncoderReranker):
                scores, truncated, tokens, stages = await self._bi_encoder_scores(target, request, lane, deadline)
            elif isinstance(target.model.runner, ListwiseReranker):
                scores, truncated, tokens, stages = await self._listwise_scores(target, request, lane, deadline)
            else:
                scores, truncated, tokens, stages = await self._cross_encoder_scores(target, request, lane, deadline)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        if request.top_n is not None:
            order = order[: request.top_n]
        tokenization_s, queue_s, inference_s = stages
        timings = Timings(tokenization_s, queue_s, inference_s, time.perf_counter() - started)
        return RerankResult(
            model=target.id,
            ranked=[Ranked(i, scores[i]) for i in order],
            input_tokens=tokens,
            input_chars=len(request.query) + sum(len(d) for d in request.documents),
            truncated=truncated,
            lane=lane,
            timings=timings,
        )

    def _check_rerank_request(self, request: RerankRequest) -> None:
        if not request.query:
            raise ValidationError("query must not be empty")
        if not request.documents:
            raise ValidationError("documents must not be empty")
        limit = self.config.max_client_batch_size
        if len(request.documents) > limit:
            raise PayloadTooLarge(
                f"{len(request.documents)} documents is more than the maximum of {limit} per request "
                "(--max-client-batch-size)"
            )
        for i, text in enumerate(request.documents):
            if not text:
                raise ValidationError(f"document {i} is empty")
        if request.top_n is not None and request.top_n < 1:
            raise ValidationError(f"top_n must be a positive number of documents, got {request.top_n}")

    async def _cross_encoder_scores(
        self, handle: ModelHandle, request: RerankRequest, lane: str, deadline: float
    ) -> tuple[list[float], list[bool], int, tuple[float, float, float]]:
        model = handle.model
        started = time.perf_counter()
        truncate = self.config.auto_truncate if request.truncate is None else request.truncate
        windows = model.rerank_windows and request.truncate is not False
        loop = asyncio.get_running_loop()
        try:
            pairs = await loop.run_in_executor(
                self._tokenizer_pool, model.tokenizer.encode_pairs, request.query, request.documents,
                model.max_query_tokens, windows, model.window_overlap_tokens, MAX_RERANK_WINDOWS, truncate or windows,
            )
        except InputTooLong as exc:
            raise PayloadTooLarge(
                f"document {exc.index} with the query is {exc.tokens} tokens, more than this model's {exc.limit}; "
                "send \"truncate\": true" if exc.index >= 0 else str(exc)
            ) from None
        tokenized_at = time.perf_counter()
        tokenized = [p.tokens for p in pairs]
        results = await self._compute(handle, tokenized, [model.runner.default_options()] * len(pairs), lane, deadline)
        best = [float("-inf")] * len(request.documents)
        truncated = [False] * len(request.documents)
        for pair, result in zip(pairs, results):
            best[pair.document] = max(best[pair.document], result.value)
            truncated[pair.document] |= pair.tokens.truncated
        scores = best if request.raw_scores else [1.0 / (1.0 + math.exp(-x)) for x in best]
        tokens = sum(len(t) for t in tokenized)
        stages = (tokenized_at - started, max(r.queue_s for r in results), max(r.inference_s for r in results))
        self.metrics.observe_inference(model.id, lane, len(results), tokens, *stages)
        return scores, truncated, tokens, stages

    async def _listwise_scores(
        self, handle: ModelHandle, request: RerankRequest, lane: str, deadline: float
    ) -> tuple[list[float], list[bool], int, tuple[float, float, float]]:
        """A listwise model (jina-reranker-v3): the documents in blocks, each block one prompt with the
        query and one work item; the blocks' vectors merged as published (models/listwise.py).

        Scores are cosines in [-1, 1], the model's published relevance scores, so ``raw_scores``
        changes nothing. Query and documents are cut to the model's caps unless the request says
        ``"truncate": false``, which makes text over a cap a 413.
        """
        model = handle.model
        runner = model.runner
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            layout = await loop.run_in_executor(
                self._tokenizer_pool, runner.build_blocks, model.tokenizer, request.query, request.documents,
                model.max_query_tokens, model.max_input_tokens, request.truncate is not False,
            )
        except InputTooLong as exc:
            what = f"document {exc.index}" if exc.index >= 0 else "the query"
            if exc.limit < model.max_input_tokens:  # over its cap, and the request said "truncate": false
                raise PayloadTooLarge(
                    f"{what} is {exc.tokens} tokens, more than this model's {exc.limit}; send \"truncate\": true"
                ) from None
            raise PayloadTooLarge(
                f"{what} does not fit this model's {exc.limit}-token prompt ({exc.tokens} tokens with the prompt)"
            ) from None
        tokenized_at = time.perf_counter()
        tokenized = [block.tokens for block in layout.blocks]
        results = await self._compute(handle, tokenized, [block.options for block in layout.blocks], lane, deadline)
        scores = runner.merge_blocks([r.value for r in results])
        tokens = sum(len(t) for t in tokenized)
        stages = (tokenized_at - started, max(r.queue_s for r in results), max(r.inference_s for r in results))
        self.metrics.observe_inference(model.id, lane, len(results), tokens, *stages)
        return scores, layout.truncated, tokens, stages

    async def _bi_encoder_scores(
        self, reranker: BiEncoderReranker, request: RerankRequest, lane: str, deadline: float
    ) -> tuple[list[float], list[bool], int, tuple[float, float, float]]:
        handle = reranker.embedder
        truncate = True if request.truncate is None else request.truncate
        embedded = await self._run(
            handle, [request.query, *request.documents], EmbedOptions(), truncate, False, lane,
            deadline - time.perf_counter(), time.perf_counter(),
        )
        query, *documents = embedded.vectors
        scores = [float(np.dot(query, d)) for d in documents]
        t = embedded.timings
        return scores, embedded.truncated[1:], embedded.input_tokens, (t.tokenization_s, t.queue_s, t.inference_s)

    def resolve_reranker(self, name: str | None) -> ModelHandle | BiEncoderReranker:
        """A cross-encoder by name or the first one loaded; else the bi-encoder stand-in."""
        self.require_ready()
        if name is not None and name in self.bi_encoder_rerankers:
            return self.bi_encoder_rerankers[name]
        if name is None and not any(h.model.task == "rerank" for h in self.models.values()):
            if self.bi_encoder_rerankers:
                return next(iter(self.bi_encoder_rerankers.values()))
        return self.resolve(name, "rerank")

    async def _run(
        self, handle: ModelHandle, texts: list[str], options: Any, truncate: bool | None, truncate_left: bool,
        priority: str | None, timeout_s: float | None, started: float,
    ) -> EmbedResult:
        """The pipeline every task shares: tokenize off the loop, pick the lane, queue, wait, account.
        Runs inside ``admission()``; ``options`` is the runner's per-input options for every input."""
        model = handle.model
        deadline = self._deadline(timeout_s, started)
        self._check_priority(priority)
        truncate = self.config.auto_truncate if truncate is None else truncate
        tokenized = await self._tokenize(model, texts, truncate, truncate_left)
        tokenized_at = time.perf_counter()
        lane = self._lane(priority, tokenized)
        results = await self._compute(handle, tokenized, [options] * len(tokenized), lane, deadline)

        tokens = sum(len(t) for t in tokenized)
        timings = Timings(
            tokenization_s=tokenized_at - started,
            queue_s=max(r.queue_s for r in results),
            inference_s=max(r.inference_s for r in results),
            total_s=time.perf_counter() - started,
        )
        self.metrics.observe_inference(
            model.id, lane, len(results), tokens, timings.tokenization_s, timings.queue_s, timings.inference_s
        )
        return EmbedResult(
            model=model.id,
            vectors=[r.value for r in results],
            input_tokens=tokens,
            input_chars=sum(len(t) for t in texts),
            truncated=[t.truncated for t in tokenized],
            lane=lane,
            timings=timings,
        )

    async def tokenize(self, request: TokenizeRequest) -> list[list[Token]]:
        handle = self._any_model(request.model)
        self._check_inputs(request.inputs)
        _, prompt = self._prompt(handle.model, request.prompt_name)
        texts = [prompt + text for text in request.inputs] if prompt else request.inputs
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._tokenizer_pool, handle.model.tokenizer.tokens, texts, request.add_special_tokens
        )

    def decode(self, request: DecodeRequest) -> list[str]:
        handle = self._any_model(request.model)
        vocab = handle.model.tokenizer.vocab_size
        for row in request.ids:
            bad = [i for i in row if not 0 <= i < vocab]
            if bad:
                raise ValidationError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        return [handle.model.tokenizer.decode(row, request.skip_special_tokens) for row in request.ids]

    def _any_model(self, name: str | None) -> ModelHandle:
        self.require_ready()
        if name is None:
            return next(iter(self.models.values()))
        try:
            return self.models[name]
        except KeyError:
            raise ModelNotFound(f"model {name!r} is not served here; available models: {sorted(self.models)}") from None

    # ---- health ----------------------------------------------------------------------------

    async def check_health(self) -> str | None:
        """None when every model can compute; otherwise the reason it cannot.

        A replica whose last batch failed is probed with a one-input forward pass on that replica
        (not through the shared queue, where another replica could answer for it) before its
        executors are reported healthy again.
        """
        try:
            self.require_ready()
        except NotReady as exc:
            return exc.message
        for handle in self.models.values():
            if not all(e.alive for e in handle.executors):
                return f"an executor of model {handle.id!r} has stopped"
            for replica in handle.replicas:
                executors = [e for e in handle.executors if e.model is replica]
                if all(e.healthy for e in executors):
                    continue
                if not await self._probe(replica):
                    where = f" on {replica.device}" if len(handle.replicas) > 1 else ""
                    return f"model {handle.id!r} cannot compute a forward pass{where}"
                for executor in executors:
                    executor.healthy = True
        return None

    @staticmethod
    async def _probe(replica: ServedModel) -> bool:
        def forward() -> None:
            replica.run_ids([replica.tokenizer.encode_batch(["health"], truncate=True)[0].ids])

        try:
            await asyncio.wait_for(asyncio.to_thread(forward), HEALTH_PROBE_TIMEOUT_S)
        except Exception:
            log.warning("health probe of model %s on %s failed", replica.id, replica.device, exc_info=True)
            return False
        return True


def _consume_outcome(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
