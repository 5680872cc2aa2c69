"""Fused residual + LayerNorm / RMSNorm and bias + GELU: the Triton kernels (under the interpreter)
against their torch references and against torch.nn.functional / the models' own modules; then the
model layers' fused CUDA path, forced onto CPU tensors, against their plain path.

Widths that are not powers of two, a single row, a [tokens, heads, head_dim] view into a fused
projection (the q/k norm of Qwen3), and half precision. The interpreter rounds fp32 → bf16 toward
zero (a GPU rounds to nearest), so bf16 results are compared within bf16 tolerance; fp16
conversions round to nearest in both, so fp16 results must match the reference exactly in most
elements.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from infercore.kernels import fused_norm
from infercore.kernels.bias_gelu import bias_gelu, bias_gelu_reference, bias_gelu_triton
from infercore.kernels.fused_norm import (
    add_layer_norm,
    add_layer_norm_reference,
    add_layer_norm_triton,
    add_rms_norm,
    add_rms_norm_reference,
    add_rms_norm_triton,
    rms_norm,
    rms_norm_reference,
    rms_norm_triton,
)
from infercore.models.llama_like import RMSNorm

ATOL = RTOL = 1e-5
SHAPES = [(7, 40), (1, 24), (16, 128), (5, 33)]


def _randn(*shape: int, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


# ---- residual + LayerNorm -----------------------------------------------------------------------


@pytest.mark.parametrize("with_x_bias", [True, False], ids=["x-bias", "no-x-bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_layer_norm_matches_reference_and_layer_norm_module(shape, with_x_bias):
    rows, width = shape
    x, residual = _randn(rows, width, seed=0), _randn(rows, width, seed=1, scale=3.0)
    weight, bias = _randn(width, seed=2), _randn(width, seed=3)
    x_bias = _randn(width, seed=4) if with_x_bias else None
    got = add_layer_norm_triton(x, residual, weight, bias, 1e-12, x_bias)
    torch.testing.assert_close(got, add_layer_norm_reference(x, residual, weight, bias, 1e-12, x_bias),
                               atol=ATOL, rtol=RTOL)
    # What BertLayer computes unfused: LayerNorm(residual + Linear(...)), the Linear's bias inside.
    module = torch.nn.LayerNorm(width, eps=1e-12)
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
        expected = module(residual + (x + x_bias if with_x_bias else x))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_add_layer_norm_half_precision_matches_float64_layer_norm():
    x, residual = _randn(9, 48, seed=5, dtype=torch.float16), _randn(9, 48, seed=6, dtype=torch.float16)
    weight, bias = _randn(48, seed=7, dtype=torch.float16), _randn(48, seed=8, dtype=torch.float16)
    got = add_layer_norm_triton(x, residual, weight, bias, 1e-5)
    assert got.dtype == torch.float16
    expected = F.layer_norm(x.double() + residual.double(), (48,), weight.double(), bias.double(), 1e-5)
    # Statistics in fp32, one rounding to fp16 at the end: within one fp16 ulp of the exact value.
    torch.testing.assert_close(got.double(), expected, atol=2e-3, rtol=1e-3)


# ---- RMSNorm ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_matches_reference_and_model_module(shape):
    rows, width = shape
    x, weight = _randn(rows, width, seed=10, scale=2.0), 1.0 + 0.3 * _randn(width, seed=11)
    got = rms_norm_triton(x, weight, 1e-6)
    torch.testing.assert_close(got, rms_norm_reference(x, weight, 1e-6), atol=ATOL, rtol=RTOL)
    module = RMSNorm(width, 1e-6)
    with torch.no_grad():
        module.weight.copy_(weight)
        torch.testing.assert_close(got, module(x), atol=ATOL, rtol=RTOL)


def test_rms_norm_of_head_views_into_a_fused_projection():
    """Qwen3's q_norm: q is [tokens, heads, head_dim] sliced out of the q|k|v output (row stride 72)."""
    qkv = _randn(6, 72, seed=12)
    q = qkv[:, :48].view(6, 2, 24)
    weight = 1.0 + 0.3 * _randn(24, seed=13)
    got = rms_norm_triton(q, weight, 1e-6)
    assert got.shape == (6, 2, 24) and got.is_contiguous()
    torch.testing.assert_close(got, rms_norm_reference(q, weight, 1e-6), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_rms_norm_returns_the_sum_and_its_norm(shape):
    rows, width = shape
    x, residual = _randn(rows, width, seed=14), _randn(rows, width, seed=15, scale=4.0)
    weight = 1.0 + 0.3 * _randn(width, seed=16)
    summed, normed = add_rms_norm_triton(x, residual, weight, 1e-6)
    ref_summed, ref_normed = add_rms_norm_reference(x, residual, weight, 1e-6)
    assert torch.equal(summed, ref_summed)  # one fp32 add either way
    torch.testing.assert_close(normed, ref_normed, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_add_rms_norm_half_precision(dtype):
    x, residual = _randn(8, 64, seed=17, dtype=dtype), _randn(8, 64, seed=18, dtype=dtype)
    weight = (1.0 + 0.3 * _randn(64, seed=19)).to(dtype)
    summed, normed = add_rms_norm_triton(x, residual, weight, 1e-6)
    ref_summed, ref_normed = add_rms_norm_reference(x, residual, weight, 1e-6)
    assert summed.dtype == normed.dtype == dtype
    torch.testing.assert_close(summed, ref_summed)
    torch.testing.assert_close(normed, ref_normed)
    if dtype == torch.float16:
        assert torch.equal(summed, ref_summed)
        assert (normed == ref_normed).float().mean() > 0.95  # the rest one ulp apart (reduction order)


# ---- bias + GELU --------------------------------------------------------------------------------


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(9, 50), (1, 7), (3, 1030), (2, 3, 40)], ids=str)
def test_bias_gelu_matches_reference_and_float64_gelu(shape, approximate):
    x = _randn(*shape, seed=20, scale=3.0)
    bias = _randn(shape[-1], seed=21)
    got = bias_gelu_triton(x, bias, approximate)
    assert got.shape == x.shape
    torch.testing.assert_close(got, bias_gelu_reference(x, bias, approximate), atol=ATOL, rtol=RTOL)
    expected = F.gelu(x.double() + bias.double(), approximate=approximate)
    torch.testing.assert_close(got.double(), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_saturates_without_overflow(approximate):
    """Large |x| (exp overflow in the tanh form), zero, and fp16."""
    x = torch.tensor([[-60.0, -12.0, -1e-4, 0.0, 1e-4, 12.0, 60.0, 1e4]])
    got = bias_gelu_triton(x, torch.zeros(8), approximate)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, F.gelu(x, approximate=approximate), atol=ATOL, rtol=RTOL)
    half = _randn(4, 24, seed=22, scale=3.0, dtype=torch.float16)
    half_bias = _randn(24, seed=23, dtype=torch.float16)
    got_half = bias_gelu_triton(half, half_bias, approximate)
    assert got_half.dtype == torch.float16
    expected = F.gelu(half.double() + half_bias.double(), approximate=approximate)
    torch.testing.assert_close(got_half.double(), expected, atol=2e-3, rtol=1e-3)


