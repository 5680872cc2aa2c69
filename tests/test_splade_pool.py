"""SPLADE expansion: the Triton kernel (under the interpreter) and the chunked reference against a
naive implementation written here that materialises the [tokens, vocab] logits, on awkward sizes.

Sizes are small because the interpreter runs every program in Python: vocab not a multiple of the
vocab block, hidden not a multiple of the K block, sequences shorter and longer than the token
block, of length 1 and 0, a batch of one and an empty batch.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from infercore.kernels import splade_pool as splade_module
from infercore.kernels.splade_pool import splade_pool, splade_pool_reference, splade_pool_triton

ATOL = RTOL = 1e-5
# Small blocks and tiles, so that a handful of tokens and columns already spans several of each.
SMALL_BLOCKS = {"block_t": 16, "block_v": 64, "block_k": 16}
SMALL_TILES = {"chunk_tokens": 16, "vocab_block": 96}


def _inputs(
    lengths: list[int], hidden_size: int, vocab: int, with_bias: bool, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(sum(lengths), hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5
    # Shifted down so that many (sequence, term) pairs have only negative logits: exact zeros.
    bias = torch.randn(vocab, generator=gen) - 1.0 if with_bias else None
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    return hidden, weight, bias, cu_seqlens


def _naive(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cu_seqlens: torch.Tensor
) -> torch.Tensor:
    """Full [T, V] logits → log1p(relu) → max over each sequence's rows (zeros for an empty one)."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    weights = torch.log1p(torch.relu(logits))
    bounds = cu_seqlens.tolist()
    rows = [
        weights[start:end].amax(dim=0) if end > start else torch.zeros(weight.shape[0])
        for start, end in itertools.pairwise(bounds)
    ]
    return torch.stack(rows) if rows else torch.zeros(0, weight.shape[0])


CASES = {
    # name: (lengths, hidden, vocab)
    "mixed lengths": ([1, 7, 33, 64, 2, 17], 40, 1000),
    "batch of one": ([37], 24, 257),
    "all length one": ([1] * 9, 16, 257),
    "empty sequence inside": ([5, 0, 12, 0], 20, 130),
}


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_and_reference_match_naive_full_logits(case: str, with_bias: bool):
    lengths, hidden_size, vocab = CASES[case]
    hidden, weight, bias, cu_seqlens = _inputs(lengths, hidden_size, vocab, with_bias)
    expected = _naive(hidden, weight, bias, cu_seqlens)

    reference = splade_pool_reference(hidden, weight, bias, cu_seqlens, **SMALL_TILES)
    kernel = splade_pool_triton(hidden, weight, bias, cu_seqlens, **SMALL_BLOCKS)

    for got in (reference, kernel):
        assert got.shape == (len(lengths), vocab) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
        assert (got >= 0).all()
        # The zeros are exact: relu before log1p, not a small negative that rounds.
        assert torch.equal(got == 0, expected == 0)
    for i, n in enumerate(lengths):
        if n == 0:
            assert torch.equal(reference[i], torch.zeros(vocab)) and torch.equal(kernel[i], torch.zeros(vocab))


def test_kernel_default_blocks_match_naive():
    """The block sizes the product launches with (vocab and hidden not multiples of them)."""
    hidden, weight, bias, cu_seqlens = _inputs([3, 70, 1], 72, 300, with_bias=True, seed=1)
    expected = _naive(hidden, weight, bias, cu_seqlens)
    torch.testing.assert_close(splade_pool_triton(hidden, weight, bias, cu_seqlens), expected, atol=ATOL, rtol=RTOL)


def test_all_negative_logits_give_a_zero_row_and_do_not_leak_across_sequences():
    """Sequence 1's logits are all negative, its neighbours' all positive: its row must be zeros."""
    gen = torch.Generator().manual_seed(2)
    positive = torch.rand(6, 20, generator=gen) + 0.1
    negative = -(torch.rand(9, 20, generator=gen) + 0.1)
    hidden = torch.cat([positive, negative, positive[:3]])
    weight = torch.rand(150, 20, generator=gen) + 0.1
    cu_seqlens = torch.tensor([0, 6, 15, 18], dtype=torch.int32)

    for got in (
        splade_pool_reference(hidden, weight, None, cu_seqlens, chunk_tokens=4, vocab_block=32),
        splade_pool_triton(hidden, weight, None, cu_seqlens, **SMALL_BLOCKS),
    ):
        assert torch.equal(got[1], torch.zeros(150))
        assert (got[0] > 0).all() and (got[2] > 0).all()
        torch.testing.assert_close(got, _naive(hidden, weight, None, cu_seqlens), atol=ATOL, rtol=RTOL)


