"""Start-up self-check of the Triton kernels on the device, dtype and widths a model will use.

The CPU test suite checks the kernels under Triton's interpreter and compiles them for sm_90, but a
GPU host brings its own driver, Triton release and model shapes. Before a model serves on CUDA, each
kernel its layers dispatch to runs once on small random inputs at the model's widths and dtype and
is compared with its torch reference. A kernel that raises or disagrees is switched off for the
process (``triton_support.disable``, logged as an error naming it and why): the model then runs the
reference path — slower, never wrong, never down.

Inputs are a few short sequences, so the check costs milliseconds (plus the kernels' first
compilation, which the first batch would pay anyway).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import bias_gelu, fused_norm, segment_pool, splade_pool, triton_support

# Sequence lengths of the check's packed batch: several sequences, one of a single token.
LENGTHS = (5, 1, 9, 3)


@dataclass(frozen=True)
class KernelShapes:
    """What a model's layers feed the kernels."""

    hidden_size: int
    intermediate_size: int
    head_dim: int
    vocab_size: int | None = None  # SPLADE models only


def tolerance(dtype: torch.dtype) -> float:
    """Absolute and relative tolerance: a few roundings of the dtype on O(1) values. A broken kernel
    (bad indexing, masking or reduction) is off by O(1)."""
    return {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(dtype, 5e-2)


def _cases(
    shapes: KernelShapes, device: torch.device, dtype: torch.dtype,
) -> list[tuple[str, str, Callable[[], torch.Tensor], Callable[[], torch.Tensor]]]:
    """(kernel, case, triton call, reference call)."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    tokens, h, inner, d = sum(LENGTHS), shapes.hidden_size, shapes.intermediate_size, shapes.head_dim
    x, residual, w, b, x_bias = randn(tokens, h), randn(tokens, h), randn(h), randn(h), randn(h)
    heads = randn(tokens, 2, d)
    head_w = randn(d)
    ffn = randn(tokens, inner, scale=2.0)
    ffn_bias = randn(inner)
    cu = torch.tensor((0, *torch.tensor(LENGTHS).cumsum(0).tolist()), dtype=torch.int32, device=device)
    dims = torch.tensor([h, max(1, h // 2), h, h], dtype=torch.int32, device=device)
    normalize = torch.tensor([True, True, False, True], device=device)
    skip = torch.tensor([1, 0, 2, 0], dtype=torch.int32, device=device)
    cases = [
        ("fused_norm", "add_layer_norm",
         lambda: fused_norm.add_layer_norm_triton(x, residual, w, b, 1e-5, x_bias),
         lambda: fused_norm.add_layer_norm_reference(x, residual, w, b, 1e-5, x_bias)),
        ("fused_norm", "rms_norm_heads",
         lambda: fused_norm.rms_norm_triton(heads, head_w, 1e-6),
         lambda: fused_norm.rms_norm_reference(heads, head_w, 1e-6)),
        ("fused_norm", "add_rms_norm",
         lambda: torch.cat(fused_norm.add_rms_norm_triton(x, residual, w, 1e-6)),
         lambda: torch.cat(fused_norm.add_rms_norm_reference(x, residual, w, 1e-6))),
    ]
    for approximate in bias_gelu.GELU_APPROXIMATIONS:
        cases.append((
            "bias_gelu", f"bias_gelu_{approximate}",
            lambda a=approximate: bias_gelu.bias_gelu_triton(ffn, ffn_bias, a),
            lambda a=approximate: bias_gelu.bias_gelu_reference(ffn, ffn_bias, a),
        ))
    for mode in segment_pool.POOLING_MODES:
        cases.append((
            "segment_pool", f"pool_{mode}",
            lambda m=mode: segment_pool.segment_pool_triton(x, cu, m, skip, dims, normalize),
            lambda m=mode: segment_pool.pool_truncate_normalize_reference(x, cu, m, dims, normalize, skip),
        ))
    if shapes.vocab_size:
        weight, bias = randn(shapes.vocab_size, h, scale=h**-0.5), randn(shapes.vocab_size, scale=0.1)
        hidden = randn(tokens, h)
        cases.append((
            "splade_pool", "splade_pool",
            lambda: splade_pool.splade_pool_triton(hidden, weight, bias, cu),
            lambda: splade_pool.splade_pool_reference(hidden, weight, bias, cu),
        ))
    return cases


def check_kernels(shapes: KernelShapes, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """Run every kernel case; switch off each kernel with a failing case. Returns {kernel: why} of
    the kernels this check switched off (empty when all agree)."""
    failures: dict[str, str] = {}
    tol = tolerance(dtype)
    for kernel, case, triton_call, reference_call in _cases(shapes, device, dtype):
        if kernel in failures:
            continue
        try:
            with torch.inference_mode():
                got, expected = triton_call().float(), reference_call().float()
        except Exception as exc:
            failures[kernel] = f"{case} raised {type(exc).__name__}: {str(exc)[:500]}"
            continue
        if got.shape != expected.shape:
            failures[kernel] = f"{case} returned shape {tuple(got.shape)}, the reference {tuple(expected.shape)}"
        elif not torch.allclose(got, expected, atol=tol, rtol=tol, equal_nan=True):
            worst = float((got - expected).abs().nan_to_num(float("inf")).max())
            failures[kernel] = f"{case} differs from the torch reference by up to {worst:.3g} (tolerance {tol:g})"
    for kernel, reason in failures.items():
        triton_support.disable(kernel, f"{reason} on {device} in {str(dtype).removeprefix('torch.')}")
    return failures


@functools.cache
def check_kernels_once(shapes: KernelShapes, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """``check_kernels`` once per process for each (shapes, device, dtype): replicas and models of
    the same shapes share the result."""
    return check_kernels(shapes, device, dtype)


def model_kernel_shapes(encoder: torch.nn.Module, vocab_size: int | None = None) -> KernelShapes | None:
    """The widths of an encoder's config, or None for an encoder without the usual fields."""
    cfg = getattr(encoder, "config", None)
    hidden = getattr(cfg, "hidden_size", None)
    inner = getattr(cfg, "intermediate_size", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if not (hidden and inner and heads):
        return None
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return KernelShapes(hidden, inner, head_dim, vocab_size)
