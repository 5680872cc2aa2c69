"""Segment pooling over packed tokens: cls / mean / max / last, then Matryoshka truncation + L2.

``segment_pool`` reduces each sequence's rows of ``hidden`` [total_tokens, H] (sequence i owns rows
cu_seqlens[i]:cu_seqlens[i+1]) to one vector, accumulating in fp32. ``truncate_normalize`` keeps the
first ``dims[i]`` components of row i (zeroing the rest) and L2-normalises the rows flagged in
``normalize``: truncate first, then normalise, as Matryoshka models are meant to be used.

This file holds the plain-torch reference; it is also the CPU path.
"""

from __future__ import annotations

import torch

POOLING_MODES = ("cls", "mean", "max", "last", "mean_sqrt_len")


def segment_pool(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mode: str,
    skip_leading: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool each packed sequence to one vector.

    hidden:       [T, H] any float dtype
    cu_seqlens:   [B + 1] int32/int64 cumulative lengths, on hidden's device
    mode:         one of POOLING_MODES; 'cls' takes the first counted token, 'last' the last token
    skip_leading: optional [B] int, leading tokens of each sequence left out of the pool (an
                  instruction prompt that sentence-transformers' ``include_prompt=False`` excludes)
    Returns [B, H] float32.
    """
    if mode not in POOLING_MODES:
        raise ValueError(f"unknown pooling mode {mode!r}")
    total, width = hidden.shape
    num_seqs = cu_seqlens.numel() - 1
    starts = cu_seqlens[:-1].long()
    ends = cu_seqlens[1:].long()
    if skip_leading is not None:
        starts = torch.minimum(starts + skip_leading.long(), ends)

    if mode == "last":
        return hidden[ends - 1].float()
    if mode == "cls":
        return hidden[torch.minimum(starts, ends - 1)].float()

    token = torch.arange(total, device=hidden.device)
    segment = torch.searchsorted(ends, token, right=True)
    counted = token >= starts[segment]
    counts = (ends - starts).to(torch.float32).unsqueeze(1)
    if mode == "max":
        out = torch.full((num_seqs, width), float("-inf"), dtype=torch.float32, device=hidden.device)
        out.scatter_reduce_(
            0, segment[counted].unsqueeze(1).expand(-1, width), hidden[counted].float(), "amax", include_self=True
        )
        return torch.where(counts > 0, out, torch.zeros_like(out))
    sums = torch.zeros(num_seqs, width, dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, segment[counted], hidden[counted].float())
    counts = counts.clamp(min=1e-9)
    return sums / (counts if mode == "mean" else counts.sqrt())


def truncate_normalize(pooled: torch.Tensor, dims: torch.Tensor, normalize: torch.Tensor) -> torch.Tensor:
    """pooled [B, H] fp32; dims [B] int (1..H); normalize [B] bool. Returns [B, H], zero past dims."""
    width = pooled.shape[1]
    keep = torch.arange(width, device=pooled.device).unsqueeze(0) < dims.unsqueeze(1)
    out = pooled * keep
    norms = out.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return torch.where(normalize.unsqueeze(1), out / norms, out)
