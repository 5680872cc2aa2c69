"""What front ends may know about the server and its models: ``ServerInfo`` and ``ModelInfo``.

The engine builds one ``ServerInfo`` when its models are loaded; every dialect (HTTP and gRPC)
describes models, picks defaults and checks names from it, and never reads the engine's loaded
models or imports ``infercore.models``. A fact a front end needs about a model is a field here,
filled from the model once.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..models.contract import TASKS as MODEL_TASKS
from .errors import ModelNotFound, ValidationError

if TYPE_CHECKING:
    from ..models.loader import ServedModel

# The tasks a model can serve, in the order front ends list them: the one list, defined by the model
# contract (models/contract.py) and re-exported here so that dialects need not import models/.
TASKS: tuple[str, ...] = MODEL_TASKS

# Default task / prompt that search and ingest traffic get on models that embed queries and
# documents differently (jina-embeddings-v3's retrieval.query / retrieval.passage adapters, the
# query / passage (document) prompts of e5 and jina-embeddings-v5), first match wins.
LANE_TASKS = {"search": ("retrieval.query",), "ingest": ("retrieval.passage",)}
LANE_PROMPTS = {"search": ("query",), "ingest": ("passage", "document")}

# Reranker kinds: a cross-encoder's logits, a listwise model's cosines, the bi-encoder stand-in.
CROSS_ENCODER, LISTWISE, BI_ENCODER = "cross-encoder", "listwise", "bi-encoder"


@dataclass(frozen=True)
class ModelInfo:
    """One servable model (or the bi-encoder reranking stand-in) as front ends describe it."""

    id: str
    task: str
    family: str
    description: str
    max_input_tokens: int
    dtype: str  # "float32", "bfloat16", ...
    # The first replica's device, and every device the model has a replica on.
    device: str
    devices: tuple[str, ...]
    # What computes the model (torch | onnx) and at which precision (the torch dtype; onnx: float32 or
    # int8), and for onnx its parity figures against the torch path (models/onnx_quality.py; None for torch).
    backend: str = "torch"
    precision: str = "float32"
    quality: dict[str, Any] | None = None
    # The first served model of a task answers requests that name no model.
    is_default: bool = False
    # The catalog entry the model was matched to (by id, alias, catalog_id setting, config.json or
    # directory name); None when it matched none, and for the bi-encoder stand-in.
    catalog_id: str | None = None
    # Output width (dense: the vector, sparse: the vocabulary); None for the bi-encoder stand-in.
    dimensions: int | None = None
    matryoshka_dimensions: tuple[int, ...] = ()
    similarity: str = "cosine"
    pooling: str | None = None
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    tasks: tuple[str, ...] = ()  # sorted
    default_task: str | None = None
    end_of_life_date: dt.date | None = None
    max_batch_tokens: int | None = None
    # Whether the model embeds images too (jina-clip-v2: text and image vectors in one space), and
    # what one image costs in its token budget (the vision tower's patches + CLS).
    image_input: bool = False
    image_tokens: int | None = None
    # rerank only
    reranker_kind: str | None = None
    max_query_tokens: int | None = None
    rerank_windows: bool = False
    window_overlap_tokens: int | None = None
    embedding_model: str | None = None  # the bi-encoder stand-in's embedding model

    @property
    def modalities(self) -> tuple[str, ...]:
        """What the model embeds: ("text",) or ("text", "image")."""
        return ("text", "image") if self.image_input else ("text",)

    def lane_defaults(self, lane: str | None) -> tuple[str | None, str | None]:
        """(task, prompt name) that ``lane``'s traffic gets when the request names neither:
        search → the query task / prompt, ingest → the passage (document) one; (None, None) for
        other lanes and for models without them."""
        if lane not in LANE_TASKS:
            return None, None
        task = next((t for t in LANE_TASKS[lane] if t in self.tasks), None)
        prompt = next((p for p in LANE_PROMPTS[lane] if p in self.prompts), None)
        return task, prompt


@dataclass(frozen=True)
class ServerLimits:
    """The server-wide settings clients plan their requests with."""

    max_client_batch_size: int
    max_concurrent_requests: int
    max_batch_requests: int | None
    payload_limit_bytes: int
    auto_truncate: bool
    request_timeout_s: float
    tokenization_workers: int
    grpc_stream_max_in_flight: int
    # Image input: encoded image bytes per request, and the hosts image URLs may name (empty: URLs refused).
    max_image_request_bytes: int = 0
    image_url_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServerInfo:
    """Everything served, built once when loading ends. ``models`` in serving order: within a
    task, the default first and cross-encoders before the bi-encoder stand-in."""

    version: str
    # The backends the models run on (sorted: "torch", "onnx" or both).
    backends: tuple[str, ...]
    models: tuple[ModelInfo, ...]
    limits: ServerLimits
    # Triton kernels the start-up self-check switched off (their torch reference runs instead).
    kernels_switched_off: dict[str, str] = field(default_factory=dict)

    def model(self, model_id: str) -> ModelInfo:
        for info in self.models:
            if info.id == model_id:
                return info
        raise ModelNotFound(f"model {model_id!r} is not served here; available models: {sorted(self.ids)}")

    def serving(self, model_id: str | None, task: str) -> ModelInfo:
        """The model a request for ``task`` gets, as the engine resolves it: the one it names (which
        must serve ``task``), else the task's default. ModelNotFound / ValidationError otherwise."""
        if model_id is None:
            info = next((m for m in self.models if m.task == task and m.is_default), None)
            if info is None:
                raise ModelNotFound(f"no model serving {task} is loaded; available models: {sorted(self.ids)}")
            return info
        info = self.model(model_id)
        if info.task != task:
            raise ValidationError(f"model {model_id!r} serves {info.task}, not {task}")
        return info

    def find(self, model_id: str) -> ModelInfo | None:
        return next((info for info in self.models if info.id == model_id), None)

    @property
    def ids(self) -> list[str]:
        return [info.id for info in self.models]

    @property
    def default(self) -> ModelInfo:
        """The model of requests that name none and need no particular task (tokenize, decode)."""
        return self.models[0]