def test_bias_gelu_refuses_an_unknown_approximation():
    with pytest.raises(ValueError, match="approximate"):
        bias_gelu_triton(torch.zeros(2, 4), torch.zeros(4), "sigmoid")


# ---- dispatch and model wiring ------------------------------------------------------------------


def test_cpu_tensors_never_take_the_kernels(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a Triton kernel was chosen for CPU tensors")

    for name in ("add_layer_norm_triton", "rms_norm_triton", "add_rms_norm_triton"):
        monkeypatch.setattr(fused_norm, name, refuse)
    x, residual, weight = _randn(4, 16, seed=30), _randn(4, 16, seed=31), _randn(16, seed=32)
    assert not fused_norm.use_fused_kernels(x)
    assert torch.equal(add_layer_norm(x, residual, weight, weight, 1e-5),
                       add_layer_norm_reference(x, residual, weight, weight, 1e-5))
    assert torch.equal(rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6))
    assert torch.equal(add_rms_norm(x, residual, weight, 1e-6)[1], add_rms_norm_reference(x, residual, weight, 1e-6)[1])
    assert torch.equal(bias_gelu(x, weight), bias_gelu_reference(x, weight))


def _encode(model, lengths: list[int]) -> torch.Tensor:
    from infercore.models.packing import pack_sequences
    from tests.tiny_llama_like import random_ids

    batch = pack_sequences(random_ids(lengths, seed=40))
    with torch.inference_mode():
        return model.runner.encoder(batch)


@pytest.mark.parametrize("variant", ["bert-tiny", "bert-tiny-gelu-new", "bert-tiny-relu-1type"])
def test_bert_layer_fused_path_matches_plain_path(variant, tmp_path, monkeypatch):
    """Bias moved from the matmuls into the kernels, erf and tanh GELU, and ReLU (left unfused)."""
    from infercore.models import bert
    from infercore.models.loader import load_model
    from tests import tiny_checkpoints

    model = load_model("bert", tiny_checkpoints.build_bert(tmp_path / variant, variant), device="cpu")
    lengths = [5, 1, 12]
    plain = _encode(model, lengths)
    monkeypatch.setattr(fused_norm, "use_fused_kernels", lambda x: True)
    monkeypatch.setattr(bert, "use_bias_gelu_kernel", lambda x: True)
    fused = _encode(model, lengths)
    torch.testing.assert_close(fused, plain, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("family", ["qwen3", "eurobert"])
def test_llama_like_fused_path_matches_plain_path(family, tmp_path, monkeypatch):
    """attn/q/k/final RMSNorms through the kernel, residual + post-attention RMSNorm fused."""
    from infercore.models.loader import load_model
    from tests import tiny_llama_like

    build = tiny_llama_like.build_qwen3 if family == "qwen3" else tiny_llama_like.build_eurobert
    model = load_model(family, build(tmp_path / family), device="cpu")
    lengths = [6, 1, 9]
    plain = _encode(model, lengths)
    monkeypatch.setattr(fused_norm, "use_fused_kernels", lambda x: True)
    fused = _encode(model, lengths)
    torch.testing.assert_close(fused, plain, atol=2e-5, rtol=2e-5)
