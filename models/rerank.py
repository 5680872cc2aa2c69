"""Cross-encoder rerankers: (query, document) read together as one packed sequence, one logit out.

Heads of the published sequence-classification checkpoints with one label:

- BERT (``BertForSequenceClassification``): ``bert.pooler.dense`` + tanh on the first token, then
  ``classifier`` (hidden → 1);
- XLM-RoBERTa (``XLMRobertaForSequenceClassification``, and Jina's flash layout of
  jina-reranker-v2): ``classifier.dense`` + tanh on the first token, then ``classifier.out_proj``.

``run`` returns raw logits; the engine takes the max over a document's windows and applies the
sigmoid (monotone, so max-then-sigmoid equals sigmoid-then-max).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import CheckpointError
from .layers import WeightReader, assign, load_linear
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


def _num_labels(config: dict) -> int:
    if "num_labels" in config:
        return int(config["num_labels"])
    labels = config.get("id2label")
    return len(labels) if labels else 2


def load_classifier_head(encoder: nn.Module, reader: WeightReader, config: dict) -> ClassifierHead:
    """The head of a one-label sequence-classification checkpoint, in whichever layout it has."""
    labels = _num_labels(config)
    if labels != 1:
        raise CheckpointError(
            f"a sequence classifier with {labels} labels is not a reranker (rerankers have num_labels 1)"
        )
    root = encoder.weight_prefix
    for name in ("bert.", "roberta.", "model."):
        root = root.removesuffix(name)
    with torch.device("meta"):
        head = ClassifierHead(encoder.hidden_size)
    if root + "classifier.out_proj.weight" in reader:  # (XLM-)RoBERTa, Jina flash XLM-R
        load_linear(head.dense, reader, root + "classifier.dense")
        load_linear(head.out, reader, root + "classifier.out_proj")
    elif root + "classifier.weight" in reader:  # BERT: pooler, then classifier
        pooler = encoder.weight_prefix + "pooler.dense"
        if pooler + ".weight" not in reader:
            raise CheckpointError("a BERT sequence classifier needs its pooler (pooler.dense) weights")
        load_linear(head.dense, reader, pooler)
        assign(head.out, "weight", reader.get(root + "classifier.weight"))
        assign(head.out, "bias", reader.get(root + "classifier.bias"))
    else:
        raise CheckpointError(
            "the checkpoint has no sequence-classification head (classifier.*): a reranker needs a "
            "*ForSequenceClassification checkpoint with one label"
        )
    return head.eval()


class RerankModel:
    """A packed encoder with a one-logit classification head. ``run`` writes no state, so the
    executor threads of one model share it."""

    task = "rerank"
    kind = "cross-encoder"
    pooling = "cls"
    dimensions = 1

    def __init__(self, encoder: nn.Module, head: ClassifierHead):
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
