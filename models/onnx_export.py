"""ONNX export of a loaded model, offline and cached; dynamic int8 quantization.

``exported_graphs`` returns the ONNX files a model runs with, one per graph variant (jina-embeddings-v3:
one per task adapter, merged, plus the base weights), in this order of preference:

1. the model directory's own ``onnx/model.onnx`` (fp32) or ``onnx/model_qint8_avx512_vnni.onnx``
   (int8), the names sentence-transformers and published repositories use, loaded as they are;
2. the cache: ``$INFERCORE_CACHE_DIR/onnx/<dir name>-<key>/`` (default ``~/.cache/infercore``),
   where the key hashes the weights, the graph kind and the torch, onnx and onnxruntime versions,
   so new weights or a new exporter/runtime build a new graph and an unchanged model reuses its own;
3. an export made now from the encoder already loaded (legacy TorchScript exporter, opset 17,
   dynamic batch and sequence axes), passed through onnxruntime's transformer optimizer (which fuses
   the BERT/XLM-R attention into ``Attention`` nodes on this exporter's graph, not on the dynamo
   exporter's), then quantized when asked (``quantize_dynamic``: int8 MatMul weights per output
   channel, activations quantized at run time).

``infercore models export-onnx DIR [--quantize int8]`` runs step 3 ahead of time for air-gapped hosts.
A failing export raises ``OnnxExportError`` naming the model and the step; nothing is left in the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError
from .onnx_graph import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    HiddenGraph,
    PaddedBertGraph,
    PaddedJinaGraph,
    RerankGraph,
    SparseGraph,
)

log = logging.getLogger("infercore.models.onnx")

CACHE_DIR_ENV = "INFERCORE_CACHE_DIR"
# Bumped whenever the graphs this module writes change meaning: old cache entries are then ignored.
GRAPH_VERSION = "1"
OPSET = 17
SHIPPED_FP32 = "onnx/model.onnx"
SHIPPED_INT8 = "onnx/model_qint8_avx512_vnni.onnx"
# Families whose encoders have a padded graph here; the others are refused at load, by name.
ONNX_FAMILIES = ("bert", "xlm-roberta", "jina-xlm-roberta")
# Graph variant of the base weights (no task adapter).
BASE = ""


class OnnxExportError(CheckpointError):
    """The ONNX graph could not be exported, optimized or quantized."""


@dataclass(frozen=True)
class ExportedGraphs:
    """The files one model runs with: variant ("" = base weights, else a task adapter) → path."""

    files: dict[str, Path]
    precision: str  # "float32" | "int8"
    source: str  # "shipped" | "cache" | "export"
    fused_attention: int | None = None  # Attention nodes the optimizer fused (None: not ours)


def runtime_versions() -> dict[str, str]:
    """The versions the cache key includes; raises CheckpointError when the runtime is missing."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise CheckpointError(
            f"--backend onnx needs onnxruntime and onnx ({exc}); install the 'onnx' extra "
            "(pip install 'infercore[onnx]', or 'infercore[onnx-gpu]' on a CUDA host)"
        ) from None
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "graph": GRAPH_VERSION}


def onnx_cache_root() -> Path:
    base = os.environ.get(CACHE_DIR_ENV)
    return (Path(base) if base else Path.home() / ".cache" / "infercore") / "onnx"


def weights_digest(model_dir: Path) -> str:
    """sha256 over the directory's weight and config files (safetensors, config.json, the
    sentence-transformers module folders): what the graph is computed from."""
    digest = hashlib.sha256()
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and not p.is_relative_to(model_dir / "onnx")
                   and (p.suffix == ".safetensors" or p.name in ("config.json", "modules.json", "infercore.json")))
    for path in files:
        digest.update(str(path.relative_to(model_dir)).encode())
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def cache_dir_for(model_dir: Path, task: str, quantize: str) -> Path:
    key = hashlib.sha256(json.dumps(
        {"weights": weights_digest(model_dir), "task": task, "quantize": quantize, **runtime_versions()},
        sort_keys=True,
    ).encode()).hexdigest()[:16]
    return onnx_cache_root() / f"{model_dir.name}-{task}-{quantize}-{key}"


def shipped_graph(model_dir: Path, quantize: str) -> Path | None:
    path = model_dir / (SHIPPED_INT8 if quantize == "int8" else SHIPPED_FP32)
    return path if path.is_file() else None


def graph_variants(encoder: nn.Module) -> tuple[str, ...]:
    """The base weights, plus one variant per task adapter the encoder has."""
    return (BASE, *encoder.adapter_names)


def build_graph_module(task: str, runner, variant: str) -> nn.Module:
    """The padded module to export for ``runner`` (a torch runner of ``task``) and a variant."""
    encoder = runner.encoder
    if getattr(encoder, "family", None) == "jina-xlm-roberta":
        # An input without a task runs with the model's default adapter (jina-clip-v2's text tower),
        # or the base weights when it has none (jina-embeddings-v3).
        padded = PaddedJinaGraph(encoder, variant or encoder.config.default_adapter)
    elif variant:
        raise OnnxExportError(f"graph variant {variant!r} exists only for models with task adapters")
    else:
        padded = PaddedBertGraph(encoder)
    if task == "sparse_embedding":
        return SparseGraph(padded, runner.head).eval()
    if task == "rerank":
        return RerankGraph(padded, runner.head).eval()
    return HiddenGraph(padded).eval()


