"""Segment pooling over packed tokens: cls / mean / max / last, then Matryoshka truncation + L2.

``segment_pool`` reduces each sequence's rows of ``hidden`` [total_tokens, H] (sequence i owns rows
cu_seqlens[i]:cu_seqlens[i+1]) to one vector, accumulating in fp32. ``truncate_normalize`` keeps the
first ``dims[i]`` components of row i (zeroing the rest) and L2-normalises the rows flagged in
``normalize``: truncate first, then normalise, as Matryoshka models are meant to be used.
``pool_truncate_normalize`` is the two in one call, for heads with nothing between them.

- ``segment_pool_reference`` and ``truncate_normalize`` are plain torch: the reference, and the CPU
  path. ``padded_pool`` is the same pooling over a padded [B, S, H] layout (the ONNX backend's).
- ``segment_pool_triton`` runs one program per sequence: it walks the sequence's rows in blocks,
  reduces them in fp32 registers and, when given ``dims`` / ``normalize``, truncates and normalises
  the row before its only store. One read of the pooled rows, one [B, H] write, one launch.

``segment_pool`` and ``pool_truncate_normalize`` dispatch: the Triton kernel for CUDA tensors, the
reference otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Sequence

import torch

from .spec import CompileVariant, KernelCase, KernelFunction, KernelSpec, SampleShapes, sampler
from .triton_support import use_triton

POOLING_MODES = ("cls", "mean", "max", "last", "mean_sqrt_len")


def segment_pool_reference(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mode: str,
    skip_leading: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool each packed sequence to one vector.

    hidden:       [T, H] any float dtype
    cu_seqlens:   [B + 1] int32/int64 cumulative lengths, on hidden's device; sequences are not empty
    mode:         one of POOLING_MODES; 'cls' takes the first counted token, 'last' the last token
    skip_leading: optional [B] int, leading tokens of each sequence left out of the pool (an
                  instruction prompt that sentence-transformers' ``include_prompt=False`` excludes)
    Returns [B, H] float32. A sequence whose tokens are all skipped pools to zeros (mean, max,
    mean_sqrt_len) or to its last token (cls).
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


def padded_pool(
    hidden: torch.Tensor,
    lengths: Sequence[int],
    mode: str,
    skip_leading: Sequence[int] | None = None,
) -> torch.Tensor:
    """``segment_pool_reference`` over a padded layout: hidden [B, S, H], row i's tokens in its first
    ``lengths[i]`` positions (what a padded backend such as ONNX Runtime returns). Returns [B, H]
    float32, the same vectors as packing the rows' tokens and pooling them, in a handful of
    operations: packing first and the packed reference's index arithmetic took longer than a short
    query's pooling itself (a sizeable share of the executor's time under concurrent int8 queries,
    in an ad-hoc profile)."""
    if mode not in POOLING_MODES:
        raise ValueError(f"unknown pooling mode {mode!r}")
    batch, width = hidden.shape[0], hidden.shape[1]
    if skip_leading is None and mode in ("mean", "mean_sqrt_len") and min(lengths) == width:
        sums = hidden.float().sum(1)  # no padding, no prompt: every position counts
        return sums / (width if mode == "mean" else math.sqrt(width))
    device = hidden.device
    ends = torch.tensor(lengths, device=device)
    starts = torch.zeros_like(ends) if skip_leading is None else torch.minimum(
        torch.tensor(skip_leading, device=device), ends)
    rows = torch.arange(batch, device=device)
    if mode == "last":
        return hidden[rows, ends - 1].float()
    if mode == "cls":
        return hidden[rows, torch.minimum(starts, ends - 1)].float()
    position = torch.arange(width, device=device)
    counted = (position < ends[:, None]) & (position >= starts[:, None])
    counts = (ends - starts).to(torch.float32).unsqueeze(1)
    if mode == "max":
        out = hidden.float().masked_fill(~counted[..., None], float("-inf")).amax(1)
        return torch.where(counts > 0, out, torch.zeros_like(out))
    sums = (hidden.float() * counted[..., None]).sum(1)
    counts = counts.clamp(min=1e-9)
    return sums / (counts if mode == "mean" else counts.sqrt())


def truncate_normalize(pooled: torch.Tensor, dims: torch.Tensor, normalize: torch.Tensor) -> torch.Tensor:
    """pooled [B, H] fp32; dims [B] int (1..H); normalize [B] bool. Returns [B, H], zero past dims."""
    width = pooled.shape[1]
    keep = torch.arange(width, device=pooled.device).unsqueeze(0) < dims.unsqueeze(1)
    out = pooled * keep
    norms = out.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return torch.where(normalize.unsqueeze(1), out / norms, out)


def pool_truncate_normalize_reference(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mode: str,
    dims: torch.Tensor,
    normalize: torch.Tensor,
    skip_leading: torch.Tensor | None = None,
) -> torch.Tensor:
    """``truncate_normalize(segment_pool(...)[:N], dims, normalize)`` with N = len(dims) <= B: the
    first N sequences are returned ([N, H] float32); any after them (filler) are not."""
    pooled = segment_pool_reference(hidden, cu_seqlens, mode, skip_leading)[: dims.numel()]
    return truncate_normalize(pooled, dims, normalize)


# Kernel modes (constexpr ints: the kernel is compiled once per mode).
_MODE_IDS = {mode: i for i, mode in enumerate(POOLING_MODES)}
# Elements of one [rows, H] tile a program holds in registers; bounds BLOCK_T for wide models.
_TILE_ELEMENTS = 8192


@functools.cache
def _triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def segment_pool_kernel(
        hidden_ptr, cu_seqlens_ptr, skip_ptr, dims_ptr, normalize_ptr, out_ptr,
        width, stride_ht, stride_hk, stride_ob,
        MODE: tl.constexpr, HAS_SKIP: tl.constexpr, EPILOGUE: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        seq = tl.program_id(0)
        start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
        end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
        first = start
        if HAS_SKIP:
            first = tl.minimum(start + tl.load(skip_ptr + seq).to(tl.int64), end)
        cols = tl.arange(0, BLOCK_H)
        col_ok = cols < width
        # Block-shaped, not a scalar: interpreters of some Triton versions refuse a scalar & block mask.
        row_exists = col_ok & ((cols * 0 + end) > start)
        # Modes: 0 cls, 1 mean, 2 max, 3 last, 4 mean_sqrt_len (POOLING_MODES order).
        if MODE == 3:  # last: one row
            acc = tl.load(hidden_ptr + (end - 1) * stride_ht + cols * stride_hk, mask=row_exists, other=0.0)
            acc = acc.to(tl.float32)
        elif MODE == 0:  # cls: the first counted row, or the last when all are skipped
            row = tl.minimum(first, end - 1)
            acc = tl.load(hidden_ptr + row * stride_ht + cols * stride_hk, mask=row_exists, other=0.0)
            acc = acc.to(tl.float32)
        else:
            if MODE == 2:
                acc = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
            else:
                acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
            for row0 in range(first, end, BLOCK_T):
                rows = row0 + tl.arange(0, BLOCK_T)
                mask = (rows < end)[:, None] & col_ok[None, :]
                offsets = rows[:, None] * stride_ht + cols[None, :] * stride_hk
                if MODE == 2:
                    tile = tl.load(hidden_ptr + offsets, mask=mask, other=float("-inf")).to(tl.float32)
                    acc = tl.maximum(acc, tl.max(tile, axis=0))
                else:
                    tile = tl.load(hidden_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
                    acc += tl.sum(tile, axis=0)
            count = (end - first).to(tl.float32)
            if MODE == 2:
                acc = tl.where(count > 0, acc, 0.0)
            elif MODE == 1:
                acc = acc / tl.maximum(count, 1e-9)
            else:
                acc = acc / tl.sqrt(tl.maximum(count, 1e-9))
        if EPILOGUE:
            acc = tl.where(cols < tl.load(dims_ptr + seq), acc, 0.0)
            norm = tl.sqrt(tl.sum(acc * acc, axis=0))
            acc = tl.where(tl.load(normalize_ptr + seq) != 0, acc / tl.maximum(norm, 1e-12), acc)
        tl.store(out_ptr + seq * stride_ob + cols, acc, mask=col_ok)

    return segment_pool_kernel


def segment_pool_triton(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mode: str,
    skip_leading: torch.Tensor | None = None,
    dims: torch.Tensor | None = None,
    normalize: torch.Tensor | None = None,
    block_t: int | None = None,
) -> torch.Tensor:
    """The kernel. Without ``dims``/``normalize``: the contract of ``segment_pool_reference``. With
    both: that of ``pool_truncate_normalize_reference`` (only the first len(dims) sequences are
    computed). ``block_t``: rows per step, a power of two (default: what fits the tile budget)."""
    import triton

    if mode not in POOLING_MODES:
        raise ValueError(f"unknown pooling mode {mode!r}")
    if (dims is None) != (normalize is None):
        raise ValueError("dims and normalize go together")
    width = hidden.shape[1]
    num_seqs = cu_seqlens.numel() - 1 if dims is None else dims.numel()
    out = torch.empty(num_seqs, width, dtype=torch.float32, device=hidden.device)
    if num_seqs == 0:
        return out
    block_h = triton.next_power_of_2(width)
    if block_t is None:
        block_t = max(1, min(64, _TILE_ELEMENTS // block_h))
    epilogue = dims is not None
    cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
    # Unused pointers (no skip, no epilogue) may be anything: the kernel never reads them.
    skip = skip_leading.to(torch.int32).contiguous() if skip_leading is not None else cu_seqlens
    dims = dims.to(torch.int32).contiguous() if epilogue else cu_seqlens
    normalize = normalize.to(torch.int32).contiguous() if epilogue else cu_seqlens
    with torch.cuda.device(hidden.device) if hidden.is_cuda else contextlib.nullcontext():
        _triton_kernel()[(num_seqs,)](
            hidden, cu_seqlens, skip, dims, normalize, out,
            width, hidden.stride(0), hidden.stride(1), out.stride(0),
            MODE=_MODE_IDS[mode], HAS_SKIP=skip_leading is not None, EPILOGUE=epilogue,
            BLOCK_T=block_t, BLOCK_H=block_h,
            num_warps=4 if block_h <= 1024 else 8,
        )
    return out


def pool_truncate_normalize_triton(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mode: str,
    dims: torch.Tensor,
    normalize: torch.Tensor,
    skip_leading: torch.Tensor | None = None,
    block_t: int | None = None,
) -> torch.Tensor:
    """The kernel with its epilogue, in the argument order of ``pool_truncate_normalize_reference``."""
    return segment_pool_triton(hidden, cu_seqlens, mode, skip_leading, dims, normalize, block_t)


def segment_pool(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mode: str,
    skip_leading: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatch (contract of ``segment_pool_reference``): the kernel on CUDA, the reference elsewhere."""
    if use_triton("segment_pool", hidden):
        return segment_pool_triton(hidden, cu_seqlens, mode, skip_leading)
    return segment_pool_reference(hidden, cu_seqlens, mode, skip_leading)


