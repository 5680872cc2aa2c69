"""The engine: loaded models, their schedulers and executors, and the request pipeline.

admission (readiness, concurrency) → validate (server/validation.py) → tokenize (worker pool, off
the event loop) → pick a lane → queue one work item per input (admission in tokens) → executors
batch and compute → futures resolve → a canonical result. Reranking strategies live in
server/reranking.py. Dialects call the engine with canonical requests and describe models from
``Engine.info()``; the engine never sees JSON and never touches tensors itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import __version__
from ..kernels import triton_support
from ..models.checkpoint import CheckpointError
from ..models.devices import resolve_devices
from ..models.embedding import EmbedOptions
from ..models.images import ImageInputError, PreparedImage, preprocess_image
from ..models.loader import ServedModel, load_model
from ..models.repository import resolve_sources
from ..models.sparse import SparseOptions
from ..models.tokenizer import InputTooLong, Token, TokenizedInput
from .canonical import (
    DecodeRequest,
    EmbedInput,
    EmbedRequest,
    EmbedResult,
    ImageInput,
    InputGroup,
    PredictRequest,
    Ranked,
    RerankRequest,
    RerankResult,
    SparseEmbedRequest,
    Timings,
    TokenizeRequest,
    as_list,
    spell_token,
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
from .executor import ItemResult, Lenders, ModelExecutor
from .image_input import PixelBudget, RequestBytes, encoded_size, fetch_image, image_error
from .info import ModelInfo, ServerInfo, ServerLimits, describe_bi_encoder, describe_model
from .metrics import Metrics
from .reranking import BiEncoderReranker, strategy_for
from .scheduler import LANES, TokenBudgetScheduler, WorkItem
from .validation import (
    check_dimensions,
    check_embed_inputs,
    check_inputs,
    check_priority,
    check_rerank_request,
    check_sparse_options,
    request_deadline,
    resolve_prompt,
    resolve_task,
)

log = logging.getLogger("infercore.engine")

HEALTH_PROBE_TIMEOUT_S = 30.0
# A request with one input of at most this many tokens and no explicit lane is a search.
SEARCH_LANE_MAX_TOKENS = 64


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

    @functools.cached_property
    def spelled_vocabulary(self) -> list[str]:
        """Every token id's text as sparse results spell it (``canonical.spell_token``), built once."""
        return [spell_token(token) for token in self.model.tokenizer.vocabulary]


