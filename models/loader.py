"""Model directory → a ready ``ServedModel`` (tokenizer + weights on the device + head).

Precedence for every setting: the directory's ``infercore.json`` > what the directory's own files
say (sentence-transformers config) > the catalog entry for the model id > defaults, resolved once
into a ``ModelSettings`` (models/settings.py).
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..kernels.self_check import check_kernels_once, model_kernel_shapes
from ..kernels.triton_support import triton_available
from .backend import Backend, TorchBackend
from .catalog import CatalogEntry, lookup, recognise
from .checkpoint import CheckpointError, open_weights
from .contract import TASKS, Encoder, Runner
from .devices import resolve_device, resolve_dtype
from .eland import materialize_eland
from .embedding import DenseLayer, EmbeddingModel
from .eva_vision import ImageEmbeddingModel, load_image_side
from .families import Family, family_for_config
from .images import ImagePreprocessor
from .layers import WeightReader
from .listwise import BLOCK_DOCUMENTS, MAX_DOCUMENT_TOKENS, ListwiseReranker
from .model_dir import ModelDirSpec, read_model_dir
from .rerank import RerankModel
from .settings import BACKENDS, QUANTIZATIONS, ModelSettings
from .sparse import SparseEmbeddingModel
from .tokenizer import TextTokenizer

log = logging.getLogger("infercore.models")

_IGNORED_SUFFIXES = ("position_ids",)  # a buffer old transformers versions saved
# tokenizer_config.json uses a huge sentinel for "no limit"
_TOKENIZER_NO_LIMIT = 1_000_000


@dataclass
class ServedModel:
    """Everything the server needs to run one model. The runner writes no state while it runs, so
    the model's executor threads share it."""

    id: str
    task: str
    family: str
    path: Path
    tokenizer: TextTokenizer
    runner: Runner
    max_input_tokens: int
    dimensions: int
    device: torch.device
    dtype: torch.dtype
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    include_prompt: bool = True
    matryoshka_dimensions: tuple[int, ...] = ()
    catalog: CatalogEntry | None = None
    description: str = ""
    # Multi-task models: task name → instruction prefixed to every input of that task ("" for
    # none); the encoder carries an adapter per task where the model has them.
    tasks: dict[str, str] = field(default_factory=dict)
    default_task: str | None = None
    end_of_life_date: dt.date | None = None
    # rerank: see ModelSettings
    max_query_tokens: int = 0
    rerank_windows: bool = False
    window_overlap_tokens: int = 80
    # Every setting as resolved from the directory, the catalog and the defaults; the fields above
    # are the values in force after what loading derives (limits, adapter tasks).
    settings: ModelSettings = field(default_factory=ModelSettings)
    # Image input (jina-clip-v2): the vision tower with the text head's output options, and the
    # processor that turns image bytes into its pixels. None: a text-only model.
    images: ImageEmbeddingModel | None = None
    image_processor: ImagePreprocessor | None = None
    # What computes the runner's batches (models/backend.py): torch by default; ONNX Runtime with
    # ``backend: onnx``, then ``quality`` holds its parity figures against the torch path.
    backend: Backend | None = None
    quality: dict | None = None

    def __post_init__(self) -> None:
        if self.backend is None:
            self.backend = TorchBackend(self.runner, self.device, self.dtype)

    @functools.cached_property
    def _prompt_lengths(self) -> dict[str, int]:
        return {name: self.tokenizer.prompt_length(text) for name, text in self.prompts.items()}

    def prompt_skip_tokens(self, prompt_name: str | None) -> int:
        """Leading tokens pooling must skip for this prompt (sentence-transformers include_prompt=False)."""
        if self.include_prompt or not prompt_name or not self.prompts[prompt_name]:
            return 0
        return self._prompt_lengths[prompt_name]

    def warmup(self) -> None:
        """One forward pass of a full-length input, so a broken model fails at load, not per request.

        On CUDA the Triton kernels are checked first at this model's widths and dtype
        (``kernels.self_check``): one that fails or disagrees with its torch reference is switched
        off, and the model serves with the reference in its place.
        """
        if self.device.type == "cuda":
            self.check_kernels()
        ids = self.tokenizer.encode_batch(["warm up"], truncate=True)[0].ids
        self.run_ids([ids, [ids[0]] * self.max_input_tokens])
        if self.images is not None:
            size = self.images.tower.image_size
            self.images.embed_images(torch.zeros(1, 3, size, size, device=self.device),
                                     [self.runner.default_options()])

    def run_ids(self, ids: list[list[int]]) -> list:
        """Token id lists through the model with default options, on the calling thread (warm-up
        and health probes; requests go through the scheduler)."""
        options = [self.runner.default_options()] * len(ids)
        return self.backend.run(self.backend.make_batch(ids, None, options), options)


    def check_kernels(self) -> dict[str, str]:
        """Self-check of the kernels this model dispatches to; {kernel: why} for those switched off."""
        if not triton_available():
            return {}
        vocab = self.dimensions if self.task == "sparse_embedding" else None
        shapes = model_kernel_shapes(self.runner.encoder, vocab)
        return {} if shapes is None else check_kernels_once(shapes, self.device, self.dtype)


