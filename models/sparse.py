"""Learned sparse embeddings (SPLADE / ELSER): encoder → MLM transform → fused vocab expansion.

    weight(term v) = max over the input's tokens of log(1 + relu(logit_v))

The [tokens, vocab] logits are never materialised (``kernels.splade_pool``), and the non-zero
(term id, weight) pairs are extracted on the device: sorted by weight, pruned by ``top_k`` /
``min_weight``, and only those copied to the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..kernels.splade_pool import splade_pool
from .contract import Encoder
from .packing import PackedBatch


@dataclass(frozen=True, slots=True)
class SparseOptions:
    """Per-input pruning. Terms with weight <= ``min_weight`` are dropped, then the ``top_k``
    heaviest are kept (None: all)."""

    top_k: int | None = None
    min_weight: float = 0.0


@dataclass(frozen=True, slots=True)
class SparseVector:
    """Term ids and weights, heaviest first."""

    ids: np.ndarray  # int32
    weights: np.ndarray  # float32

    def __len__(self) -> int:
        return len(self.ids)


class MlmHead(nn.Module):
    """Masked-LM prediction head: dense → activation → LayerNorm → decoder (+ bias).

    Families build it from their own checkpoint names (``contract.Heads.mlm``); ``transform`` runs
    per token, the decoder product is left to the fused expansion.
    """

    def __init__(self, hidden_size: int, vocab_size: int, eps: float, act: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.act = act
        self.decoder_weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.decoder_bias = nn.Parameter(torch.empty(vocab_size), requires_grad=False)

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(hidden)))


def extract_sparse(pooled: torch.Tensor, options: Sequence[SparseOptions]) -> list[SparseVector]:
    """[B, V] non-negative weights → per row the kept (id, weight) pairs, heaviest first.

    Runs on pooled's device; only B × (largest kept count) values cross to the host.
    """
    rows = pooled.shape[0]
    thresholds = torch.tensor([o.min_weight for o in options], dtype=pooled.dtype, device=pooled.device)
    counts = (pooled > thresholds.unsqueeze(1)).sum(dim=1).tolist()
    keep = [min(c, o.top_k) if o.top_k is not None else c for c, o in zip(counts, options)]
    widest = max(keep, default=0)
    if widest == 0:
        empty = SparseVector(np.empty(0, np.int32), np.empty(0, np.float32))
        return [empty] * rows
    weights, ids = torch.topk(pooled, widest, dim=1, largest=True, sorted=True)
    weights = weights.cpu().numpy()
    ids = ids.to(torch.int32).cpu().numpy()
    return [SparseVector(ids[i, :k].copy(), weights[i, :k].copy()) for i, k in enumerate(keep)]


class SparseEmbeddingModel:
    """A packed encoder with an MLM head pooled SPLADE-style (a ``contract.Runner``). ``run`` writes
    no state, so the executor threads of one model share it."""

    task: ClassVar[str] = "sparse_embedding"
    listwise: ClassVar[bool] = False
    pooling = "splade"

    def __init__(self, encoder: Encoder, head: MlmHead):
        self.encoder = encoder
        self.head = head
        self.dimensions = head.decoder_weight.shape[0]

    @staticmethod
    def default_options() -> SparseOptions:
        return SparseOptions()

    @torch.inference_mode()
    def expand(self, batch: PackedBatch) -> torch.Tensor:
        """[num_inputs, V] float32 term weights on the device (filler sequences dropped)."""
        hidden = self.head.transform(self.encoder(batch))
        pooled = splade_pool(hidden, self.head.decoder_weight, self.head.decoder_bias, batch.cu_seqlens)
        return pooled[: batch.num_inputs]

    @torch.inference_mode()
    def run(self, batch: PackedBatch, options: Sequence[SparseOptions]) -> list[SparseVector]:
        return extract_sparse(self.expand(batch), options)
