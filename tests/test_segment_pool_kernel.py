"""Segment pooling: the Triton kernel (under the interpreter) against the torch reference, pooling alone
and fused with Matryoshka truncation + L2, on awkward sizes.

Widths that are not powers of two, sequences shorter and longer than the row block (and exactly one
block), length-1 sequences, a batch of one, per-sequence skip_leading including a skip that eats the
whole sequence, bf16 inputs (fp32 accumulation), strided inputs, and filler sequences after the
inputs that the fused call must not return. Sizes stay small: the interpreter runs each program in
Python.
"""

from __future__ import annotations

import pytest
import torch

from infercore.kernels import segment_pool as pool_module
from infercore.kernels.segment_pool import (
    POOLING_MODES,
    pool_truncate_normalize,
    pool_truncate_normalize_reference,
    segment_pool,
    segment_pool_reference,
    segment_pool_triton,
)

ATOL = RTOL = 1e-6
BLOCK_T = 4  # small, so a handful of rows already spans several blocks


def _packed(lengths: list[int], width: int, dtype=torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(sum(lengths), width, generator=gen).to(dtype)
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return hidden, cu_seqlens


CASES = {
    # name: (lengths, width)
    "mixed lengths": ([1, 5, 1, 17, 3, 33, 2], 40),
    "block edges": ([BLOCK_T - 1, BLOCK_T, BLOCK_T + 1, 2 * BLOCK_T], 24),
    "batch of one": ([13], 7),
    "all length one": ([1] * 6, 33),
}


@pytest.mark.parametrize("mode", POOLING_MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_pooling_matches_reference(case: str, mode: str):
    lengths, width = CASES[case]
    hidden, cu_seqlens = _packed(lengths, width)
    got = segment_pool_triton(hidden, cu_seqlens, mode, block_t=BLOCK_T)
    assert got.shape == (len(lengths), width) and got.dtype == torch.float32
    torch.testing.assert_close(got, segment_pool_reference(hidden, cu_seqlens, mode), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_kernel_skip_leading_matches_reference(mode: str):
    """Per-sequence skips: none, some, all but one, and all tokens (cls then takes the last token;
    mean / max / mean_sqrt_len give zeros)."""
    lengths = [4, 9, 3, 30, 1, 6]
    skip = torch.tensor([1, 5, 0, 29, 0, 6])
    hidden, cu_seqlens = _packed(lengths, 20, seed=1)
    torch.testing.assert_close(
        segment_pool_triton(hidden, cu_seqlens, mode, skip_leading=skip, block_t=BLOCK_T),
        segment_pool_reference(hidden, cu_seqlens, mode, skip_leading=skip),
        atol=ATOL,
        rtol=RTOL,
    )


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_fused_truncate_normalize_matches_reference(mode: str):
    """dims from 1 to the full width, normalisation on and off per row, and two filler sequences
    after the inputs that are neither computed nor returned."""
    lengths = [3, 11, 1, 7, 2, 5, 16]  # the last two are filler
    hidden, cu_seqlens = _packed(lengths, 24, seed=2)
    dims = torch.tensor([24, 8, 1, 3, 24])
    normalize = torch.tensor([True, True, True, False, False])
    skip = torch.tensor([1, 2, 0, 0, 1, 0, 0])
    got = segment_pool_triton(hidden, cu_seqlens, mode, skip, dims, normalize, block_t=BLOCK_T)
    expected = pool_truncate_normalize_reference(hidden, cu_seqlens, mode, dims, normalize, skip)
    assert got.shape == (5, 24)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    for i, d in enumerate(dims.tolist()):
        assert torch.count_nonzero(got[i, d:]) == 0
    torch.testing.assert_close(got[:3].norm(dim=1), torch.ones(3))


def test_fused_normalize_of_a_zero_vector_stays_zero():
    """A fully skipped mean-pooled sequence is all zeros: normalising it must not give NaN."""
    hidden, cu_seqlens = _packed([3, 4], 16, seed=3)
    skip = torch.tensor([3, 0])
    dims, normalize = torch.tensor([16, 16]), torch.tensor([True, True])
    got = segment_pool_triton(hidden, cu_seqlens, "mean", skip, dims, normalize, block_t=BLOCK_T)
    assert torch.equal(got[0], torch.zeros(16))
    expected = pool_truncate_normalize_reference(hidden, cu_seqlens, "mean", dims, normalize, skip)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_kernel_default_blocks_match_reference(mode: str):
    """The block the product launches with: rows per step from the tile budget, width 72 → block 128."""
    hidden, cu_seqlens = _packed([70, 1, 129, 5], 72, seed=4)
    torch.testing.assert_close(
        segment_pool_triton(hidden, cu_seqlens, mode), segment_pool_reference(hidden, cu_seqlens, mode),
        atol=ATOL, rtol=RTOL,
    )


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_bf16_hidden_states_accumulate_in_fp32(mode: str):
    hidden, cu_seqlens = _packed([1, 40, 9], 16, dtype=torch.bfloat16, seed=5)
    got = segment_pool_triton(hidden, cu_seqlens, mode, block_t=BLOCK_T)
    assert got.dtype == torch.float32
    # The same bf16 values reduced in fp32 by the reference: a bf16 accumulator would be ~1e-2 off.
    torch.testing.assert_close(got, segment_pool_reference(hidden, cu_seqlens, mode), atol=1e-5, rtol=1e-5)


def test_strided_hidden_and_int64_offsets_match_contiguous():
    hidden, cu_seqlens = _packed([6, 2, 11], 20, seed=6)
    wide = torch.zeros(hidden.shape[0], 33)
    wide[:, 7:27] = hidden
    for mode in POOLING_MODES:
        torch.testing.assert_close(
            segment_pool_triton(wide[:, 7:27], cu_seqlens.to(torch.int64), mode, block_t=BLOCK_T),
            segment_pool_reference(hidden, cu_seqlens, mode),
            atol=ATOL,
            rtol=RTOL,
        )


def test_no_inputs_gives_an_empty_result():
    hidden, cu_seqlens = _packed([4], 8)
    empty = torch.zeros(0, dtype=torch.int64)
    got = segment_pool_triton(hidden, cu_seqlens, "mean", None, empty, empty.bool())
    assert got.shape == (0, 8)


def test_unknown_mode_and_half_an_epilogue_are_refused():
    hidden, cu_seqlens = _packed([2], 8)
    with pytest.raises(ValueError, match="weightedmean"):
        segment_pool_triton(hidden, cu_seqlens, "weightedmean")
    with pytest.raises(ValueError, match="together"):
        segment_pool_triton(hidden, cu_seqlens, "mean", dims=torch.tensor([4]))


def test_dispatch_takes_the_reference_for_cpu_tensors(monkeypatch):
    def kernel(*args, **kwargs):
        raise AssertionError("the Triton kernel was chosen for CPU tensors")

    monkeypatch.setattr(pool_module, "segment_pool_triton", kernel)
    hidden, cu_seqlens = _packed([3, 5], 16, seed=7)
    dims, normalize = torch.tensor([16, 4]), torch.tensor([True, False])
    assert torch.equal(segment_pool(hidden, cu_seqlens, "mean"), segment_pool_reference(hidden, cu_seqlens, "mean"))
    assert torch.equal(
        pool_truncate_normalize(hidden, cu_seqlens, "cls", dims, normalize),
        pool_truncate_normalize_reference(hidden, cu_seqlens, "cls", dims, normalize),
    )