def test_bias_low_enough_zeroes_everything():
    hidden, weight, _, cu_seqlens = _inputs([4, 11], 16, 200, with_bias=False, seed=3)
    bias = torch.full((200,), -1e3)
    assert torch.equal(splade_pool_reference(hidden, weight, bias, cu_seqlens), torch.zeros(2, 200))
    assert torch.equal(splade_pool_triton(hidden, weight, bias, cu_seqlens, **SMALL_BLOCKS), torch.zeros(2, 200))


@pytest.mark.parametrize(
    ("chunk_tokens", "vocab_block"), [(1, 7), (5, 64), (16, 500), (64, 499), (124, 128), (1000, 4096)]
)
def test_reference_result_does_not_depend_on_tile_size(chunk_tokens: int, vocab_block: int):
    """Chunks cut sequences anywhere (mid-sequence, on a boundary, one chunk for all); vocab blocks
    divide the vocab or leave a ragged last block."""
    lengths = [1, 7, 33, 0, 64, 2, 17]  # 124 tokens
    hidden, weight, bias, cu_seqlens = _inputs(lengths, 24, 500, with_bias=True, seed=4)
    torch.testing.assert_close(
        splade_pool_reference(hidden, weight, bias, cu_seqlens, chunk_tokens=chunk_tokens, vocab_block=vocab_block),
        _naive(hidden, weight, bias, cu_seqlens),
        atol=ATOL,
        rtol=RTOL,
    )


class _LargestAllocation(TorchDispatchMode):
    """Records, in elements, the largest new storage any aten op returns (views and out= are not new)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        given = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


def test_sparse_reference_never_materialises_full_logits():
    lengths, vocab, chunk, block = [50, 3, 90, 57], 1000, 16, 256  # 200 tokens
    hidden, weight, bias, cu_seqlens = _inputs(lengths, 32, vocab, with_bias=True, seed=5)
    with _LargestAllocation() as seen:
        got = splade_pool_reference(hidden, weight, bias, cu_seqlens, chunk_tokens=chunk, vocab_block=block)
    # Nothing bigger than the [B, V] result or one tile; the full logits would be 200 x 1000.
    assert seen.largest <= max(len(lengths) * vocab, chunk * block)
    torch.testing.assert_close(got, _naive(hidden, weight, bias, cu_seqlens), atol=ATOL, rtol=RTOL)


def test_strided_inputs_match_contiguous():
    """hidden as a column slice (row stride > H), weight transposed storage, bias with stride 2."""
    hidden, weight, bias, cu_seqlens = _inputs([9, 20], 24, 300, with_bias=True, seed=6)
    wide_hidden = torch.zeros(hidden.shape[0], 40)
    wide_hidden[:, 5:29] = hidden
    weight_t = weight.T.contiguous().T  # same values, strides (1, V)
    spaced_bias = torch.stack([bias, torch.full_like(bias, 50.0)], dim=1).reshape(-1)[::2]
    expected = _naive(hidden, weight, bias, cu_seqlens)
    args = (wide_hidden[:, 5:29], weight_t, spaced_bias, cu_seqlens.to(torch.int64))
    torch.testing.assert_close(splade_pool_reference(*args), expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(splade_pool_triton(*args, **SMALL_BLOCKS), expected, atol=ATOL, rtol=RTOL)


def test_empty_batch():
    weight = torch.randn(100, 16)
    hidden = torch.empty(0, 16)
    cu_seqlens = torch.zeros(1, dtype=torch.int32)
    for got in (
        splade_pool_reference(hidden, weight, None, cu_seqlens),
        splade_pool_triton(hidden, weight, None, cu_seqlens),
        splade_pool(hidden, weight, torch.zeros(100), cu_seqlens),
    ):
        assert got.shape == (0, 100) and got.dtype == torch.float32


def test_dispatch_takes_the_reference_for_cpu_tensors(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return splade_pool_reference(*args, **kwargs)

    def kernel(*args, **kwargs):
        raise AssertionError("the Triton kernel was chosen for CPU tensors")

    monkeypatch.setattr(splade_module, "splade_pool_reference", spy)
    monkeypatch.setattr(splade_module, "splade_pool_triton", kernel)
    hidden, weight, bias, cu_seqlens = _inputs([3, 5], 16, 64, with_bias=True, seed=7)
    got = splade_module.splade_pool(hidden, weight, bias, cu_seqlens)
    assert len(calls) == 1
    torch.testing.assert_close(got, _naive(hidden, weight, bias, cu_seqlens), atol=ATOL, rtol=RTOL)
