"""Model directory → a ready ``ServedModel`` (tokenizer + weights on the device + head).

Precedence for every setting: the directory's ``infercore.json`` > what the directory's own files
say (sentence-transformers config) > the catalog entry for the model id > defaults.
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
from .eland import materialize_eland
from .embedding import DenseLayer, EmbeddingModel
from .families import Family, family_for_config
from .layers import WeightReader
from .listwise import BLOCK_DOCUMENTS, MAX_DOCUMENT_TOKENS, ListwiseReranker, has_listwise_head
from .model_dir import ModelDirSpec, read_model_dir
from .rerank import RerankModel, load_classifier_head
from .sparse import SparseEmbeddingModel
from .tokenizer import TextTokenizer

log = logging.getLogger("infercore.models")

# Checkpoint entries that a task's head may not use and whose presence is normal.
_IGNORED_PREFIXES = ("pooler.", "cls.", "classifier.", "lm_head.")
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
    runner: EmbeddingModel | SparseEmbeddingModel | RerankModel | ListwiseReranker
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
    # rerank: see CatalogEntry
    max_query_tokens: int = 0
    rerank_windows: bool = False
    window_overlap_tokens: int = 80
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
        shapes = model_kernel_shapes(getattr(self.runner, "encoder", None), vocab)
        return {} if shapes is None else check_kernels_once(shapes, self.device, self.dtype)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} requested but no CUDA device is available")
    return resolved


DEVICE_FORMS = "auto, cpu, cuda, cuda:N, cuda:all, or a comma-separated list of CUDA devices (cuda:0,cuda:1)"


def resolve_devices(spec: str) -> list[torch.device]:
    """The devices ``--device`` names; the server loads one replica of each model on each.

    ``auto``: every visible CUDA device, or the CPU when there is none. ``cpu``; ``cuda`` (= cuda:0);
    ``cuda:N``; ``cuda:all``: every visible CUDA device; ``cuda:0,cuda:2``: those devices, in that
    order. CUDA_VISIBLE_DEVICES decides what is visible (and numbers it from 0). Raises
    CheckpointError naming the problem: an unknown device, one listed twice, the CPU in a list, an
    index beyond the visible devices, CUDA without a CUDA device.
    """
    spec = spec.strip()
    entries = [entry.strip() for entry in spec.split(",")]
    if not all(entries):
        raise CheckpointError(f"device list {spec!r} has an empty entry; expected {DEVICE_FORMS}")
    if entries == ["auto"]:
        entries = ["cuda:all"] if torch.cuda.is_available() else ["cpu"]
    if "cuda:all" in entries:
        if len(entries) > 1:
            raise CheckpointError(
                f"device list {spec!r}: cuda:all already names every CUDA device; list nothing beside it"
            )
        return [torch.device("cuda", i) for i in range(_visible_cuda_devices(spec))]
    parsed = [_parse_device(entry, spec) for entry in entries]
    if any(device.type == "cpu" for device in parsed):
        if len(parsed) > 1:
            raise CheckpointError(
                f"device list {spec!r}: cpu cannot be combined with other devices (a list names CUDA devices only)"
            )
        return [torch.device("cpu")]
    available = _visible_cuda_devices(spec)
    devices: list[torch.device] = []
    for entry, device in zip(entries, parsed):
        if device.index >= available:
            raise CheckpointError(
                f"device {entry!r} requested but only {available} CUDA device{'s' if available > 1 else ''} "
                f"{'are' if available > 1 else 'is'} visible (cuda:0 to cuda:{available - 1})"
            )
        if device in devices:
            raise CheckpointError(f"device list {spec!r} names {device} twice")
        devices.append(device)
    return devices


def _parse_device(entry: str, spec: str) -> torch.device:
    """One entry of a device list: the CPU, or a CUDA device with its index (cuda = cuda:0)."""
    if entry == "auto":
        raise CheckpointError(f"device list {spec!r}: auto cannot be combined with other devices")
    try:
        device = torch.device(entry)
    except RuntimeError:
        raise CheckpointError(f"unknown device {entry!r}; expected {DEVICE_FORMS}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise CheckpointError(f"device {entry!r} is not supported; expected {DEVICE_FORMS}")
    return torch.device("cuda", device.index or 0)


def _visible_cuda_devices(spec: str) -> int:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise CheckpointError(f"device {spec!r} requested but no CUDA device is available")
    return count


def resolve_dtype(dtype: str, device: torch.device, family: Family) -> torch.dtype:
    if dtype == "auto":
        return family.cuda_dtype if device.type == "cuda" else torch.float32
    resolved = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    if device.type == "cpu" and resolved == torch.float16:
        raise CheckpointError("float16 is not supported on CPU; use float32 or bfloat16")
    return resolved


def infer_task(spec: ModelDirSpec, entry: CatalogEntry | None) -> str:
    if "task" in spec.settings:
        return spec.settings["task"]
    if entry is not None:
        return entry.task
    if any(m in ("SpladePooling", "MLMTransformer") for m in spec.st_modules):
        return "sparse_embedding"
    # A masked-LM checkpoint without a sentence-transformers pooling config is served the way
    # SPLADE models (and ELSER converted by `infercore models import`) are used.
    if "Pooling" not in spec.st_modules and any(a.endswith("ForMaskedLM") for a in spec.architectures):
        return "sparse_embedding"
    if any(a.endswith("ForSequenceClassification") for a in spec.architectures):
        return "rerank"
    return "text_embedding"


# Tasks this build has heads for.
SERVED_TASKS = ("text_embedding", "sparse_embedding", "rerank")


def require_served_task(task: str, path: Path) -> None:
    if task not in SERVED_TASKS:
        raise CheckpointError(f"{path}: task {task!r} is not served by this build (served: {', '.join(SERVED_TASKS)})")


def build_runner(
    task: str,
    spec: ModelDirSpec,
    entry: CatalogEntry | None,
    family: Family,
    encoder: torch.nn.Module,
    reader: WeightReader,
    device: torch.device,
) -> EmbeddingModel | SparseEmbeddingModel | RerankModel | ListwiseReranker:
    """The task's head on top of the encoder."""
    if task == "sparse_embedding":
        if family.mlm_head is None:
            raise CheckpointError(f"{spec.path}: the {family.name} family has no masked-LM head for sparse embedding")
        return SparseEmbeddingModel(encoder, family.mlm_head(encoder, reader))
    if task == "rerank" and has_listwise_head(encoder, reader):
        settings = spec.settings
        return ListwiseReranker.from_checkpoint(
            encoder, reader, spec.tokenizer_file,
            block_documents=int(settings.get("rerank_block_documents")
                                or (entry and entry.rerank_block_documents) or BLOCK_DOCUMENTS),
            max_document_tokens=int(settings.get("max_document_tokens")
                                    or (entry and entry.max_document_tokens) or MAX_DOCUMENT_TOKENS),
        )
    if task == "rerank":
        return RerankModel(encoder, load_classifier_head(encoder, reader, spec.config))
    pooling = spec.pooling or (entry.pooling if entry else None) or "mean"
    dense = [DenseLayer(d, device) for d in spec.dense]
    return EmbeddingModel(encoder, pooling, dense)