def infer_task(spec: ModelDirSpec, entry: CatalogEntry | None) -> str:
    """The settings' task (infercore.json, else the catalog's), else what the checkpoint looks like."""
    task = spec.resolve_settings(entry).task
    if task is not None:
        return task
    if any(m in ("SpladePooling", "MLMTransformer") for m in spec.st_modules):
        return "sparse_embedding"
    # A masked-LM checkpoint without a sentence-transformers pooling config is served the way
    # SPLADE models (and ELSER converted by `infercore models import`) are used.
    if "Pooling" not in spec.st_modules and any(a.endswith("ForMaskedLM") for a in spec.architectures):
        return "sparse_embedding"
    if any(a.endswith("ForSequenceClassification") for a in spec.architectures):
        return "rerank"
    return "text_embedding"


def require_served_task(task: str, path: Path) -> None:
    if task not in TASKS:
        raise CheckpointError(f"{path}: task {task!r} is not served by this build (served: {', '.join(TASKS)})")


def build_runner(
    task: str,
    spec: ModelDirSpec,
    settings: ModelSettings,
    family: Family,
    encoder: Encoder,
    reader: WeightReader,
    device: torch.device,
) -> Runner:
    """The task's head on top of the encoder, loaded by the family's own head loader."""
    heads = family.heads
    if task == "sparse_embedding":
        if heads.mlm is None:
            raise CheckpointError(f"{spec.path}: the {family.name} family has no masked-LM head for sparse embedding")
        return SparseEmbeddingModel(encoder, heads.mlm(encoder, reader))
    projector = heads.listwise(encoder, reader) if task == "rerank" and heads.listwise is not None else None
    if projector is not None:
        return ListwiseReranker.from_checkpoint(
            encoder, projector, spec.tokenizer_file,
            block_documents=int(settings.rerank_block_documents or BLOCK_DOCUMENTS),
            max_document_tokens=int(settings.max_document_tokens or MAX_DOCUMENT_TOKENS),
        )
    if task == "rerank":
        if heads.classifier is None:
            readable = " (jina-reranker-v3's projector.*)" if heads.listwise is not None else ""
            raise CheckpointError(
                f"{spec.path}: the checkpoint has no reranking head the {family.name} family reads{readable}"
            )
        return RerankModel(encoder, heads.classifier(encoder, reader, spec.config))
    dense = [DenseLayer(d, device) for d in spec.dense]
    return EmbeddingModel(encoder, settings.pooling or "mean", dense)


def max_input_tokens(spec: ModelDirSpec, settings: ModelSettings, position_limit: int) -> int:
    """The settings' limit, else tokenizer_config.json's, else the positions the model has (never more)."""
    declared = settings.max_input_tokens
    if declared is None:
        tokenizer_limit = spec.tokenizer_config.get("model_max_length")
        if isinstance(tokenizer_limit, int) and tokenizer_limit < _TOKENIZER_NO_LIMIT:
            declared = tokenizer_limit
    return min(declared or position_limit, position_limit)