class Engine:
    def __init__(self, config: ServerConfig, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self.models: dict[str, ModelHandle] = {}
        self.bi_encoder_rerankers: dict[str, BiEncoderReranker] = {}
        self.state = "starting"  # starting → ready → draining → stopped; or failed
        self.failure: str | None = None
        self._info: ServerInfo | None = None  # built once loading ends
        # Requests between admission and their answer (tokenizing, queued or computing).
        self.admitted = 0
        self._tokenizer_pool = ThreadPoolExecutor(config.tokenization_workers, thread_name_prefix="tokenize")
        # Images decode on a pool of their own: a decode waiting for room in the pixel budget must not
        # hold up the tokenization of text requests.
        self._image_pool = ThreadPoolExecutor(config.tokenization_workers, thread_name_prefix="decode-image")
        self._pixels = PixelBudget(config.max_decoding_pixels)
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
        self._info = self._describe()
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

    def _describe(self) -> ServerInfo:
        """What front ends may know, from the loaded models and the settings."""
        models: list[ModelInfo] = []
        defaults: set[str] = set()
        for handle in self.models.values():
            models.append(describe_model(handle.model, handle.devices, handle.scheduler.max_batch_tokens,
                                         is_default=handle.model.task not in defaults))
            defaults.add(handle.model.task)
        for reranker in self.bi_encoder_rerankers.values():
            embedder = next(info for info in models if info.id == reranker.embedder.id)
            models.append(describe_bi_encoder(reranker.id, reranker.description, embedder,
                                              is_default="rerank" not in defaults))
            defaults.add("rerank")
        config = self.config
        limits = ServerLimits(
            max_client_batch_size=config.max_client_batch_size,
            max_concurrent_requests=config.max_concurrent_requests,
            max_batch_requests=config.max_batch_requests,
            payload_limit_bytes=config.payload_limit_bytes,
            auto_truncate=config.auto_truncate,
            request_timeout_s=config.request_timeout_s,
            tokenization_workers=config.tokenization_workers,
            grpc_stream_max_in_flight=config.grpc_stream_max_in_flight,
            max_image_request_bytes=config.max_image_request_bytes,
            image_url_hosts=config.image_url_hosts,
        )
        backends = tuple(sorted({info.backend for info in models}))
        return ServerInfo(__version__, backends, tuple(models), limits, dict(triton_support.disabled()))

    def info(self) -> ServerInfo:
        """The server's and every served model's description (NotReady until loading ends)."""
        self.require_ready()
        assert self._info is not None
        return self._info

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
            # CPU: a batch may run on the idle main executors' cores too (ModelExecutor._widen_for).
            lenders = Lenders(LANES, self.config.cpu_threads)
            executors += [
                ModelExecutor(replica, scheduler, self.metrics, LANES, f"{replica.device}/main{i}",
                              threads=self.config.cpu_threads, lenders=lenders)
                for i in range(self.config.main_executors(device_type))
            ]
            # The search executor runs beside the main ones: on CPU, one thread on no core of its own,
            # the idle main executors' cores when it can borrow them (every core when the server is
            # idle). CUDA stream priorities: lower is higher.
            executors.append(
                ModelExecutor(replica, scheduler, self.metrics, ("search",), f"{replica.device}/search",
                              stream_priority=-1, threads=1, lenders=lenders, own_cores=0)
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
        self._image_pool.shutdown(wait=False, cancel_futures=True)
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

    @staticmethod
    def _lane(priority: str | None, tokenized: list[TokenizedInput | PreparedImage]) -> str:
        """The request's lane, or by default: search for one short text, ingest otherwise (an image
        costs far more than a short query)."""
        if priority is not None:
            return priority
        if len(tokenized) == 1 and isinstance(tokenized[0], TokenizedInput) \
                and len(tokenized[0]) <= SEARCH_LANE_MAX_TOKENS:
            return "search"
        return "ingest"

    async def off_loop(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` on the tokenizer pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, function, *args)

    async def _tokenize(self, model: ServedModel, texts: list[str], truncate: bool, left: bool) -> list[TokenizedInput]:
        try:
            return await self.off_loop(model.tokenizer.encode_batch, texts, truncate, left)
        except InputTooLong as exc:
            raise PayloadTooLarge(str(exc)) from None

    async def compute(
        self, handle: ModelHandle, tokenized: list[TokenizedInput | PreparedImage], options: list, lane: str,
        deadline: float,
    ) -> list[ItemResult]:
        """Queue one item per input (a text's tokens or a prepared image) and wait for all of them, at
        most until ``deadline``.

        Cancellation (the client went away) and timeouts cancel the item futures, which makes the
        scheduler drop whatever has not started computing.
        """
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        if deadline <= now:
            raise DeadlineExceeded("the request's deadline passed before its inputs could be queued")
        items = [
            WorkItem(tokens=None if isinstance(t, PreparedImage) else t, options=o, future=loop.create_future(),
                     loop=loop, enqueued_at=now, deadline=deadline, lane=lane,
                     image=t if isinstance(t, PreparedImage) else None)
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
        """One vector per input, in order: texts (with the prompt and task), images (models with an
        image tower) and groups of both (``InputGroup``: the normalised mean of the items' vectors)."""
        started = time.perf_counter()
        with self.admission():
            handle = self.resolve(request.model, "text_embedding")
            model = handle.model
            if request.input_ids is not None:
                check_inputs(request.input_ids, self.config.max_client_batch_size)
                check_dimensions(request, model)
                return await self._embed_ids(handle, request, started)
            flat, groups = _flatten(request.inputs)
            check_embed_inputs(request.inputs, flat, self.config.max_client_batch_size)
            check_dimensions(request, model)
            if model.images is None:
                first = next((i for i, x in enumerate(request.inputs) if _has_image(x)), None)
                if first is not None:
                    raise ValidationError(
                        f"model {model.id!r} takes text only and cannot embed images (input {first} holds an image)"
                    )
            prompt_name, prompt = resolve_prompt(model, request.prompt_name)
            task, instruction = resolve_task(model, request.task)
            prefix = instruction + prompt
            if all(isinstance(x, str) for x in request.inputs):
                texts = [prefix + text for text in request.inputs] if prefix else request.inputs
                options = EmbedOptions(
                    normalize=request.normalize,
                    dimensions=request.dimensions,
                    skip_leading=model.prompt_skip_tokens(prompt_name),
                    task=task,
                    per_token=request.per_token,
                )
                return await self._run(handle, texts, options, request.truncate, request.truncate_left,
                                       request.priority, request.timeout_s, started)
            # Items of a group of several are normalised before their mean (canonical.InputGroup).
            grouped = {i for start, count in groups if count > 1 for i in range(start, start + count)}
            text_options = [
                EmbedOptions(normalize=request.normalize or i in grouped, dimensions=request.dimensions,
                             skip_leading=model.prompt_skip_tokens(prompt_name), task=task)
                for i in range(len(flat))
            ]
            image_options = [
                EmbedOptions(normalize=request.normalize or i in grouped, dimensions=request.dimensions)
                for i in range(len(flat))
            ]
            inputs = [prefix + x if isinstance(x, str) and prefix else x for x in flat]
            options = [image_options[i] if isinstance(x, ImageInput) else text_options[i] for i, x in enumerate(flat)]
            result = await self._run_mixed(handle, inputs, options, request, started)
            return _combine_groups(result, groups, request.normalize)

    async def _run_mixed(self, handle: ModelHandle, inputs: list[str | ImageInput], options: list[EmbedOptions],
                         request: EmbedRequest, started: float) -> EmbedResult:
        """``_run`` for a request holding images: texts tokenized and images decoded off the loop
        (concurrently), then every input queued at once, in order."""
        model = handle.model
        until = request_deadline(request.timeout_s, self.config.request_timeout_s, started)
        check_priority(request.priority)
        truncate = self.config.auto_truncate if request.truncate is None else request.truncate
        text_at = [i for i, x in enumerate(inputs) if isinstance(x, str)]
        image_at = [i for i, x in enumerate(inputs) if isinstance(x, ImageInput)]
        tokenizing = self._tokenize(model, [inputs[i] for i in text_at], truncate, request.truncate_left) \
            if text_at else _nothing()
        decoding = self._prepare_images(model, [(i, inputs[i]) for i in image_at], until)
        tokenized, prepared = await _both(tokenizing, decoding)
        prepared_at = time.perf_counter()
        payloads: list[TokenizedInput | PreparedImage] = [None] * len(inputs)  # type: ignore[list-item]
        for i, t in zip(text_at, tokenized):
            payloads[i] = t
        for i, image in zip(image_at, prepared):
            payloads[i] = image
        lane = self._lane(request.priority, payloads)
        results = await self.compute(handle, payloads, options, lane, until)

        tokens = sum(len(p) if isinstance(p, TokenizedInput) else p.tokens for p in payloads)
        timings = self._account(model.id, lane, results, tokens, started, prepared_at)
        log.debug("embedded %d texts and %d images (%s) with model %s", len(text_at), len(image_at),
                  ", ".join(f"{p.format} {p.width}x{p.height}" for p in prepared), model.id)
        return EmbedResult(
            model=model.id,
            vectors=[r.value for r in results],
            input_tokens=tokens,
            input_chars=sum(len(inputs[i]) for i in text_at),
            truncated=[isinstance(p, TokenizedInput) and p.truncated for p in payloads],
            lane=lane,
            timings=timings,
        )

    async def _prepare_images(self, model: ServedModel, images: list[tuple[int, ImageInput]],
                              deadline: float) -> list[PreparedImage]:
        """Each image fetched (allowed URLs only) and decoded on the image pool, bounded by the pixel
        budget; the first problem fails the request (422 naming the input, 413 for sizes). Every
        image's decoding is awaited, even after one failed, so none is left holding the budget."""
        processor = model.image_processor
        max_bytes = processor.limits.max_bytes
        request_bytes = RequestBytes(self.config.max_image_request_bytes)
        request_bytes.add(sum(encoded_size(image) for _, image in images))

        async def one(index: int, image: ImageInput) -> PreparedImage:
            data = image.data
            if image.is_url:
                data = await fetch_image(data, self.config.image_url_hosts, max_bytes, self.config.image_url_timeout_s)
                request_bytes.add(len(data))

            def decode() -> PreparedImage:
                return preprocess_image(data, processor, lambda pixels: self._pixels.reserve(pixels, deadline))

            try:
                return await asyncio.get_running_loop().run_in_executor(self._image_pool, decode)
            except ImageInputError as exc:
                raise image_error(index, exc) from None

        outcomes = await asyncio.gather(*(one(i, image) for i, image in images), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return list(outcomes)

    async def _embed_ids(self, handle: ModelHandle, request: EmbedRequest, started: float) -> EmbedResult:
        """Token-id input: each row checked against the model's vocabulary and token limit (cut
        on the right when truncation is on, else a 413), then embedded as given."""
        model = handle.model
        if request.prompt_name is not None:
            raise ValidationError("token-id input is embedded as given: prepend the prompt's tokens instead "
                                  "of sending prompt_name")
        task, _ = resolve_task(model, request.task)  # the task's adapter; its instruction is not added
        vocab = model.tokenizer.vocab_size
        limit = model.max_input_tokens
        truncate = self.config.auto_truncate if request.truncate is None else request.truncate
        tokenized = []
        for i, row in enumerate(request.input_ids):
            bad = next((t for t in row if not 0 <= t < vocab), None)
            if bad is not None:
                raise ValidationError(
                    f"input {i}: token id {bad} is outside the vocabulary of model {model.id!r} (0..{vocab - 1}); "
                    "token ids are in the model's own vocabulary (POST /tokenize)"
                )
            cut = len(row) > limit
            if cut and not truncate:
                raise PayloadTooLarge(
                    f"input {i} is too long: {len(row)} tokens; this model accepts at most {limit} tokens per "
                    "input. Send shorter inputs or set \"truncate\": true"
                )
            ids = row[-limit:] if request.truncate_left else row[:limit]
            tokenized.append(TokenizedInput(ids, [0] * len(ids), cut))
        options = EmbedOptions(normalize=request.normalize, dimensions=request.dimensions, task=task)
        return await self._run(handle, [], options, truncate, False, request.priority, request.timeout_s, started,
                               tokenized=tokenized)

    async def embed_sparse(self, request: SparseEmbedRequest) -> EmbedResult:
        """Term ids and weights per input, heaviest first (``SparseVector``s in ``vectors``), and with
        ``return_terms`` their tokens (``terms``)."""
        started = time.perf_counter()
        with self.admission():
            handle = self.resolve(request.model, "sparse_embedding")
            check_inputs(request.inputs, self.config.max_client_batch_size)
            check_sparse_options(request)
            options = SparseOptions(top_k=request.top_k, min_weight=request.min_weight)
            result = await self._run(handle, request.inputs, options, request.truncate, request.truncate_left,
                                     request.priority, request.timeout_s, started)
            if request.return_terms:
                vocabulary = handle.spelled_vocabulary
                result.terms = [[vocabulary[i] for i in vector.ids.tolist()] for vector in result.vectors]
            return result

    async def rerank(self, request: RerankRequest) -> RerankResult:
        """Cross-encoder scores of every document against the query (max over a long document's
        windows), a listwise model's cosines, or with the bi-encoder stand-in the cosine of their
        embeddings; best first."""
        started = time.perf_counter()
        with self.admission():
            target = self.resolve_reranker(request.model)
            check_rerank_request(request, self.config.max_client_batch_size)
            until = request_deadline(request.timeout_s, self.config.request_timeout_s, started)
            check_priority(request.priority)
            lane = request.priority or "search"  # reranking happens at query time
            scored = await strategy_for(target)(self, target, request, lane, until)
        scores = scored.scores
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        if request.top_n is not None:
            order = order[: request.top_n]
        timings = Timings(scored.tokenization_s, scored.queue_s, scored.inference_s, time.perf_counter() - started)
        return RerankResult(
            model=target.id,
            ranked=[Ranked(i, scores[i]) for i in order],
            input_tokens=scored.tokens,
            input_chars=len(request.query) + sum(len(d) for d in request.documents),
            truncated=scored.truncated,
            lane=lane,
            timings=timings,
        )

    async def predict(self, request: PredictRequest) -> EmbedResult:
        """A cross-encoder's logit per input (``vectors`` holds floats): single texts, or pairs in the
        model's pair template with the first text cut to the model's query cap. Listwise models and
        the bi-encoder stand-in score lists, not sequences, and are refused."""
        started = time.perf_counter()
        with self.admission():
            handle = self.resolve(request.model, "rerank")
            model = handle.model
            if model.runner.listwise:
                raise ValidationError(f"model {model.id!r} is a listwise reranker: it scores a query against "
                                      "documents (POST /rerank), not single sequences")
            check_inputs([t for item in request.inputs for t in as_list(item)],
                         self.config.max_client_batch_size)
            truncate = self.config.auto_truncate if request.truncate is None else request.truncate

            def tokenize() -> list[TokenizedInput]:
                tokenized = []
                for i, item in enumerate(request.inputs):
                    try:
                        if isinstance(item, str):
                            tokenized.append(model.tokenizer.encode_batch([item], truncate)[0])
                        else:
                            pair = model.tokenizer.encode_pairs(item[0], [item[1]], model.max_query_tokens, False,
                                                                model.window_overlap_tokens, 1, truncate)
                            tokenized.append(pair[0].tokens)
                    except InputTooLong as exc:
                        raise PayloadTooLarge(
                            f"input {i} is {exc.tokens} tokens, more than this model's {exc.limit}; "
                            "send \"truncate\": true"
                        ) from None
                return tokenized

            tokenized = await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, tokenize)
            return await self._run(handle, [], model.runner.default_options(), truncate, False, request.priority,
                                   request.timeout_s, started, tokenized=tokenized)

    # ---- what reranking strategies use (server/reranking.py RerankPipeline) ------------------

    @property
    def auto_truncate(self) -> bool:
        return self.config.auto_truncate

    def observe(self, model_id: str, lane: str, items: int, tokens: int, stages: tuple[float, float, float]) -> None:
        self.metrics.observe_inference(model_id, lane, items, tokens, *stages)

    async def embed_for_rerank(
        self, handle: ModelHandle, texts: list[str], options: EmbedOptions, truncate: bool, lane: str, until: float
    ) -> EmbedResult:
        return await self._run(handle, texts, options, truncate, False, lane, until - time.perf_counter(),
                               time.perf_counter())

    def resolve_reranker(self, name: str | None) -> ModelHandle | BiEncoderReranker:
        """A cross-encoder by name or the first one loaded; else the bi-encoder stand-in."""
        self.require_ready()
        if name is not None and name in self.bi_encoder_rerankers:
            return self.bi_encoder_rerankers[name]
        if name is None and not any(h.model.task == "rerank" for h in self.models.values()):
            if self.bi_encoder_rerankers:
                return next(iter(self.bi_encoder_rerankers.values()))
        return self.resolve(name, "rerank")

    def _account(self, model_id: str, lane: str, results: list, tokens: int, started: float,
                 prepared_at: float) -> Timings:
        """A request's stage times (the slowest input counts for queue and inference), recorded in
        the metrics: what every embedding pipeline reports once its inputs are computed."""
        timings = Timings(
            tokenization_s=prepared_at - started,
            queue_s=max(r.queue_s for r in results),
            inference_s=max(r.inference_s for r in results),
            total_s=time.perf_counter() - started,
        )
        self.metrics.observe_inference(
            model_id, lane, len(results), tokens, timings.tokenization_s, timings.queue_s, timings.inference_s
        )
        return timings

    async def _run(
        self, handle: ModelHandle, texts: list[str], options: Any, truncate: bool | None, truncate_left: bool,
        priority: str | None, timeout_s: float | None, started: float,
        tokenized: list[TokenizedInput] | None = None,
    ) -> EmbedResult:
        """The pipeline every task shares: tokenize off the loop, pick the lane, queue, wait, account.
        Runs inside ``admission()``; ``options`` is the runner's per-input options for every input.
        ``tokenized``: inputs already in token ids (``texts`` is then empty)."""
        model = handle.model
        until = request_deadline(timeout_s, self.config.request_timeout_s, started)
        check_priority(priority)
        truncate = self.config.auto_truncate if truncate is None else truncate
        if tokenized is None:
            tokenized = await self._tokenize(model, texts, truncate, truncate_left)
        tokenized_at = time.perf_counter()
        lane = self._lane(priority, tokenized)
        results = await self.compute(handle, tokenized, [options] * len(tokenized), lane, until)

        tokens = sum(len(t) for t in tokenized)
        timings = self._account(model.id, lane, results, tokens, started, tokenized_at)
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
        check_inputs(request.inputs, self.config.max_client_batch_size)
        _, prompt = resolve_prompt(handle.model, request.prompt_name)
        texts = [prompt + text for text in request.inputs] if prompt else request.inputs
        return await self.off_loop(handle.model.tokenizer.tokens, texts, request.add_special_tokens)

    async def cut_to_tokens(self, model: str, texts: list[str], max_tokens: int, keep_end: bool) -> list[str]:
        """Cohere's ``max_tokens`` / ``max_tokens_per_doc``: each text cut to its first (with
        ``keep_end`` its last) ``max_tokens`` tokens of served model ``model``'s tokenizer (no prompt,
        no special tokens), at the character offsets the tokenizer reports."""
        if max_tokens < 1:
            raise ValidationError(f"the token cap must be a positive number of tokens, got {max_tokens}")
        handle = self._any_model(model)
        rows = await self.off_loop(handle.model.tokenizer.tokens, texts, False)
        cut = []
        for text, tokens in zip(texts, rows):
            if len(tokens) <= max_tokens:
                cut.append(text)
            elif keep_end:
                cut.append(text[tokens[-max_tokens].start or 0:])
            else:
                cut.append(text[: tokens[max_tokens - 1].stop])
        return cut

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


def _flatten(inputs: list[EmbedInput]) -> tuple[list[str | ImageInput], list[tuple[int, int]]]:
    """Every text and image of a request in order, and per request input its (start, count) in them."""
    flat: list[str | ImageInput] = []
    groups = []
    for item in inputs:
        members = item.items if isinstance(item, InputGroup) else (item,)
        groups.append((len(flat), len(members)))
        flat.extend(members)
    return flat, groups


def _has_image(item: EmbedInput) -> bool:
    if isinstance(item, InputGroup):
        return any(isinstance(member, ImageInput) for member in item.items)
    return isinstance(item, ImageInput)


def _combine_groups(result: EmbedResult, groups: list[tuple[int, int]], normalize: bool) -> EmbedResult:
    """One vector per request input: a group's items' (normalised) vectors averaged, then normalised
    when the request normalises (canonical.InputGroup); ``truncated`` per group: any item cut."""
    if all(count == 1 for _, count in groups):
        return result
    vectors, truncated = [], []
    for start, count in groups:
        members = result.vectors[start:start + count]
        if count == 1:
            vectors.append(members[0])
        else:
            mean = np.mean(np.stack(members), axis=0, dtype=np.float32)
            if normalize:
                mean /= max(float(np.linalg.norm(mean)), 1e-12)
            vectors.append(mean)
        truncated.append(any(result.truncated[start:start + count]))
    result.vectors, result.truncated = vectors, truncated
    return result


async def _nothing() -> list:
    return []


async def _both(first: Awaitable, second: Awaitable) -> tuple[Any, Any]:
    """Await both concurrently; if either fails, the other is still awaited (so no decode is left
    holding the pixel budget unobserved), then the first failure is raised."""
    outcomes = await asyncio.gather(first, second, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes[0], outcomes[1]


def _consume_outcome(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