def max_input_tokens(spec: ModelDirSpec, entry: CatalogEntry | None, position_limit: int) -> int:
    declared = spec.settings.get("max_input_tokens") or spec.st_max_seq_length
    if declared is None and entry is not None:
        declared = entry.max_input_tokens
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
    entry = lookup(model_id) or lookup(spec.settings.get("catalog_id", ""))
    if entry is None and "catalog_id" not in spec.settings:
        entry = recognise(spec.config, spec.path.name)
        if entry is not None:
            log.info("model %s: %s is recognised as the catalog's %s", model_id, spec.path, entry.id)
    task = infer_task(spec, entry)
    require_served_task(task, spec.path)
    family = family_for_config(spec.config)
    torch_device = resolve_device(device)
    backend, quantize = resolve_backend(spec, backend, quantize)
    # ONNX graphs are exported (and their parity probed) from fp32 weights, whatever the device.
    torch_dtype = torch.float32 if backend == "onnx" else resolve_dtype(dtype, torch_device, family)

    reader = WeightReader(open_weights(spec.path), torch_device, torch_dtype, model_dir=spec.path)
    encoder = family.encoder.from_checkpoint(spec.config, reader)
    runner = build_runner(task, spec, entry, family, encoder, reader, torch_device)
    unused = [
        k for k in reader.unused()
        if not k.removeprefix(encoder.weight_prefix).startswith(_IGNORED_PREFIXES) and not k.endswith(_IGNORED_SUFFIXES)
    ]
    if unused:
        log.warning("model %s: %d checkpoint weights unused (e.g. %s)", model_id, len(unused), ", ".join(unused[:3]))


    limit = max_input_tokens(spec, entry, encoder.max_positions)
    if max_input_tokens_cap:
        limit = min(limit, max_input_tokens_cap)
    tokenizer = TextTokenizer.from_file(spec.tokenizer_file, limit)

    prompts = spec.prompts or (dict(entry.prompts) if entry else {})
    default_prompt = spec.default_prompt_name or (entry.default_prompt_name if entry and not spec.prompts else None)
    matryoshka = tuple(spec.settings.get("matryoshka_dimensions") or (entry.matryoshka_dimensions if entry else ()))
    settings = spec.settings
    max_query = settings.get("max_query_tokens") or (entry.max_query_tokens if entry else None) or limit // 2
    windows = settings.get("rerank_windows", entry.rerank_windows if entry else False)
    tasks = dict(settings.get("tasks") or (entry.tasks if entry else {}))
    adapters = tuple(getattr(encoder, "adapter_names", ()))
    instructions = getattr(encoder, "task_instructions", {})
    for name in adapters:
        tasks.setdefault(name, instructions.get(name, ""))
    if adapters and set(tasks) - set(adapters):
        raise CheckpointError(
            f"{spec.path}: tasks {sorted(set(tasks) - set(adapters))} have no adapter in the checkpoint "
            f"(adapters: {list(adapters)})"
        )
    default_task = settings.get("default_task") or (entry.default_task if entry else None)
    end_of_life = entry.end_of_life_date if entry else None
    if "end_of_life_date" in settings:
        try:
            end_of_life = dt.date.fromisoformat(str(settings["end_of_life_date"]))
        except ValueError:
            raise CheckpointError(
                f"{spec.path}: end_of_life_date {settings['end_of_life_date']!r} is not a date (YYYY-MM-DD)"
            ) from None
    if default_task is not None and default_task not in tasks:
        raise CheckpointError(f"{spec.path}: default task {default_task!r} is not one of the tasks {sorted(tasks)}")
    overlap = settings.get("window_overlap_tokens", entry.window_overlap_tokens if entry else 80)
    onnx, quality = None, None
    if backend == "onnx":
        from .onnx_backend import load_onnx_backend

        onnx, report = load_onnx_backend(model_id, spec.path, task, family.name, runner, tokenizer, torch_device,
                                         quantize, settings.get("int8_quality_floor"))
        quality = report.as_dict()
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
        prompts=prompts,
        default_prompt_name=default_prompt,
        include_prompt=spec.include_prompt,
        matryoshka_dimensions=matryoshka,
        catalog=entry,
        description=entry.description if entry else "",
        max_query_tokens=min(max_query, limit - tokenizer.num_special_pair_tokens - 1),
        rerank_windows=bool(windows),
        tasks=tasks,
        default_task=default_task,
        end_of_life_date=end_of_life,
        window_overlap_tokens=int(overlap),
        backend=onnx,
        quality=quality,
    )


BACKENDS = ("torch", "onnx")
QUANTIZATIONS = ("none", "int8")


def resolve_backend(spec: ModelDirSpec, backend: str, quantize: str) -> tuple[str, str]:
    """(backend, quantize) for this model: its ``infercore.json`` over the server's defaults."""
    backend = spec.settings.get("backend", backend)
    quantize = spec.settings.get("quantize", quantize)
    if backend not in BACKENDS:
        raise CheckpointError(f"{spec.path}: backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if quantize not in QUANTIZATIONS:
        raise CheckpointError(f"{spec.path}: quantize {quantize!r} is not one of {', '.join(QUANTIZATIONS)}")
    if quantize == "int8" and backend != "onnx":
        raise CheckpointError(f"{spec.path}: quantize int8 needs the onnx backend (--backend onnx)")
    return backend, quantize