def load_model(
    model_id: str,
    path: str | Path,
    device: str = "auto",
    dtype: str = "auto",
    max_input_tokens_cap: int | None = None,
    backend: str = "torch",
    quantize: str = "none",
) -> ServedModel:
    """Read, check and load a model directory (or an Elastic eland archive, converted once into the
    cache); raises CheckpointError with a plain reason. ``backend``/``quantize``: the server's
    defaults, which the directory's ``infercore.json`` overrides (models/onnx_backend.py)."""
    path = materialize_eland(path) or path
    spec = read_model_dir(path)
    entry, how = lookup(model_id), "its id or an alias"
    if entry is None and "catalog_id" in spec.settings:
        entry, how = lookup(spec.settings["catalog_id"]), "its catalog_id setting"
    if entry is None and "catalog_id" not in spec.settings:
        entry = recognise(spec.config, spec.path.name)
        how = "its config.json or its directory name"
    if entry is not None:
        log.info("model %s: catalog entry %s (matched by %s)", model_id, entry.id, how)
    else:
        log.info("model %s: no catalog entry (matched neither an id, an alias, %s's config.json nor its name)",
                 model_id, spec.path)
    settings = spec.resolve_settings(entry)
    task = infer_task(spec, entry)
    require_served_task(task, spec.path)
    family = family_for_config(spec.config)
    torch_device = resolve_device(device)
    backend, quantize = resolve_backend(spec, settings, backend, quantize)
    # ONNX graphs are exported (and their parity probed) from fp32 weights, whatever the device.
    torch_dtype = torch.float32 if backend == "onnx" else resolve_dtype(dtype, torch_device, family.cuda_dtype)

    reader = WeightReader(open_weights(spec.path), torch_device, torch_dtype, model_dir=spec.path)
    encoder = family.encoder.from_checkpoint(spec.config, reader)
    runner = build_runner(task, spec, settings, family, encoder, reader, torch_device)
    image_side = load_image_side(spec.config, reader, spec.path)
    unused = [
        k for k in reader.unused()
        if not k.removeprefix(encoder.weight_prefix).startswith(family.heads.weight_prefixes)
        and not k.endswith(_IGNORED_SUFFIXES)
    ]
    if unused:
        log.warning("model %s: %d checkpoint weights unused (e.g. %s)", model_id, len(unused), ", ".join(unused[:3]))


    limit = max_input_tokens(spec, settings, encoder.max_positions)
    if max_input_tokens_cap:
        limit = min(limit, max_input_tokens_cap)
    tokenizer = TextTokenizer.from_file(spec.tokenizer_file, limit)

    max_query = settings.max_query_tokens or limit // 2
    tasks = dict(settings.tasks)
    adapters = encoder.adapter_names
    instructions = encoder.task_instructions
    for name in adapters:
        tasks.setdefault(name, instructions.get(name, ""))
    if adapters and set(tasks) - set(adapters):
        raise CheckpointError(
            f"{spec.path}: tasks {sorted(set(tasks) - set(adapters))} have no adapter in the checkpoint "
            f"(adapters: {list(adapters)})"
        )
    default_task = settings.default_task
    if default_task is not None and default_task not in tasks:
        raise CheckpointError(f"{spec.path}: default task {default_task!r} is not one of the tasks {sorted(tasks)}")
    onnx, quality = None, None
    if backend == "onnx":
        # The graphs cover the text encoder and its head; an image tower (jina-clip-v2) stays on torch
        # in fp32 beside them, and executors send image inputs to it (server/executor.py).
        from .onnx_backend import load_onnx_backend

        onnx, report = load_onnx_backend(model_id, spec.path, task, family.name, runner, tokenizer, torch_device,
                                         quantize, settings.int8_quality_floor, settings.int8_outliers,
                                         settings.onnx_unpadded_graph)
        quality = report.as_dict() | {"unpadded_graph": bool(onnx.graphs.unpadded)}
        if onnx.graphs.outliers is not None:  # an int8 graph exported here: its outlier treatment
            counts = onnx.graphs.outlier_counts or {}
            quality |= {"int8_outliers": onnx.graphs.outliers, "fp32_ffn_channels": counts.get("ffn", 0),
                        "smoothed_inputs": counts.get("smoothed_inputs", 0)}
    return ServedModel(
        id=model_id,
        task=task,
        family=family.name,
        path=spec.path,
        tokenizer=tokenizer,
        runner=runner,
        max_input_tokens=limit,
        dimensions=runner.dimensions,
        device=torch_device,
        dtype=torch_dtype,
        prompts=dict(settings.prompts),
        default_prompt_name=settings.default_prompt_name,
        include_prompt=settings.include_prompt,
        matryoshka_dimensions=tuple(settings.matryoshka_dimensions),
        catalog=entry,
        description=settings.description,
        max_query_tokens=min(max_query, limit - tokenizer.num_special_pair_tokens - 1),
        rerank_windows=bool(settings.rerank_windows),
        tasks=tasks,
        default_task=default_task,
        end_of_life_date=settings.end_of_life_date,
        window_overlap_tokens=int(settings.window_overlap_tokens),
        settings=settings,
        images=image_side[0] if image_side else None,
        image_processor=image_side[1] if image_side else None,
        backend=onnx,
        quality=quality,
    )


def resolve_backend(spec: ModelDirSpec, settings: ModelSettings, backend: str, quantize: str) -> tuple[str, str]:
    """(backend, quantize) for this model: its ``infercore.json`` (``settings``) over the server's
    ``--backend``/``--quantize`` (``backend``, ``quantize``); int8 only on onnx."""
    backend = settings.backend or backend
    quantize = settings.quantize or quantize
    if backend not in BACKENDS:
        raise CheckpointError(f"{spec.path}: backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if quantize not in QUANTIZATIONS:
        raise CheckpointError(f"{spec.path}: quantize {quantize!r} is not one of {', '.join(QUANTIZATIONS)}")
    if quantize == "int8" and backend != "onnx":
        raise CheckpointError(f"{spec.path}: quantize int8 needs the onnx backend (--backend onnx)")
    return backend, quantize