def export_graph(module: nn.Module, task: str, path: Path) -> None:
    """Legacy (TorchScript) export with dynamic batch and sequence axes, fp32, opset 17.

    The example batch is 2 × 8: dynamic dimensions must not be 0 or 1 in the example, or the
    exporter specialises them."""
    uses_types = module.encoder.uses_token_types
    names = list(INPUT_NAMES if uses_types else INPUT_NAMES[:2])
    # ids and mask of ones, token types of zeros (a one-row type table has no type 1)
    example = tuple((torch.zeros if name == "token_type_ids" else torch.ones)(2, 8, dtype=torch.long) for name in names)
    output = OUTPUT_NAMES[task]
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes[output] = {0: "batch", 1: "sequence"} if task == "text_embedding" else {0: "batch"}
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo's, whose graph the optimizer does
        # not fuse (see the module docstring): chosen on purpose.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, example, str(path), input_names=names, output_names=[output],
                          dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True, dynamo=False)


def optimize_graph(path: Path, num_heads: int, hidden_size: int) -> int:
    """onnxruntime's transformer optimizer in place (attention, LayerNorm, GELU fusions); returns the
    number of fused ``Attention`` nodes."""
    from onnxruntime.transformers.optimizer import optimize_model

    # The optimizer logs every fusion pass at INFO on loggers of its own; the summary is ours.
    for name in ("onnx_model", "onnx_model_bert", "fusion_base", "fusion_utils", "fusion_attention"):
        logging.getLogger(name).setLevel(logging.WARNING)
    optimized = optimize_model(str(path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                               opt_level=0)
    fused = optimized.get_fused_operator_statistics().get("Attention", 0)
    optimized.save_model_to_file(str(path))
    return int(fused)


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8: MatMul weights per output channel (signed, full range: VNNI needs no reduced
    range), activations quantized per call at run time.

    Only MatMul nodes: the fused Attention node's QKV projection stays fp32. On all-MiniLM-L6-v2 the
    probe texts' min cosine against fp32 was 0.9924 this way and 0.9890 with Attention quantized too
    (QAttention), which is below the 0.99 floor; the word-embedding Gather stays fp32 as well."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs every tensor (and advice) on the root logger
    try:
        # The optimizer's fused nodes (Attention, SkipLayerNormalization) are contrib ops that onnx's
        # shape inference cannot type: their outputs are float32, which the quantizer must be told.
        quantize_dynamic(str(source), str(target), per_channel=True, reduce_range=False,
                         weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        root.setLevel(level)


def export_model(model_dir: Path, task: str, runner, quantize: str, cache_dir: Path) -> ExportedGraphs:
    """Export every variant of a loaded model into ``cache_dir`` (atomically: written to a staging
    folder, renamed into place)."""
    encoder = runner.encoder
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}-", dir=cache_dir.parent))
    try:
        files, fused = {}, 0
        for variant in graph_variants(encoder):
            name = f"model{'-' + variant if variant else ''}"
            fp32 = staging / f"{name}.onnx"
            step = "build"
            try:
                module = build_graph_module(task, runner, variant)
                step = "export"
                export_graph(module, task, fp32)
                step = "optimize"
                heads = _num_heads(encoder)
                fused += optimize_graph(fp32, heads, encoder.hidden_size)
                if quantize == "int8":
                    step = "quantize"
                    int8 = staging / f"{name}_int8.onnx"
                    quantize_int8(fp32, int8)
                    fp32.unlink()
                    fp32 = int8
            except OnnxExportError:
                raise
            except Exception as exc:
                raise OnnxExportError(
                    f"{model_dir}: ONNX {step} failed for graph {name!r} ({type(exc).__name__}: {exc}); "
                    "serve it with --backend torch, or report the model's config"
                ) from exc
            files[variant] = fp32.name
        meta = {"task": task, "quantize": quantize, "files": files, "fused_attention": fused,
                "weights": weights_digest(model_dir), **runtime_versions()}
        (staging / "export.json").write_text(json.dumps(meta, indent=2))
        try:
            staging.rename(cache_dir)  # atomic: a reader never sees half an export
        except OSError:
            if not (cache_dir / "export.json").is_file():  # not a concurrent export that won
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s (%s, %s) to %s: %d fused Attention nodes", model_dir, task, quantize, cache_dir, fused)
    return dataclasses.replace(read_cached(cache_dir, quantize), source="export")


def read_cached(cache_dir: Path, quantize: str) -> ExportedGraphs | None:
    meta_path = cache_dir / "export.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    files = {variant: cache_dir / name for variant, name in meta["files"].items()}
    if not all(p.is_file() for p in files.values()):
        return None
    return ExportedGraphs(files, "int8" if quantize == "int8" else "float32", "cache", meta.get("fused_attention"))


def exported_graphs(model_dir: Path, task: str, runner, quantize: str) -> ExportedGraphs:
    """The model's ONNX files: shipped, cached, or exported now (see the module docstring)."""
    runtime_versions()
    shipped = shipped_graph(model_dir, quantize)
    if shipped is not None and not graph_variants(runner.encoder)[1:]:
        return ExportedGraphs({BASE: shipped}, "int8" if quantize == "int8" else "float32", "shipped")
    cache_dir = cache_dir_for(model_dir, task, quantize)
    cached = read_cached(cache_dir, quantize)
    if cached is not None:
        log.info("ONNX graph of %s reused from %s", model_dir, cache_dir)
        return cached
    return export_model(model_dir, task, runner, quantize, cache_dir)


def _num_heads(encoder: nn.Module) -> int:
    return encoder.config.num_attention_heads

