"""Packed multi-task LoRA: a model's task adapters kept factored beside one copy of the base weights,
each input of a packed batch running with its own task's adapter.

Used by both families that ship task adapters: Jina's XLM-R (jina-embeddings-v3, jina-clip-v2; every
task stacked in the checkpoint, jina_xlmr.py) and the Llama-like encoders (jina-embeddings-v5; one
PEFT folder per task, llama_like.py). Each family only reads its own layout into ``LowRankDelta``s;
what runs is the same:

- per batch, ``task_rows`` maps every task present to its token rows (``TaskRows``), from
  ``PackedBatch.adapters`` (None: the model's default adapter, usually the base weights);
- an ``AdaptedLinear`` / ``AdaptedEmbedding`` computes its base output over all tokens, then adds,
  for each task present, ``(x[rows] @ Aᵀ) @ (B · scale)ᵀ`` to that task's rows only: two rank-r
  matmuls per task present, nothing for tokens on the base weights, no merged per-task weights.

A token's result does not depend on the tasks of the tokens beside it: on CPU, where a matmul over
very few rows rounds differently (packing.py), the low-rank products always run over at least
``MIN_LORA_ROWS`` rows, so an input is bit-identical alone and inside a mixed-task batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .layers import WeightReader, assign
from .packing import CPU_MIN_TOKENS, PackedBatch

# Fewest rows a low-rank matmul runs over (see TaskRows.computed).
MIN_LORA_ROWS = CPU_MIN_TOKENS


@dataclass(frozen=True)
class TaskRows:
    """The rows of a packed batch that one task's adapter applies to.

    task:     the adapter's index
    rows:     the task's token rows: a slice when its sequences sit side by side (always so in a
              single-task batch), else an index tensor
    computed: the rows the low-rank matmuls run over: ``rows`` topped up with other rows to at least
              MIN_LORA_ROWS, whose results are dropped. A CPU matmul rounds a row differently when
              it runs over very few rows (see packing.py), so without this an input would not give
              bit-identical results alone and inside a mixed-task batch.
    keep:     which of the computed rows are ``rows``
    """

    task: int
    rows: slice | torch.Tensor
    computed: slice | torch.Tensor
    keep: slice

    @classmethod
    def of_runs(cls, task: int, runs: list[tuple[int, int]], total_rows: int, device: torch.device) -> TaskRows:
        """From the task's runs of consecutive rows [start, end), in order."""
        if len(runs) == 1:
            start, end = runs[0]
            wide_start = max(0, min(start, total_rows - MIN_LORA_ROWS))
            wide_end = min(total_rows, max(end, wide_start + MIN_LORA_ROWS))
            keep = slice(start - wide_start, end - wide_start)
            return cls(task, slice(start, end), slice(wide_start, wide_end), keep)
        rows = np.concatenate([np.arange(start, end) for start, end in runs])
        computed = np.concatenate([rows, np.full(max(0, MIN_LORA_ROWS - len(rows)), rows[0])])
        index = torch.from_numpy(computed).to(device)
        return cls(task, index[: len(rows)], index, slice(0, len(rows)))


def task_rows(
    batch: PackedBatch, adapter_names: Sequence[str], default: str | None = None, family: str = "this"
) -> list[TaskRows]:
    """Which token rows each task present in ``batch`` covers.

    An input's task is its ``batch.adapters`` entry, or ``default`` when that is None (jina-clip-v2
    always applies its default adapter; None: the base weights). Filler sequences, and every input of
    a model without adapters, run on the base weights only. Raises ValueError for a task the model
    has no adapter for.
    """
    if not adapter_names or (default is None and not any(batch.adapters)):
        return []
    runs: dict[int, list[tuple[int, int]]] = {}
    start = 0
    for i, length in enumerate(batch.seq_lens[: batch.num_inputs]):
        name = batch.adapters[i] if i < len(batch.adapters) else None
        if name is None:
            name = default
        if name is not None:
            task_runs = runs.setdefault(_adapter_index(adapter_names, name, family), [])
            if task_runs and task_runs[-1][1] == start:
                task_runs[-1] = (task_runs[-1][0], start + length)
            else:
                task_runs.append((start, start + length))
        start += length
    return [TaskRows.of_runs(task, task_runs, batch.total_tokens, batch.device) for task, task_runs in runs.items()]