def pool_truncate_normalize(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mode: str,
    dims: torch.Tensor,
    normalize: torch.Tensor,
    skip_leading: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatch (contract of ``pool_truncate_normalize_reference``): one fused kernel on CUDA."""
    if use_triton("segment_pool", hidden):
        return pool_truncate_normalize_triton(hidden, cu_seqlens, mode, dims, normalize, skip_leading)
    return pool_truncate_normalize_reference(hidden, cu_seqlens, mode, dims, normalize, skip_leading)


# ---- registry -----------------------------------------------------------------------------------

def _sample_cases(
    shapes: SampleShapes, device: torch.device, dtype: torch.dtype, generator: torch.Generator
) -> list[KernelCase]:
    """Every pooling mode with the epilogue: sequences alternately skip a prompt, keep a Matryoshka
    prefix and stay unnormalised, so each branch of the kernel runs."""
    h, seqs = shapes.hidden_size, len(shapes.lengths)
    hidden, cu = sampler(device, dtype, generator)(shapes.tokens, h), shapes.cu_seqlens(device)

    def cycle(pattern: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([pattern[i % len(pattern)] for i in range(seqs)], dtype=dtype, device=device)

    dims = cycle((h, max(1, h // 2), h, h), torch.int32)
    normalize = cycle((True, True, False, True), torch.bool)
    skip = torch.minimum(cycle((1, 0, 2, 0), torch.int32), cu[1:] - cu[:-1] - 1)  # a token left to pool
    shape = {"tokens": shapes.tokens, "hidden": h, "dtype": str(dtype).removeprefix("torch.")}
    return [
        KernelCase(f"segment_pool_{mode}_normalize", SPEC.functions["pool_truncate_normalize"],
                   (hidden, cu, mode, dims, normalize, skip), shape)
        for mode in POOLING_MODES
    ]


def _compile_variants(arg_names: Sequence[str]) -> list[CompileVariant]:
    variants = []
    for mode, (has_skip, epilogue), dtype in itertools.product(
        range(len(POOLING_MODES)), ((False, False), (True, True)), ("*bf16", "*fp32")
    ):
        types = {name: "*i32" for name in arg_names if name.endswith("_ptr")}
        types.update(hidden_ptr=dtype, out_ptr="*fp32", width="i32", stride_ht="i32", stride_hk="i32",
                     stride_ob="i32")
        constexprs = {"MODE": mode, "HAS_SKIP": has_skip, "EPILOGUE": epilogue, "BLOCK_T": 8, "BLOCK_H": 1024}
        variants.append(CompileVariant(f"{constexprs} {dtype}", types, constexprs))
    return variants


SPEC = KernelSpec(
    name="segment_pool",
    functions={
        "pool_truncate_normalize": KernelFunction(pool_truncate_normalize_reference, pool_truncate_normalize_triton)
    },
    jit=_triton_kernel,
    sample_cases=_sample_cases,
    compile_variants=_compile_variants,
)
