"""Cross-encoder rerankers: (query, document) read together as one packed sequence, one logit out.

The head is first token → dense → tanh → one logit; each family loads it from its own checkpoint
layout (``contract.Heads.classifier``: BERT's and (XLM-)RoBERTa's in bert.py).

``run`` returns raw logits; the engine takes the max over a document's windows and applies the
sigmoid (monotone, so max-then-sigmoid equals sigmoid-then-max).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .checkpoint import CheckpointError
from .contract import Encoder
from .packing import PackedBatch


@dataclass(frozen=True, slots=True)
class RerankOptions:
    """Nothing varies per pair today; kept so every runner has the same ``run`` contract."""


class ClassifierHead(nn.Module):
    """First token → dense → tanh → linear to one logit."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, 1)

    def forward(self, first_tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.dense(first_tokens))).squeeze(-1)


def require_one_label(config: dict[str, Any]) -> None:
    """Refuse a sequence classifier that is not a reranker (families call it before loading their head)."""
    if "num_labels" in config:
        labels = int(config["num_labels"])
    else:
        labels = len(config.get("id2label") or {}) or 2
    if labels != 1:
        raise CheckpointError(
            f"a sequence classifier with {labels} labels is not a reranker (rerankers have num_labels 1)"
        )


class RerankModel:
    """A packed encoder with a one-logit classification head (a ``contract.Runner``). ``run`` writes
    no state, so the executor threads of one model share it."""

    task: ClassVar[str] = "rerank"
    listwise: ClassVar[bool] = False
    pooling = "cls"
    dimensions = 1

    def __init__(self, encoder: Encoder, head: ClassifierHead):
        self.encoder = encoder
        self.head = head

    @staticmethod
    def default_options() -> RerankOptions:
        return RerankOptions()

    @torch.inference_mode()
    def run(self, batch: PackedBatch, options: Sequence[RerankOptions]) -> list[float]:
        hidden = self.encoder(batch)
        first = hidden[batch.cu_seqlens[: len(options)].long()]
        return self.head(first).float().cpu().tolist()