def _adapter_index(adapter_names: Sequence[str], name: str, family: str) -> int:
    try:
        return adapter_names.index(name)
    except ValueError:
        raise ValueError(
            f"{family} model has no task adapter {name!r} (adapters: {', '.join(adapter_names)})"
        ) from None


class LowRankDelta(nn.Module):
    """One task's LoRA on one adapted module, kept factored.

    a:     [R, in_features] for a linear layer: the A matrices of every adapted part stacked along
           the rank; or [num_embeddings, R] for an embedding table, whose down-projection of token v
           is row v (``lookup``)
    parts: (output columns of the part, B · scale [part_out, r]) per adapted part, in the order of
           their ranks in ``a``; parts the adapter leaves alone have none
    """

    def __init__(self, a: torch.Tensor, parts: Sequence[tuple[slice, torch.Tensor]], lookup: bool = False):
        super().__init__()
        self.a = nn.Parameter(a, requires_grad=False)
        self.b = nn.ParameterList(nn.Parameter(b, requires_grad=False) for _, b in parts)
        ends = list(accumulate(b.shape[1] for _, b in parts))
        self.columns_and_ranks = tuple(
            (columns, slice(end - b.shape[1], end)) for (columns, b), end in zip(parts, ends, strict=True)
        )
        self.lookup = lookup

    def add_into(self, y: torch.Tensor, x: torch.Tensor, route: TaskRows) -> None:
        """y[rows] += (x[rows] @ A^T) @ B^T, part by part, in place (x: activations, or token ids
        for an embedding table)."""
        contiguous = isinstance(route.rows, slice)
        inputs = x[route.computed] if contiguous else x.index_select(0, route.computed)
        xa = self.a[inputs] if self.lookup else F.linear(inputs, self.a)
        for (columns, ranks), b in zip(self.columns_and_ranks, self.b):
            delta = F.linear(xa[:, ranks], b)[route.keep]
            if contiguous:
                y[route.rows, columns] += delta
            else:
                y[:, columns].index_add_(0, route.rows, delta)


class _Adapted(nn.Module):
    """Task index → its delta, as submodules (in the state dict, moved with the module)."""

    def __init__(self) -> None:
        super().__init__()
        self.deltas = nn.ModuleDict()

    def set_delta(self, task: int, delta: LowRankDelta) -> None:
        self.deltas[str(task)] = delta

    def clear_deltas(self) -> None:
        self.deltas.clear()

    def _add_deltas(self, y: torch.Tensor, x: torch.Tensor, routes: list[TaskRows]) -> torch.Tensor:
        for route in routes:
            key = str(route.task)
            if key in self.deltas:
                self.deltas[key].add_into(y, x, route)
        return y


class AdaptedLinear(_Adapted):
    """A linear layer whose output is its ``part_sizes`` side by side (q|k|v, gate|up, or one part),
    plus per-task low-rank deltas applied only to the rows ``routes`` assign to each task."""

    def __init__(self, in_features: int, part_sizes: tuple[int, ...], bias: bool):
        super().__init__()
        self.linear = nn.Linear(in_features, sum(part_sizes), bias=bias)
        self.part_sizes = part_sizes
        ends = list(accumulate(part_sizes))
        self.part_columns = tuple(slice(end - size, end) for end, size in zip(ends, part_sizes))

    def forward(self, x: torch.Tensor, routes: list[TaskRows]) -> torch.Tensor:
        return self._add_deltas(self.linear(x), x, routes)

    def load(self, reader: WeightReader, prefixes: list[str]) -> None:
        """Fill the fused weight (and bias) from one checkpoint projection per part."""
        assign(self.linear, "weight", torch.cat([reader.get(p + ".weight") for p in prefixes]))
        if self.linear.bias is not None:
            assign(self.linear, "bias", torch.cat([reader.get(p + ".bias") for p in prefixes]))


class AdaptedEmbedding(_Adapted):
    """An embedding table plus per-task low-rank deltas (``LowRankDelta`` with ``lookup``) applied
    only to the rows ``routes`` assign to each task."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim))

    def forward(self, ids: torch.Tensor, routes: list[TaskRows]) -> torch.Tensor:
        return self._add_deltas(F.embedding(ids, self.weight), ids, routes)
