"""Packed attention paths: the CUDA-side padded path against the per-sequence reference, and the
call into torch's varlen (FlashAttention) front end across the torch releases that changed it."""

from __future__ import annotations

import pytest
import torch

from infercore.models.attention import _varlen_attn, adapt_varlen_attn, padded_attention, per_sequence_attention
from infercore.models.packing import pack_sequences


def _qkv(seq_lens, heads=4, kv_heads=4, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(seq_lens)
    q = torch.randn(total, heads, dim, generator=gen)
    k = torch.randn(total, kv_heads, dim, generator=gen)
    v = torch.randn(total, kv_heads, dim, generator=gen)
    batch = pack_sequences([[1] * n for n in seq_lens], device=torch.device("cpu"), min_tokens=0)
    return q, k, v, batch


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_padded_attention_equals_per_sequence(causal, kv_heads):
    # The path CUDA takes in fp32 (or without varlen): one masked call over [B, max_len].
    q, k, v, batch = _qkv((5, 1, 12, 3), kv_heads=kv_heads)
    expected = per_sequence_attention(q, k, v, batch.seq_lens, causal)
    got = padded_attention(q, k, v, batch, causal)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_sequences_do_not_attend_to_each_other():
    q, k, v, batch = _qkv((4, 6))
    alone = per_sequence_attention(q[:4], k[:4], v[:4], (4,))
    k2, v2 = k.clone(), v.clone()
    k2[4:] += 100.0  # change only the second sequence's keys and values
    v2[4:] -= 50.0
    torch.testing.assert_close(padded_attention(q, k2, v2, batch)[:4], alone, atol=1e-5, rtol=1e-5)


def _spy(signature: str):
    calls = []
    namespace = {"calls": calls}
    exec(  # a stand-in with exactly the release's signature
        f"def varlen_attn({signature}):\n    calls.append(dict(locals()))\n    return 'out'\n", namespace
    )
    return namespace["varlen_attn"], calls


TORCH_2_10 = "query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None"
TORCH_2_11 = (
    "query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, "
    "window_size=(-1, -1), k_cache=None, v_cache=None, cache_seqlens=None, cache_batch_idx=None, "
    "page_table=None, seqused_k=None"
)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_call_on_torch_2_10_uses_is_causal(causal):
    fn, calls = _spy(TORCH_2_10)
    call = adapt_varlen_attn(fn)
    assert call("q", "k", "v", "cu", 7, causal) == "out"
    (seen,) = calls
    assert seen["is_causal"] is causal
    assert (seen["cu_seq_q"], seen["cu_seq_k"], seen["max_q"], seen["max_k"]) == ("cu", "cu", 7, 7)


@pytest.mark.parametrize("causal, window", [(False, (-1, -1)), (True, (-1, 0))])
def test_varlen_call_on_torch_2_11_uses_window_size(causal, window):
    fn, calls = _spy(TORCH_2_11)
    call = adapt_varlen_attn(fn)
    call("q", "k", "v", "cu", 7, causal)
    (seen,) = calls
    assert seen["window_size"] == window
    assert (seen["query"], seen["key"], seen["value"]) == ("q", "k", "v")


def test_unknown_varlen_signature_is_not_used():
    fn, _ = _spy("query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, mask_kind=0")
    assert adapt_varlen_attn(fn) is None


def test_installed_torch_varlen_front_end_is_recognised():
    # The torch CI installs must take the FlashAttention path on CUDA, not the padded fallback.
    assert _varlen_attn() is not None
