"""The start-up self-check: a Triton kernel that fails or disagrees with its torch reference on the
serving device is switched off and the reference serves in its place — slower, never wrong."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from infercore.kernels import bias_gelu, fused_norm, registry, segment_pool, self_check, splade_pool, triton_support
from infercore.kernels.self_check import KernelShapes, check_kernels
from infercore.kernels.spec import KernelFunction

SHAPES = KernelShapes(hidden_size=24, intermediate_size=40, head_dim=8, vocab_size=300)
# Dispatch only asks a tensor whether it is on CUDA: this one says yes, on a machine without a GPU.
CUDA_LIKE = SimpleNamespace(is_cuda=True)


@pytest.fixture(autouse=True)
def fresh_kernel_state():
    triton_support.enable_all()
    self_check.check_kernels_once.cache_clear()
    yield
    triton_support.enable_all()
    self_check.check_kernels_once.cache_clear()


def test_kernels_that_agree_stay_on():
    # Under the interpreter on CPU, at a model's widths (hidden not a power of two, a vocab).
    assert check_kernels(SHAPES, torch.device("cpu"), torch.float32) == {}
    assert triton_support.disabled() == {}
    assert fused_norm.use_fused_kernels(CUDA_LIKE)
    assert all(triton_support.use_triton(k, CUDA_LIKE) for k in registry.KERNELS)


def test_a_kernel_that_disagrees_is_switched_off_and_the_reference_serves(monkeypatch, caplog):
    def off_by_a_row(*args, **kwargs):  # a masking bug: the last row is not written
        out = fused_norm.add_layer_norm_triton(*args, **kwargs)
        out[-1] = 0
        return out

    broken = KernelFunction(fused_norm.add_layer_norm_reference, off_by_a_row)
    monkeypatch.setitem(fused_norm.SPEC.functions, "add_layer_norm", broken)
    with caplog.at_level(logging.ERROR, logger="infercore.kernels"):
        failures = check_kernels(SHAPES, torch.device("cpu"), torch.float32)
    assert set(failures) == {"fused_norm"}
    assert "add_layer_norm differs from the torch reference" in failures["fused_norm"]
    assert set(triton_support.disabled()) == {"fused_norm"}
    assert "fused_norm switched off" in caplog.text and "float32" in caplog.text
    # The layers no longer take the fused path; the other kernels still dispatch to Triton.
    assert not fused_norm.use_fused_kernels(CUDA_LIKE)
    assert triton_support.use_triton("splade_pool", CUDA_LIKE)
    assert bias_gelu.use_bias_gelu_kernel(CUDA_LIKE)


@pytest.mark.parametrize("module, name, kernel", [
    (bias_gelu, "bias_gelu", "bias_gelu"),
    (segment_pool, "pool_truncate_normalize", "segment_pool"),
    (splade_pool, "splade_pool", "splade_pool"),
])
def test_a_kernel_that_raises_is_switched_off(monkeypatch, module, name, kernel):
    def fails(*args, **kwargs):
        raise RuntimeError("PTX JIT compilation failed")

    reference = module.SPEC.functions[name].reference
    monkeypatch.setitem(module.SPEC.functions, name, KernelFunction(reference, fails))
    failures = check_kernels(SHAPES, torch.device("cpu"), torch.float32)
    assert set(failures) == {kernel}
    assert "PTX JIT compilation failed" in failures[kernel]
    assert not triton_support.use_triton(kernel, CUDA_LIKE)


def test_a_switched_off_pooling_kernel_dispatches_to_the_reference(monkeypatch):
    """The dispatchers themselves honour the switch (here with the CUDA test faked on CPU tensors)."""
    calls = []
    monkeypatch.setattr(segment_pool, "segment_pool_triton", lambda *a, **k: calls.append("triton"))
    monkeypatch.setattr(triton_support, "use_triton", lambda kernel, x: kernel not in triton_support.disabled())
    monkeypatch.setattr(segment_pool, "use_triton", triton_support.use_triton)
    hidden, cu = torch.randn(6, 4), torch.tensor([0, 2, 6], dtype=torch.int32)
    segment_pool.segment_pool(hidden, cu, "mean")
    assert calls == ["triton"]
    triton_support.disable("segment_pool", "test")
    pooled = segment_pool.segment_pool(hidden, cu, "mean")
    assert calls == ["triton"]
    torch.testing.assert_close(pooled, segment_pool.segment_pool_reference(hidden, cu, "mean"))


def test_sparse_model_checks_its_vocabulary_kernel_with_its_own_shapes(tmp_path, monkeypatch):
    from infercore.models.loader import load_model
    from tests import tiny_checkpoints

    seen = []
    monkeypatch.setattr(self_check, "check_kernels", lambda shapes, device, dtype: seen.append(shapes) or {})
    model = load_model("mlm", tiny_checkpoints.build_bert_with_head(tmp_path / "mlm", "BertForMaskedLM"),
                       device="cpu")
    cfg = model.runner.encoder.config
    assert model.check_kernels() == {}
    model.check_kernels()  # once per shapes, device and dtype
    assert seen == [KernelShapes(cfg.hidden_size, cfg.intermediate_size,
                                 cfg.hidden_size // cfg.num_attention_heads, model.dimensions)]
