"""SPLADE expansion: max over a sequence's tokens of log(1 + relu(token · vocab_row + bias)).

    out[b, v] = max_{t in seq b} log1p(relu(hidden[t] · weight[v] + bias[v]))

hidden [T, H] are the MLM head's transformed states of a packed batch (sequence b owns rows
cu_seqlens[b]:cu_seqlens[b+1]); weight [V, H] is the decoder (tied to the word embeddings); the
result is [B, V] float32. The [T, V] logits are never materialised:

- ``splade_pool_reference`` (plain torch, the CPU path) computes logits for a chunk of tokens at a
  time and folds them into the running per-sequence max, so peak memory is chunk × V.
- ``splade_pool_triton`` tiles (sequence, vocab block): each program walks its sequence's tokens in
  blocks, computes the [tokens, vocab-block] GEMM tile in registers, and keeps only the running max
  of each column; bias, relu and log1p are applied once in the epilogue (all three are monotone, so
  max-then-transform equals transform-then-max).

``splade_pool`` dispatches: the Triton kernel for CUDA tensors, the reference otherwise.
"""

from __future__ import annotations

import contextlib
import functools

import torch

# Reference: tokens per chunk; peak extra memory is CHUNK_TOKENS × V × 4 bytes (~31 MiB at V=30522).
CHUNK_TOKENS = 256


def splade_pool_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    chunk_tokens: int = CHUNK_TOKENS,
) -> torch.Tensor:
    """hidden [T, H], weight [V, H], bias [V] or None, cu_seqlens [B + 1] → [B, V] float32.

    The logits are computed in weight's dtype (hidden is cast to it), ``chunk_tokens`` rows at a
    time, into one reused [chunk, V] buffer; each chunk is folded into the running per-sequence max
    with one ``amax`` per sequence that overlaps it (a chunk crosses few sequence boundaries). Bias,
    relu and log1p, all monotone, are applied once to the [B, V] maxima. Sequences of length 0 get
    all-zero rows.
    """
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    total = hidden.shape[0]
    vocab = weight.shape[0]
    bounds = cu_seqlens.tolist()
    num_seqs = len(bounds) - 1
    # Running max of the raw logits; -inf until a sequence's first token is seen.
    best = torch.full((num_seqs, vocab), float("-inf"), dtype=torch.float32, device=hidden.device)
    # Reusing one buffer spares the allocator (on CPU: mmap, page faults) a chunk × V block per chunk.
    buffer = torch.empty(min(chunk_tokens, total), vocab, dtype=weight.dtype, device=hidden.device)
    seq = 0
    for start in range(0, total, chunk_tokens):
        stop = min(start + chunk_tokens, total)
        logits = torch.mm(hidden[start:stop], weight.T, out=buffer[: stop - start])
        # Sequences starting before this chunk's end, from the one the previous chunk stopped in.
        while seq < num_seqs and bounds[seq] < stop:
            first, last = max(bounds[seq], start), min(bounds[seq + 1], stop)
            if last > first:
                segment_max = logits[first - start : last - start].amax(dim=0)
                if first == bounds[seq]:  # the sequence's first tokens: nothing to fold into yet
                    best[seq] = segment_max
                else:
                    torch.maximum(best[seq], segment_max.float(), out=best[seq])
            if bounds[seq + 1] > stop:  # it goes on into the next chunk
                break
            seq += 1
    if bias is not None:
        best += bias.float()
    return best.clamp_(min=0.0).log1p_()


@functools.cache
def _triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def splade_pool_kernel(
        hidden_ptr, weight_ptr, bias_ptr, cu_seqlens_ptr, out_ptr,
        vocab, width,
        stride_ht, stride_hk, stride_wv, stride_wk, stride_ob,
        HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # Vocab blocks vary slowest so consecutive programs (different sequences) share the same
        # weight tile in L2.
        seq = tl.program_id(0)
        vblock = tl.program_id(1)
        start = tl.load(cu_seqlens_ptr + seq)
        end = tl.load(cu_seqlens_ptr + seq + 1)
        cols = vblock * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < vocab
        best = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
        for row0 in range(start, end, BLOCK_T):
            rows = row0 + tl.arange(0, BLOCK_T)
            row_ok = rows < end
            acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
            for k0 in range(0, width, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < width
                h = tl.load(
                    hidden_ptr + rows[:, None] * stride_ht + ks[None, :] * stride_hk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0,
                )
                w = tl.load(
                    weight_ptr + cols[None, :] * stride_wv + ks[:, None] * stride_wk,
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0,
                )
                acc = tl.dot(h, w, acc, input_precision=INPUT_PRECISION)
            acc = tl.where(row_ok[:, None], acc, float("-inf"))
            best = tl.maximum(best, tl.max(acc, axis=0))
        if HAS_BIAS:
            best += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        # log1p(x) as log(1 + x): for relu'd x >= 0 the plain form's error is absolute, about 6e-8
        # in fp32 (the rounding of 1 + x), and log1p is only in CUDA's libdevice.
        result = tl.log(1.0 + tl.maximum(best, 0.0))
        tl.store(out_ptr + seq * stride_ob + cols, result, mask=col_ok)

    return splade_pool_kernel


def splade_pool_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    block_t: int = 64,
    block_v: int = 128,
    block_k: int = 64,
) -> torch.Tensor:
    """The fused kernel; same contract as ``splade_pool_reference``. Block sizes are powers of two."""
    num_seqs = cu_seqlens.numel() - 1
    vocab, width = weight.shape
    out = torch.empty(num_seqs, vocab, dtype=torch.float32, device=hidden.device)
    if num_seqs == 0:
        return out
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    has_bias = bias is not None
    # The kernel indexes bias and cu_seqlens with unit stride (hidden and weight go by their strides);
    # without a bias any pointer will do, it is never read.
    bias = bias.contiguous() if has_bias else weight
    cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
    grid = (num_seqs, (vocab + block_v - 1) // block_v)
    # Triton launches on the current CUDA device, which need not be the tensors' one.
    with torch.cuda.device(hidden.device) if hidden.is_cuda else contextlib.nullcontext():
        _triton_kernel()[grid](
            hidden, weight, bias, cu_seqlens, out,
            vocab, width,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), out.stride(0),
            HAS_BIAS=has_bias,
            # fp32 weights get full-precision products (torch's default for fp32 matmul), not TF32
            INPUT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
            BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_K=block_k,
        )
    return out


def splade_pool(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
) -> torch.Tensor:
    """Dispatch: the fused Triton kernel on CUDA, the chunked reference elsewhere."""
    if hidden.is_cuda and _triton_available():
        return splade_pool_triton(hidden, weight, bias, cu_seqlens)
    return splade_pool_reference(hidden, weight, bias, cu_seqlens)


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
