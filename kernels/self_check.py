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
from dataclasses import dataclass

import torch

from . import registry, triton_support
from .spec import KernelCase, SampleShapes


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


def _cases(shapes: KernelShapes, device: torch.device, dtype: torch.dtype) -> list[tuple[str, KernelCase]]:
    """(kernel, case) of every registered kernel at the model's widths, over a few short sequences
    (``SampleShapes``' default lengths)."""
    sample = SampleShapes(shapes.hidden_size, shapes.intermediate_size, shapes.head_dim, shapes.vocab_size)
    return registry.sample_cases(sample, device, dtype)


def check_kernels(shapes: KernelShapes, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """Run every kernel case; switch off each kernel with a failing case. Returns {kernel: why} of
    the kernels this check switched off (empty when all agree)."""
    failures: dict[str, str] = {}
    tol = tolerance(dtype)
    for kernel, case in _cases(shapes, device, dtype):
        if kernel in failures:
            continue
        try:
            with torch.inference_mode():
                got, expected = case.run_triton().float(), case.run_reference().float()
        except Exception as exc:
            failures[kernel] = f"{case.name} raised {type(exc).__name__}: {str(exc)[:500]}"
            continue
        if got.shape != expected.shape:
            failures[kernel] = f"{case.name} returned shape {tuple(got.shape)}, the reference {tuple(expected.shape)}"
        elif not torch.allclose(got, expected, atol=tol, rtol=tol, equal_nan=True):
            worst = float((got - expected).abs().nan_to_num(float("inf")).max())
            failures[kernel] = (
                f"{case.name} differs from the torch reference by up to {worst:.3g} (tolerance {tol:g})"
            )
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
