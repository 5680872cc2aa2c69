"""ONNX export of a loaded model, offline and cached; dynamic int8 quantization.

``exported_graphs`` returns the ONNX files a model runs with, one per graph variant (jina-embeddings-v3:
one per task adapter, merged, plus the base weights), in this order of preference:

1. the model directory's own ``onnx/model.onnx`` (fp32) or ``onnx/model_qint8_avx512_vnni.onnx``
   (int8), the names sentence-transformers and published repositories use, loaded as they are;
2. the cache: ``$INFERCORE_CACHE_DIR/onnx/<dir name>-<key>/`` (default ``~/.cache/infercore``),
   where the key hashes the weights, the graph kind and the torch, onnx and onnxruntime versions,
   so new weights or a new exporter/runtime build a new graph and an unchanged model reuses its own;
3. an export made now from the encoder already loaded (legacy TorchScript exporter, opset 17,
   dynamic batch and sequence axes).

   fp32: passed through onnxruntime's transformer optimizer, which fuses the BERT/XLM-R attention
   into ``Attention`` nodes on this exporter's graph (not on the dynamo exporter's); its
   SkipLayerNormalization fusion is off (slower on CPU than what it replaces; CUDA sessions fuse).

   int8: the outlier channels measured on calibration texts are treated first
   (``onnx_graph.split_outlier_channels``: FFN channels split off into fp32, the projections' inputs
   smoothed; ``int8_outliers`` in infercore.json: ``all``, the default, ``ffn`` or ``none``), then
   every weight MatMul but those of the outlier channels is
   quantized (``quantize_dynamic``: int8 weights per output channel, activations quantized per call
   at run time), Q, K and V included (three projections: ONNX Runtime quantizes their shared input
   once; one fused projection was 7 % slower, its output slices cost more than they saved). The
   transformer optimizer is not run: its fused ``Attention`` kernel was slower than ONNX Runtime's
   own fusions of the plain graph once the projections are int8, and it cannot take the split
   projections. ONNX Runtime's session-level fusions (LayerNorm, GELU, DynamicQuantizeMatMul) apply.

   BERT and XLM-R layouts get a second, unpadded graph of the same weights (``onnx_graph``: no mask,
   flash attention), for groups without padding; 1.28× the masked int8 graph on MiniLM at 4 × 256.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError
from .onnx_graph import (
    INPUT_NAMES,
    OUTLIER_NODE_TAG,
    OUTPUT_NAMES,
    HiddenGraph,
    PaddedBertGraph,
    PaddedJinaGraph,
    RerankGraph,
    SparseGraph,
    split_outlier_channels,
)

log = logging.getLogger("infercore.models.onnx")

CACHE_DIR_ENV = "INFERCORE_CACHE_DIR"
# Bumped whenever the graphs this module writes change meaning: old cache entries are then ignored.
GRAPH_VERSION = "7"
OPSET = 17
SHIPPED_FP32 = "onnx/model.onnx"
SHIPPED_INT8 = "onnx/model_qint8_avx512_vnni.onnx"
# Families whose encoders have a padded graph here; the others are refused at load, by name.
ONNX_FAMILIES = ("bert", "xlm-roberta", "jina-xlm-roberta")
# Graph variant of the base weights (no task adapter).
BASE = ""
# int8: which outlier channels stay fp32 (onnx_graph's module doc; settings.INT8_OUTLIERS)
DEFAULT_INT8_OUTLIERS = "all"


class OnnxExportError(CheckpointError):
    """The ONNX graph could not be exported, optimized or quantized."""


@dataclass(frozen=True)
class ExportedGraphs:
    """The files one model runs with: variant ("" = base weights, else a task adapter) → path."""

    files: dict[str, Path]
    precision: str  # "float32" | "int8"
    source: str  # "shipped" | "cache" | "export"
    fused_attention: int | None = None  # Attention nodes the optimizer fused (None: not ours)
    # int8 exported here: the outlier plan, the FFN channels it keeps in fp32 and the projection
    # inputs it smoothed ({"ffn": n, "smoothed_inputs": m})
    outliers: str | None = None
    outlier_counts: dict[str, int] | None = None
    # variant → the same weights' graph for groups without padding (no mask: flash attention)
    unpadded: dict[str, Path] = dataclasses.field(default_factory=dict)


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


def cache_dir_for(model_dir: Path, task: str, quantize: str, outliers: str = DEFAULT_INT8_OUTLIERS) -> Path:
    plan = {"outliers": outliers} if quantize == "int8" else {}
    key = hashlib.sha256(json.dumps(
        {"weights": weights_digest(model_dir), "task": task, "quantize": quantize, **plan, **runtime_versions()},
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
    from onnxruntime.transformers.fusion_options import FusionOptions

    fusions = FusionOptions("bert")
    # Left to the session: ONNX Runtime's CPU kernel of the fused node is slower than the plain Add
    # and LayerNormalization (onnx_backend.CPU_DISABLED_FUSIONS); a CUDA session fuses them itself.
    fusions.enable_skip_layer_norm = False
    optimized = optimize_model(str(path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                               opt_level=0, optimization_options=fusions)
    fused = optimized.get_fused_operator_statistics().get("Attention", 0)
    optimized.save_model_to_file(str(path))
    return int(fused)


def weight_matmuls(path: Path) -> list[str]:
    """Names of the MatMul nodes of ``path`` with a weight (an initializer) operand, but those of the
    outlier channels: what int8 quantizes. The attention's activation × activation products and the
    word-embedding Gather stay fp32."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    return [node.name for node in graph.node
            if node.op_type == "MatMul" and weights.intersection(node.input) and OUTLIER_NODE_TAG not in node.name]


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8: weight MatMuls (``weight_matmuls``) with int8 weights per output channel (signed,
    full range: VNNI needs no reduced range), activations quantized per call at run time.

    On all-MiniLM-L6-v2 against fp32 sentence-transformers, min cosine over 700 held-out queries,
    sentences and passages (``make bench-onnx-int8``): 0.9968 with the FFN outlier channels split
    and the projections' inputs smoothed ("all", the default), 0.9913 with the FFN split only
    ("ffn"), 0.9849 with neither; the fused-Attention graph with Q, K and V
    left fp32 that this replaced gave 0.989 on 64 passages and ran 0.83× as fast as "ffn"."""
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
                         nodes_to_quantize=weight_matmuls(source),
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True})
    finally:
        root.setLevel(level)


def export_model(model_dir: Path, task: str, runner, quantize: str, cache_dir: Path,
                 calibration: list[tuple[list[int], list[int] | None]] | None = None,
                 outliers: str = DEFAULT_INT8_OUTLIERS) -> ExportedGraphs:
    """Export every variant of a loaded model into ``cache_dir`` (atomically: written to a staging
    folder, renamed into place). int8 with an outlier plan other than "none" needs ``calibration``
    (token ids and type ids per input)."""
    encoder = runner.encoder
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}-", dir=cache_dir.parent))
    try:
        files, unpadded, fused, channels = {}, {}, 0, {"ffn": 0, "smoothed_inputs": 0}
        for variant in graph_variants(encoder):
            name = f"model{'-' + variant if variant else ''}"
            step = "build"
            try:
                module = build_graph_module(task, runner, variant)
                module.encoder.zero_padding = quantize == "int8"
                if quantize == "int8" and outliers != "none":
                    step = "calibrate"
                    if not calibration:
                        raise ValueError("int8 outlier channels need calibration inputs")
                    split = split_outlier_channels(module.encoder, calibration, inputs=outliers == "all")
                    channels = {k: channels[k] + v for k, v in split.items()}
                step = "export"
                files[variant], attention = _export_one(module, task, quantize, staging / name, encoder)
                fused += attention
                if hasattr(module.encoder, "unpadded"):  # rotary (Jina) graphs have no unpadded form
                    step = "export (unpadded)"
                    module.encoder.unpadded()
                    unpadded[variant], _ = _export_one(module, task, quantize, staging / f"{name}-unpadded", encoder)
            except OnnxExportError:
                raise
            except Exception as exc:
                raise OnnxExportError(
                    f"{model_dir}: ONNX {step} failed for graph {name!r} ({type(exc).__name__}: {exc}); "
                    "serve it with --backend torch, or report the model's config"
                ) from exc
        meta = {"task": task, "quantize": quantize, "files": files, "unpadded": unpadded, "fused_attention": fused,
                "weights": weights_digest(model_dir), **runtime_versions()}
        if quantize == "int8":
            meta |= {"outliers": outliers, "outlier_counts": channels}
        (staging / "export.json").write_text(json.dumps(meta, indent=2))
        try:
            staging.rename(cache_dir)  # atomic: a reader never sees half an export
        except OSError:
            if read_cached(cache_dir, quantize) is None:  # else a concurrent export of this key won
                _replace_entry(cache_dir, staging, quantize)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s (%s, %s) to %s: %d fused Attention nodes, outlier treatment: %s", model_dir, task,
             quantize, cache_dir, fused, meta.get("outlier_counts", "-"))
    return dataclasses.replace(read_cached(cache_dir, quantize), source="export")


def _replace_entry(cache_dir: Path, staging: Path, quantize: str) -> None:
    """Put ``staging`` in place of an entry missing a file (deleted, as a load error advises). The old
    entry is moved aside first (a rename: a reader sees the old entry, none, or the new one)."""
    stale = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}-stale-", dir=cache_dir.parent))
    try:
        try:
            cache_dir.rename(stale / "entry")
        except FileNotFoundError:  # another process moved it aside already
            pass
        try:
            staging.rename(cache_dir)
        except OSError:
            if read_cached(cache_dir, quantize) is None:  # not that other process's complete export
                raise
    finally:
        shutil.rmtree(stale, ignore_errors=True)


def _export_one(module: nn.Module, task: str, quantize: str, stem: Path, encoder: nn.Module) -> tuple[str, int]:
    """Export ``module`` to ``<stem>.onnx`` (fp32: optimized) or ``<stem>_int8.onnx`` (int8: quantized);
    returns the file name and the number of Attention nodes the optimizer fused."""
    fp32 = stem.with_name(stem.name + ".onnx")
    export_graph(module, task, fp32)
    if quantize != "int8":
        return fp32.name, optimize_graph(fp32, _num_heads(encoder), encoder.hidden_size)
    int8 = stem.with_name(stem.name + "_int8.onnx")
    quantize_int8(fp32, int8)
    fp32.unlink()
    return int8.name, 0


def read_cached(cache_dir: Path, quantize: str) -> ExportedGraphs | None:
    meta_path = cache_dir / "export.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    files = {variant: cache_dir / name for variant, name in meta["files"].items()}
    unpadded = {variant: cache_dir / name for variant, name in meta.get("unpadded", {}).items()}
    if not all(p.is_file() for p in (*files.values(), *unpadded.values())):
        return None
    return ExportedGraphs(files, "int8" if quantize == "int8" else "float32", "cache", meta.get("fused_attention"),
                          meta.get("outliers"), meta.get("outlier_counts"), unpadded)


def exported_graphs(model_dir: Path, task: str, runner, quantize: str,
                    calibration: Callable[[], list[tuple[list[int], list[int] | None]]] | None = None,
                    outliers: str = DEFAULT_INT8_OUTLIERS) -> ExportedGraphs:
    """The model's ONNX files: shipped, cached, or exported now (see the module docstring).
    ``calibration`` makes the int8 calibration inputs, called only when an int8 graph is exported."""
    runtime_versions()
    shipped = shipped_graph(model_dir, quantize)
    if shipped is not None and not graph_variants(runner.encoder)[1:]:
        return ExportedGraphs({BASE: shipped}, "int8" if quantize == "int8" else "float32", "shipped")
    cache_dir = cache_dir_for(model_dir, task, quantize, outliers)
    cached = read_cached(cache_dir, quantize)
    if cached is not None:
        log.info("ONNX graph of %s reused from %s", model_dir, cache_dir)
        return cached
    inputs = calibration() if quantize == "int8" and outliers != "none" and calibration is not None else None
    return export_model(model_dir, task, runner, quantize, cache_dir, inputs, outliers)


def _num_heads(encoder: nn.Module) -> int:
    return encoder.config.num_attention_heads

