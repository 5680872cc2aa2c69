"""Variable-length self-attention over packed tokens.

q, k, v arrive as [total_tokens, heads, head_dim] with the batch's cu_seqlens; the output has the
shape of q. The implementation is chosen per call from the device and dtype:

- CUDA, fp16/bf16: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention varlen), one kernel
  for the whole batch that never touches padding.
- CPU: one ``scaled_dot_product_attention`` call per sequence on views of the packed tensors. On
  the 2-core CPU machine this measured faster than a padded call with a key mask and than padded
  length groups (``benchmarks/bench_attention_cpu.py`` prints the three side by side): the
  unmasked call takes SDPA's fused CPU kernel and computes no padding.
- CUDA fp32 (or a torch without varlen): one padded SDPA call with a key-padding mask, since a
  loop of small kernels would be launch-bound on a GPU.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .packing import PackedBatch


@functools.cache
def _varlen_attn() -> Callable | None:
    """torch's varlen front end as ``call(q, k, v, cu_seqlens, max_seqlen, causal)``, or None.

    Its keyword for causality changed between releases: torch 2.10 takes ``is_causal``, 2.11 and
    later a ``window_size`` pair where (-1, 0) is causal. A torch with neither is not used.
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch without the varlen front end
        return None
    return adapt_varlen_attn(varlen_attn)


def adapt_varlen_attn(varlen_attn: Callable) -> Callable | None:
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        def causal_kwargs(causal: bool) -> dict:
            return {"window_size": (-1, 0) if causal else (-1, -1)}
    elif "is_causal" in params:
        def causal_kwargs(causal: bool) -> dict:
            return {"is_causal": causal}
    else:
        return None

    def call(q, k, v, cu_seqlens, max_seqlen, causal):
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **causal_kwargs(causal))

    return call


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: PackedBatch,
    causal: bool = False,
) -> torch.Tensor:
    """Attention of each sequence's queries over its own keys only.

    q: [T, Hq, D]; k, v: [T, Hkv, D] with Hq a multiple of Hkv (grouped-query attention).
    Returns [T, Hq, D] in q's dtype. The softmax scale is 1/sqrt(D).
    """
    if not q.is_cuda:
        return per_sequence_attention(q, k, v, batch.seq_lens, causal)
    varlen_attn = _varlen_attn()
    if varlen_attn is not None and q.dtype in (torch.float16, torch.bfloat16):
        k, v = _repeat_kv(q, k, v)
        return varlen_attn(q, k, v, batch.cu_seqlens, batch.max_seqlen, causal)
    return padded_attention(q, k, v, batch, causal)


def per_sequence_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: tuple[int, ...],
    causal: bool = False,
) -> torch.Tensor:
    """One SDPA call per sequence; the plain reference every other path is tested against.

    Views are 4-D ([1, heads, len, dim]): SDPA's fused CPU kernel only takes 4-D inputs and a 3-D
    call falls back to the unfused math path, about 2x slower here.
    """
    gqa = q.shape[1] != k.shape[1]
    qs, ks, vs = (x.transpose(0, 1).unsqueeze(0).split(seq_lens, dim=2) for x in (q, k, v))
    outs = [
        F.scaled_dot_product_attention(qi, ki, vi, is_causal=causal, enable_gqa=gqa)
        for qi, ki, vi in zip(qs, ks, vs)
    ]
    return torch.cat(outs, dim=2).squeeze(0).transpose(0, 1)


def padded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: PackedBatch,
    causal: bool = False,
) -> torch.Tensor:
    """Scatter into [B, max_len] slots, one masked SDPA call, gather the real tokens back."""
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k.shape[1]
    num_seqs, max_len = batch.num_seqs, batch.max_seqlen
    # Slot of every packed token in the padded [B * max_len] layout.
    slot = batch.sequence_index() * max_len + batch.positions
    valid = torch.zeros(num_seqs * max_len, dtype=torch.bool, device=q.device)
    valid[slot] = True

    def scatter(x: torch.Tensor, h: int) -> torch.Tensor:
        padded = x.new_zeros(num_seqs * max_len, h, head_dim)
        padded[slot] = x
        return padded.view(num_seqs, max_len, h, head_dim).transpose(1, 2)

    mask = valid.view(num_seqs, 1, 1, max_len)
    if causal:
        mask = mask & torch.ones(max_len, max_len, dtype=torch.bool, device=q.device).tril()
    out = F.scaled_dot_product_attention(
        scatter(q, heads), scatter(k, kv_heads), scatter(v, kv_heads),
        attn_mask=mask, enable_gqa=heads != kv_heads,
    )
    return out.transpose(1, 2).reshape(num_seqs * max_len, heads, head_dim)[slot]


def _repeat_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if k.shape[1] == q.shape[1]:
        return k, v
    repeat = q.shape[1] // k.shape[1]
    return k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
