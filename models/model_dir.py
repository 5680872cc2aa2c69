"""What a model directory holds: the HF config, weights, tokenizer, sentence-transformers modules
and an optional ``infercore.json`` settings file.

``read_model_dir`` turns a directory into a ``ModelDirSpec`` or raises ``CheckpointError`` naming
the first thing that makes it unservable. Nothing here touches tensor data.

Settings file (``infercore.json``, every key optional) overrides what the directory implies::

    {"task": "text_embedding", "pooling": "mean", "max_input_tokens": 512,
     "prompts": {"query": "query: "}, "default_prompt_name": null, "include_prompt": true,
     "matryoshka_dimensions": [64, 128], "catalog_id": "microsoft-multilingual-e5-large"}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..kernels.segment_pool import POOLING_MODES
from .checkpoint import CheckpointError, weight_files

SETTINGS_FILE = "infercore.json"
TOKENIZER_FILE = "tokenizer.json"
SETTINGS_KEYS = {
    "task", "pooling", "max_input_tokens", "prompts", "default_prompt_name",
    "include_prompt", "matryoshka_dimensions", "catalog_id",
    # rerank: query cap in tokens, sliding windows over long documents, their overlap in tokens
    "max_query_tokens", "rerank_windows", "window_overlap_tokens",
    # listwise rerank: documents per prompt block, and each document's token cap
    "rerank_block_documents", "max_document_tokens",
    # multi-task models: {task: instruction prefix} and the default task
    "tasks", "default_task",
    # ISO date after which requests to the model are refused (410)
    "end_of_life_date",
    # runtime: "torch" | "onnx", "none" | "int8" (onnx only), and int8's minimum cosine against fp32
    "backend", "quantize", "int8_quality_floor",
}
# sentence-transformers pooling config keys → our pooling mode names
_ST_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "last",
}
_ST_POOLING_NAMES = {
    "cls": "cls", "mean": "mean", "max": "max", "mean_sqrt_len_tokens": "mean_sqrt_len", "lasttoken": "last",
}
_ST_DENSE_ACTIVATIONS = {
    "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.ReLU": "relu",
    "torch.nn.modules.activation.GELU": "gelu",
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
}


@dataclass(frozen=True)
class DenseSpec:
    """A sentence-transformers Dense module applied after pooling (Linear + activation)."""

    path: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str


@dataclass(frozen=True)
class ModelDirSpec:
    path: Path
    config: dict[str, Any]
    weight_files: tuple[Path, ...]
    tokenizer_file: Path
    tokenizer_config: dict[str, Any]
    settings: dict[str, Any]
    st_modules: tuple[str, ...] = ()
    st_max_seq_length: int | None = None
    pooling: str | None = None
    include_prompt: bool = True
    dense: tuple[DenseSpec, ...] = ()
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    @property
    def architectures(self) -> tuple[str, ...]:
        return tuple(self.config.get("architectures") or ())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None


def _read_json_if_present(path: Path) -> Any:
    return _read_json(path) if path.is_file() else None


def _check_splade_pooling(path: Path) -> None:
    """The sparse head computes max over tokens of log(1 + relu(logit)); refuse other variants."""
    cfg = _read_json_if_present(path / "config.json") or {}
    strategy = cfg.get("pooling_strategy", "max")
    act = cfg.get("activation_function", "relu")
    if strategy != "max" or act != "relu":
        raise CheckpointError(
            f"{path}: SpladePooling with pooling_strategy {strategy!r} and activation_function {act!r} is not "
            "supported (only 'max' with 'relu')"
        )


def _module_kind(type_name: str) -> str:
    """'sentence_transformers.models.Pooling' (or the 5.x/6.x module paths) → 'Pooling'."""
    return type_name.rsplit(".", 1)[-1]


def _read_st_pooling(path: Path) -> tuple[str, bool]:
    cfg = _read_json(path / "config.json")
    if "pooling_mode" in cfg:  # sentence-transformers >= 5 writes the mode by name
        raw = cfg["pooling_mode"]
        names = [raw] if isinstance(raw, str) else list(raw)
        modes = [_ST_POOLING_NAMES.get(n) for n in names]
    else:
        modes = [mode for key, mode in _ST_POOLING_KEYS.items() if cfg.get(key)]
        if cfg.get("pooling_mode_weightedmean_tokens"):
            modes.append(None)
    if len(modes) != 1 or modes[0] is None:
        raise CheckpointError(
            f"{path}/config.json asks for pooling {cfg.get('pooling_mode', modes)!r}; infercore supports exactly "
            f"one of {', '.join(sorted(set(_ST_POOLING_NAMES)))}"
        )
    return modes[0], bool(cfg.get("include_prompt", True))


def _read_st_dense(path: Path) -> DenseSpec:
    cfg = _read_json(path / "config.json")
    # Variants infercore does not compute are refused by name rather than silently run wrong.
    if cfg.get("use_residual"):
        raise CheckpointError(f"{path}: Dense with use_residual is not supported")
    if cfg.get("module_input_name", "sentence_embedding") != "sentence_embedding":
        raise CheckpointError(
            f"{path}: Dense on {cfg['module_input_name']!r} (before pooling) is not supported; "
            "only Dense layers on the pooled sentence embedding are"
        )
    act_name = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
    if act_name not in _ST_DENSE_ACTIVATIONS:
        raise CheckpointError(f"{path}: Dense activation {act_name!r} is not supported")
    if not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path}: Dense module has no model.safetensors (pickled weights are not loaded)")
    return DenseSpec(
        path=path,
        in_features=int(cfg["in_features"]),
        out_features=int(cfg["out_features"]),
        bias=bool(cfg.get("bias", True)),
        activation=_ST_DENSE_ACTIVATIONS[act_name],
    )


def read_model_dir(path: str | Path) -> ModelDirSpec:
    """Read and check everything a model directory declares; raise CheckpointError if unservable."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    config = _read_json(path / "config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}/config.json is not a JSON object")
    files = tuple(weight_files(path))
    tokenizer_file = path / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise CheckpointError(
            f"{path} has no {TOKENIZER_FILE}; infercore needs the fast-tokenizer file (save the tokenizer "
            "with transformers' save_pretrained to produce it)"
        )
    tokenizer_config = _read_json_if_present(path / "tokenizer_config.json") or {}

    settings = _read_json_if_present(path / SETTINGS_FILE) or {}
    if not isinstance(settings, dict):
        raise CheckpointError(f"{path}/{SETTINGS_FILE} is not a JSON object")
    unknown = set(settings) - SETTINGS_KEYS
    if unknown:
        raise CheckpointError(
            f"{path}/{SETTINGS_FILE} has unknown keys {sorted(unknown)} (known: {sorted(SETTINGS_KEYS)})"
        )

    st_modules: list[str] = []
    pooling: str | None = None
    include_prompt = True
    dense: list[DenseSpec] = []
    modules = _read_json_if_present(path / "modules.json")
    if modules is not None:
        for module in sorted(modules, key=lambda m: m.get("idx", 0)):
            kind = _module_kind(module.get("type", ""))
            module_path = path / module.get("path", "")
            st_modules.append(kind)
            if kind in ("Transformer", "MLMTransformer"):
                continue
            if kind == "SpladePooling":
                _check_splade_pooling(module_path)
                continue
            if kind == "Normalize":
                # Normalising the pooled vector is a request option (default on), as in TEI; a
                # Normalize on token embeddings (multi-vector models) would change the pooled result.
                cfg = _read_json_if_present(module_path / "config.json") or {}
                if cfg.get("module_input_name", "sentence_embedding") != "sentence_embedding":
                    raise CheckpointError(f"{module_path}: Normalize on {cfg['module_input_name']!r} is not supported")
                continue
            if kind == "Pooling":
                pooling, include_prompt = _read_st_pooling(module_path)
            elif kind == "Dense":
                dense.append(_read_st_dense(module_path))
            else:
                raise CheckpointError(
                    f"{path}/modules.json uses the sentence-transformers module {kind!r}, which infercore "
                    "does not run (supported: Transformer, Pooling, Dense, Normalize, MLMTransformer, "
                    "SpladePooling)"
                )

    st_config = _read_json_if_present(path / "sentence_bert_config.json") or {}
    st_prompts = _read_json_if_present(path / "config_sentence_transformers.json") or {}
    prompts = dict(st_prompts.get("prompts") or {})
    default_prompt_name = st_prompts.get("default_prompt_name")

    if "pooling" in settings and settings["pooling"] not in POOLING_MODES:
        raise CheckpointError(
            f"{path}/{SETTINGS_FILE}: pooling {settings['pooling']!r} is not one of {', '.join(POOLING_MODES)}"
        )
    if "prompts" in settings:
        prompts = dict(settings["prompts"])
    if "default_prompt_name" in settings:
        default_prompt_name = settings["default_prompt_name"]
    if default_prompt_name is not None and default_prompt_name not in prompts:
        raise CheckpointError(f"default prompt {default_prompt_name!r} is not one of the prompts {sorted(prompts)}")

    return ModelDirSpec(
        path=path,
        config=config,
        weight_files=files,
        tokenizer_file=tokenizer_file,
        tokenizer_config=tokenizer_config,
        settings=settings,
        st_modules=tuple(st_modules),
        st_max_seq_length=st_config.get("max_seq_length"),
        pooling=settings.get("pooling", pooling),
        include_prompt=bool(settings.get("include_prompt", include_prompt)),
        dense=tuple(dense),
        prompts=prompts,
        default_prompt_name=default_prompt_name,
    )
