"""The engine: loaded models, their schedulers and executors, and the request pipeline.

validate → tokenize (worker pool, off the event loop) → queue one work item per input → the model's
executor batches and computes → futures resolve → a canonical result. Dialects call the engine
with canonical requests; the engine never sees JSON and never touches tensors itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..models.checkpoint import CheckpointError
from ..models.embedding import EmbedOptions
from ..models.loader import ServedModel, load_model
from ..models.repository import resolve_sources
from ..models.tokenizer import InputTooLong, Token, TokenizedInput
from .canonical import DecodeRequest, EmbedRequest, EmbedResult, Timings, TokenizeRequest
from .config import ServerConfig
from .errors import BackendError, ModelNotFound, NotReady, PayloadTooLarge, ValidationError
from .executor import ItemResult, ModelExecutor
from .metrics import Metrics
from .scheduler import TokenBudgetScheduler, WorkItem

log = logging.getLogger("infercore.engine")

HEALTH_PROBE_TIMEOUT_S = 30.0


@dataclass
class ModelHandle:
    model: ServedModel
    scheduler: TokenBudgetScheduler
    executor: ModelExecutor

    @property
    def id(self) -> str:
        return self.model.id


class Engine:
    def __init__(self, config: ServerConfig, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self.models: dict[str, ModelHandle] = {}
        self.state = "starting"  # starting → ready → draining → stopped; or failed
        self.failure: str | None = None
        self._tokenizer_pool = ThreadPoolExecutor(config.tokenization_workers, thread_name_prefix="tokenize")

    # ---- lifecycle -------------------------------------------------------------------------

    def load(self) -> None:
        """Load, warm up and start every configured model (blocking). Sets state to ready or failed."""
        if self.config.cpu_threads:
            torch.set_num_threads(self.config.cpu_threads)
        try:
            sources = resolve_sources(self.config.models, self.config.models_dir)
            for source in sources:
                started = time.perf_counter()
                model = load_model(
                    source.id, source.path, self.config.device, self.config.dtype, self.config.max_input_tokens
                )
                model.warmup()
                budget = self.config.batch_token_budget(model.device.type, model.max_input_tokens)
                scheduler = TokenBudgetScheduler(budget, self.config.max_batch_requests)
                executor = ModelExecutor(model, scheduler, self.metrics)
                executor.start()
                self.models[model.id] = ModelHandle(model, scheduler, executor)
                log.info(
                    "loaded model %s (%s, %s, %s on %s, max %d tokens per input, %d per batch) in %.1fs",
                    model.id, model.task, model.family, str(model.dtype).removeprefix("torch."),
                    model.device, model.max_input_tokens, budget, time.perf_counter() - started,
                )
        except CheckpointError as exc:
            self.failure = str(exc)
            self.state = "failed"
            raise
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            raise
        self.state = "ready"

    def shutdown(self) -> None:
        """Stop accepting work, let executors finish what is queued, release the workers."""
        if self.state == "ready":
            self.state = "draining"
        for handle in self.models.values():
            handle.executor.stop(timeout_s=60)
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        self.state = "stopped"

    # ---- model lookup ----------------------------------------------------------------------

    def require_ready(self) -> None:
        if self.state == "ready":
            return
        if self.state == "starting":
            raise NotReady("the server is still loading its models")
        if self.state == "failed":
            raise NotReady(f"model loading failed: {self.failure}")
        raise NotReady("the server is shutting down")

    def resolve(self, name: str | None, task: str) -> ModelHandle:
        """The model a request names, or the first model serving ``task`` when it names none."""
        self.require_ready()
        if name is not None:
            handle = self.models.get(name)
            if handle is None:
                raise ModelNotFound(f"model {name!r} is not served here; available models: {sorted(self.models)}")
            if handle.model.task != task:
                raise ValidationError(f"model {name!r} serves {handle.model.task}, not {task}")
            return handle
        for handle in self.models.values():
            if handle.model.task == task:
                return handle
        raise ModelNotFound(f"no model serving {task} is loaded; available models: {sorted(self.models)}")

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

    async def _tokenize(self, model: ServedModel, texts: list[str], truncate: bool, left: bool) -> list[TokenizedInput]:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._tokenizer_pool, model.tokenizer.encode_batch, texts, truncate, left
            )
        except InputTooLong as exc:
            raise PayloadTooLarge(str(exc)) from None

    async def _compute(self, handle: ModelHandle, tokenized: list[TokenizedInput], options: list) -> list[ItemResult]:
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        items = [
            WorkItem(tokens=t, options=o, future=loop.create_future(), loop=loop, enqueued_at=now)
            for t, o in zip(tokenized, options)
        ]
        handle.scheduler.submit(items)
        return list(await asyncio.gather(*(item.future for item in items)))

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        started = time.perf_counter()
        handle = self.resolve(request.model, "text_embedding")
        model = handle.model
        self._check_inputs(request.inputs)
        if request.dimensions is not None and not 0 < request.dimensions <= model.dimensions:
            raise ValidationError(
                f"dimensions must be between 1 and {model.dimensions} for model {model.id!r}, got {request.dimensions}"
            )
        prompt_name, prompt = self._prompt(model, request.prompt_name)
        texts = [prompt + text for text in request.inputs] if prompt else request.inputs
        truncate = self.config.auto_truncate if request.truncate is None else request.truncate

        tokenized = await self._tokenize(model, texts, truncate, request.truncate_left)
        tokenized_at = time.perf_counter()
        options = EmbedOptions(
            normalize=request.normalize,
            dimensions=request.dimensions,
            skip_leading=model.prompt_skip_tokens(prompt_name),
        )
        results = await self._compute(handle, tokenized, [options] * len(tokenized))

        tokens = sum(len(t) for t in tokenized)
        timings = Timings(
            tokenization_s=tokenized_at - started,
            queue_s=max(r.queue_s for r in results),
            inference_s=max(r.inference_s for r in results),
            total_s=time.perf_counter() - started,
        )
        self.metrics.observe_inference(
            model.id, len(results), tokens, timings.tokenization_s, timings.queue_s, timings.inference_s
        )
        return EmbedResult(
            model=model.id,
            vectors=[r.value for r in results],
            input_tokens=tokens,
            input_chars=sum(len(t) for t in texts),
            truncated=[t.truncated for t in tokenized],
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

        A model whose last batch failed is probed with a one-input forward pass before it is
        reported healthy again.
        """
        try:
            self.require_ready()
        except NotReady as exc:
            return exc.message
        for handle in self.models.values():
            if not handle.executor.alive:
                return f"the executor of model {handle.id!r} has stopped"
            if handle.executor.healthy:
                continue
            probe = handle.model.tokenizer.encode_batch(["health"], truncate=True)
            try:
                await asyncio.wait_for(self._compute(handle, probe, [EmbedOptions()]), HEALTH_PROBE_TIMEOUT_S)
            except (BackendError, asyncio.TimeoutError):
                return f"model {handle.id!r} cannot compute a forward pass"
        return None