def describe_model(model: ServedModel, devices: list[str], max_batch_tokens: int, is_default: bool) -> ModelInfo:
    """A loaded model's description, from its first replica."""
    rerank = model.task == "rerank"
    return ModelInfo(
        id=model.id,
        task=model.task,
        family=model.family,
        description=model.description,
        max_input_tokens=model.max_input_tokens,
        dtype=dtype_name(model.dtype),
        device=str(model.device),
        devices=tuple(devices),
        backend=model.backend.name,
        precision=model.backend.precision,
        quality=dict(model.quality) if model.quality is not None else None,
        is_default=is_default,
        catalog_id=model.catalog.id if model.catalog else None,
        dimensions=model.dimensions,
        matryoshka_dimensions=tuple(model.matryoshka_dimensions),
        similarity=model.settings.similarity,
        pooling=model.runner.pooling,
        prompts=dict(model.prompts),
        default_prompt_name=model.default_prompt_name,
        tasks=tuple(sorted(model.tasks)),
        default_task=model.default_task,
        end_of_life_date=model.end_of_life_date,
        max_batch_tokens=max_batch_tokens,
        image_input=model.images is not None,
        image_tokens=model.images.tokens_per_image if model.images is not None else None,
        reranker_kind=(LISTWISE if model.runner.listwise else CROSS_ENCODER) if rerank else None,
        max_query_tokens=model.max_query_tokens if rerank else None,
        rerank_windows=model.rerank_windows if rerank else False,
        window_overlap_tokens=model.window_overlap_tokens if rerank else None,
    )


def describe_bi_encoder(reranker_id: str, description: str, embedder: ModelInfo, is_default: bool) -> ModelInfo:
    """The bi-encoder reranking stand-in over the embedding model ``embedder``."""
    return ModelInfo(
        id=reranker_id,
        task="rerank",
        family=embedder.family,
        description=description,
        max_input_tokens=embedder.max_input_tokens,
        dtype=embedder.dtype,
        device=embedder.device,
        devices=embedder.devices,
        backend=embedder.backend,
        precision=embedder.precision,
        is_default=is_default,
        reranker_kind=BI_ENCODER,
        embedding_model=embedder.id,
    )


def dtype_name(dtype: object) -> str:
    """``torch.bfloat16`` → "bfloat16"."""
    return str(dtype).removeprefix("torch.")
