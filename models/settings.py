"""Per-model settings: one typed object and one precedence.

Every setting of a served model is a field of ``ModelSettings``. A value comes from the first
source that declares it:

1. the model directory's ``infercore.json`` (every key optional; a key that is not a field here, or
   ``catalog_id``, is refused by name);
2. what the directory's sentence-transformers files say (pooling and ``include_prompt`` from the
   Pooling module, ``max_seq_length``, prompts and the default prompt);
3. the catalog entry of the model id (``CatalogEntry`` is a ``ModelSettings`` plus catalog facts);
4. the field's default here.

A setting that ``follows`` another (the default prompt follows the prompts) is only taken from the
source its leader came from or a higher one: a catalog default prompt never names a prompt of a
directory's own prompt set. Adding a per-model setting is one field here (plus its test); the loader
reads it from ``ServedModel.settings``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from ..kernels.segment_pool import POOLING_MODES
from .checkpoint import CheckpointError

SETTINGS_FILE = "infercore.json"
# The one infercore.json key that is not a setting: the catalog entry to take settings from.
CATALOG_ID_KEY = "catalog_id"
# What computes a model (models/backend.py) and the weights' quantization (int8: onnx only).
BACKENDS = ("torch", "onnx")
QUANTIZATIONS = ("none", "int8")
# int8: the outlier channels kept in fp32 (models/onnx_graph.py)
INT8_OUTLIERS = ("ffn", "all", "none")


def _date(value: Any) -> dt.date:
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"end_of_life_date {value!r} is not a date (YYYY-MM-DD)") from None


def _one_of(name: str, choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{name} {value!r} is not one of {', '.join(choices)}")
        return value
    return parse


def _flag(name: str) -> Callable[[Any], bool]:
    def parse(value: Any) -> bool:
        if not isinstance(value, bool):  # "false" would be truthy: only JSON's true / false
            raise ValueError(f"{name} {value!r} is not true or false")
        return value
    return parse


def _quality_floor(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"int8_quality_floor {value!r} is not a cosine in (0, 1]")
    return float(value)


def model_setting(
    default: Any = MISSING,
    *,
    default_factory: Any = MISSING,
    in_file: bool = True,
    parse: Callable[[Any], Any] | None = None,
    follows: str | None = None,
) -> Any:
    """A ``ModelSettings`` field. ``in_file``: settable in infercore.json; ``parse``: turns the JSON
    value into the field's type (ValueError naming the problem); ``follows``: see the module doc."""
    metadata = {"in_file": in_file, "parse": parse, "follows": follows}
    return field(default=default, default_factory=default_factory, metadata=metadata)


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    """What a served model is configured to do. None means "derived at load" where the comment says so."""

    task: str | None = None  # None: inferred from the checkpoint (loader.infer_task)
    pooling: str | None = None  # None: mean
    # None: tokenizer_config.json's model_max_length, else the position limit (never above it)
    max_input_tokens: int | None = None
    prompts: dict[str, str] = model_setting(default_factory=dict, parse=dict)
    default_prompt_name: str | None = model_setting(None, follows="prompts")
    # False: pooling skips the prompt's tokens (sentence-transformers include_prompt)
    include_prompt: bool = model_setting(True, parse=_flag("include_prompt"))
    matryoshka_dimensions: tuple[int, ...] = model_setting((), parse=tuple)
    # rerank: the query's token cap (None: half the input limit), sliding windows over long
    # documents and their overlap in tokens
    max_query_tokens: int | None = None
    rerank_windows: bool = model_setting(False, parse=_flag("rerank_windows"))
    window_overlap_tokens: int = model_setting(80, parse=int)
    # listwise rerank: documents per prompt block and each document's token cap (None: the model's)
    rerank_block_documents: int | None = None
    max_document_tokens: int | None = None
    # multi-task models: task → instruction prefix, and the task of requests that name none
    tasks: dict[str, str] = model_setting(default_factory=dict, parse=dict)
    default_task: str | None = None
    # requests to the model are refused (410) after this date
    end_of_life_date: dt.date | None = model_setting(None, parse=_date)
    # What computes the model and its weights' quantization; None: the server's --backend / --quantize.
    # A model's own value wins over the server flag (a model that needs torch says so once).
    backend: str | None = model_setting(None, parse=_one_of("backend", BACKENDS))
    quantize: str | None = model_setting(None, parse=_one_of("quantize", QUANTIZATIONS))
    # int8 is served only if its min cosine against fp32 on the fixed text set reaches this (None: 0.99)
    int8_quality_floor: float | None = model_setting(None, parse=_quality_floor)
    # int8: how outlier channels are treated: FFN channels split off into fp32 and the projections'
    # inputs smoothed ("all"), the FFN split only ("ffn": less exact), or neither (None: "all")
    int8_outliers: str | None = model_setting(None, parse=_one_of("int8_outliers", INT8_OUTLIERS))
    # onnx: groups without padding run through a second, unmasked graph of the same weights (flash
    # attention; 1.28x in int8 on MiniLM passages). false: every group runs through the masked graph,
    # and the model holds one graph in memory, not two.
    onnx_unpadded_graph: bool = model_setting(True, parse=_flag("onnx_unpadded_graph"))
    # catalog only
    description: str = model_setting("", in_file=False)
    similarity: str = model_setting("cosine", in_file=False)  # of the vectors, for Elasticsearch's index


FILE_KEYS = frozenset(f.name for f in fields(ModelSettings) if f.metadata.get("in_file", True)) | {CATALOG_ID_KEY}


def parse_settings_file(raw: Any, where: str) -> dict[str, Any]:
    """infercore.json's object → {field: typed value}; CheckpointError naming ``where`` and the key."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where} is not a JSON object")
    unknown = set(raw) - FILE_KEYS
    if unknown:
        raise CheckpointError(f"{where} has unknown keys {sorted(unknown)} (known: {sorted(FILE_KEYS)})")
    values = {}
    for f in fields(ModelSettings):
        if f.name not in raw:
            continue
        parse = f.metadata.get("parse")
        try:
            values[f.name] = parse(raw[f.name]) if parse and raw[f.name] is not None else raw[f.name]
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: {exc}") from None
    if "pooling" in values and values["pooling"] not in POOLING_MODES:
        raise CheckpointError(f"{where}: pooling {values['pooling']!r} is not one of {', '.join(POOLING_MODES)}")
    return values


def resolve_settings(
    file: Mapping[str, Any], sentence_transformers: Mapping[str, Any], catalog: ModelSettings | None = None
) -> ModelSettings:
    """The settings in force: per field the first of ``file`` (parsed infercore.json),
    ``sentence_transformers`` (what the directory's files declare), ``catalog``, the default.
    CheckpointError if the default prompt is not one of the prompts."""
    sources: list[Mapping[str, Any]] = [file, sentence_transformers]
    if catalog is not None:
        sources.append({f.name: getattr(catalog, f.name) for f in fields(ModelSettings)})
    values: dict[str, Any] = {}
    came_from: dict[str, int] = {}
    for f in fields(ModelSettings):
        leader = f.metadata.get("follows")
        usable = sources[: came_from[leader] + 1] if leader in came_from else sources
        for rank, source in enumerate(usable):
            if f.name in source:
                values[f.name] = source[f.name]
                came_from[f.name] = rank
                break
    settings = ModelSettings(**values)
    if settings.default_prompt_name is not None and settings.default_prompt_name not in settings.prompts:
        raise CheckpointError(
            f"default prompt {settings.default_prompt_name!r} is not one of the prompts {sorted(settings.prompts)}"
        )
    return settings
