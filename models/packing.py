"""Packed (padding-free) batches: every sequence's tokens laid end to end, plus cu_seqlens.

A batch of sequences of lengths [3, 1, 4] is carried as one flat token vector of 8 ids and
``cu_seqlens = [0, 3, 4, 8]``; sequence ``i`` owns tokens ``cu_seqlens[i]:cu_seqlens[i+1]``.
Nothing is computed for padding because there is none.

CPU batch invariance: the CPU matrix multiply rounds differently for very small row counts (on
the 2-core AVX2 machine, 1–3, 5–7, 9–11 rows differ from 4, 8 and 12+), so an input embedded alone
would not be bit-identical to the same input inside a larger batch. CPU batches are therefore
topped up to ``CPU_MIN_TOKENS`` rows with a filler sequence whose outputs heads drop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

CPU_MIN_TOKENS = 16


@dataclass(frozen=True)
class PackedBatch:
    """One model batch on one device.

    input_ids:      [total_tokens] int64
    token_type_ids: [total_tokens] int64, or None when every type id is 0
    positions:      [total_tokens] int64, 0-based position of each token inside its sequence;
                    families add their own offset (XLM-R starts at padding_idx + 1)
    cu_seqlens:     [num_seqs + 1] int32 on the device, cumulative sequence lengths
    seq_lens:       host copy of the per-sequence lengths (avoids device syncs)
    max_seqlen:     longest sequence in the batch
    num_inputs:     sequences that carry inputs; any after them are filler whose results heads drop
    adapters:       per input, the task adapter (LoRA) it runs with, or None for the base weights;
                    empty when no input names one. Encoders without adapters ignore it.
    """

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor | None
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    seq_lens: tuple[int, ...]
    max_seqlen: int
    num_inputs: int
    adapters: tuple[str | None, ...] = ()

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def total_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def sequence_index(self) -> torch.Tensor:
        """[total_tokens] which sequence each token belongs to."""
        lens = torch.tensor(self.seq_lens, dtype=torch.long, device=self.device)
        return torch.repeat_interleave(torch.arange(self.num_seqs, device=self.device), lens)


def pack_sequences(
    ids: Sequence[Sequence[int]],
    type_ids: Sequence[Sequence[int]] | None = None,
    device: torch.device | str = "cpu",
    pin_memory: bool = False,
    min_tokens: int | None = None,
) -> PackedBatch:
    """Pack token id lists into a PackedBatch on ``device``.

    Building happens on the host with numpy (one allocation per field) and is copied to the
    device once; with ``pin_memory`` the host buffers are page-locked so the copy can be async.
    ``min_tokens`` (default: CPU_MIN_TOKENS on CPU, 0 elsewhere) appends a filler sequence of
    token id 0 to smaller batches.
    """
    if not ids:
        raise ValueError("cannot pack an empty batch")
    num_inputs = len(ids)
    if min_tokens is None:
        min_tokens = CPU_MIN_TOKENS if torch.device(device).type == "cpu" else 0
    missing = min_tokens - sum(len(s) for s in ids)
    if missing > 0:
        ids = [*ids, [0] * missing]
        if type_ids is not None:
            type_ids = [*type_ids, [0] * missing]
    seq_lens = tuple(len(s) for s in ids)
    if min(seq_lens) == 0:
        raise ValueError("cannot pack an empty sequence")
    flat_ids = np.fromiter((t for s in ids for t in s), dtype=np.int64, count=sum(seq_lens))
    cu = np.zeros(len(seq_lens) + 1, dtype=np.int32)
    np.cumsum(seq_lens, out=cu[1:])
    positions = np.arange(cu[-1], dtype=np.int64) - np.repeat(cu[:-1].astype(np.int64), seq_lens)

    flat_types = None
    if type_ids is not None and any(any(t) for t in type_ids):
        flat_types = np.fromiter((t for s in type_ids for t in s), dtype=np.int64, count=len(flat_ids))

    def to_device(array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if pin_memory:
            tensor = tensor.pin_memory()
        return tensor.to(device, non_blocking=pin_memory)

    return PackedBatch(
        input_ids=to_device(flat_ids),
        token_type_ids=None if flat_types is None else to_device(flat_types),
        positions=to_device(positions),
        cu_seqlens=to_device(cu),
        seq_lens=seq_lens,
        max_seqlen=max(seq_lens),
        num_inputs=num_inputs,
    )
