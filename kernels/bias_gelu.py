"""Bias add fused with GELU, forward only: the activation of a BERT-style feed-forward block.

    bias_gelu(x, bias, approximate) = gelu(x + bias)    (x [..., N], bias [N])

``approximate`` is torch's: "none" (erf, BERT's ``gelu``) or "tanh" (``gelu_new`` /
``gelu_pytorch_tanh``). The model runs the first FFN matmul without its bias and this kernel adds
it, so the [T, intermediate] activations are read and written once after the matmul. The sum and
the activation are computed in fp32 and rounded once to x's dtype (the unfused ops round the sum
too).

- ``bias_gelu_reference``: plain torch with the same signature.
- ``bias_gelu_triton``: a flat elementwise kernel over contiguous x.

Whether the model layers call it is decided by ``use_bias_gelu_kernel`` (CUDA only).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import fused_norm
from .spec import CompileVariant, KernelCase, KernelFunction, KernelSpec, SampleShapes, sampler
from .triton_support import use_triton

GELU_APPROXIMATIONS = ("none", "tanh")
BLOCK = 1024


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return F.gelu(x + bias, approximate=approximate)


@functools.cache
def _triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def bias_gelu_kernel(x_ptr, bias_ptr, out_ptr, numel, width, TANH: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offsets < numel
        x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        x += tl.load(bias_ptr + offsets % width, mask=ok, other=0.0).to(tl.float32)
        if TANH:
            inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            # tanh(u) = 1 - 2 / (exp(2u) + 1), no libdevice needed; 2u capped where tanh is 1 in fp32
            # anyway, so exp never overflows.
            y = 0.5 * x * (2.0 - 2.0 / (tl.exp(tl.minimum(2.0 * inner, 40.0)) + 1.0))
        else:
            y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=ok)

    return bias_gelu_kernel


def bias_gelu_triton(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Same contract as ``bias_gelu_reference``; the result is contiguous, in x's dtype."""
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, not {approximate!r}")
    x = x.contiguous()
    out = torch.empty_like(x)
    numel = x.numel()
    if numel == 0:
        return out
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _triton_kernel()[(-(-numel // BLOCK),)](
            x, bias.contiguous(), out, numel, x.shape[-1], TANH=approximate == "tanh", BLOCK=BLOCK,
        )
    return out


def use_bias_gelu_kernel(x: torch.Tensor) -> bool:
    """The layers' fused path is on (``fused_norm.enabled``) and this kernel may run on x."""
    return fused_norm.enabled and use_triton("bias_gelu", x)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Dispatch: the kernel on CUDA (while the fused layer kernels are enabled), the reference elsewhere."""
    if use_bias_gelu_kernel(x):
        return bias_gelu_triton(x, bias, approximate)
    return bias_gelu_reference(x, bias, approximate)


# ---- registry -----------------------------------------------------------------------------------

def _sample_cases(
    shapes: SampleShapes, device: torch.device, dtype: torch.dtype, generator: torch.Generator
) -> list[KernelCase]:
    randn = sampler(device, dtype, generator)
    tokens, inner = shapes.tokens, shapes.intermediate_size
    x, bias = randn(tokens, inner, scale=2.0), randn(inner)
    shape = {"tokens": tokens, "width": inner, "dtype": str(dtype).removeprefix("torch.")}
    return [KernelCase(f"bias_gelu_{a}", SPEC.functions["bias_gelu"], (x, bias, a), shape) for a in GELU_APPROXIMATIONS]


def _compile_variants(arg_names: Sequence[str]) -> list[CompileVariant]:
    return [
        CompileVariant(f"tanh={tanh} {dtype}",
                       {"x_ptr": dtype, "bias_ptr": dtype, "out_ptr": dtype, "numel": "i64", "width": "i32"},
                       {"TANH": tanh, "BLOCK": BLOCK})
        for tanh, dtype in itertools.product((False, True), ("*fp16", "*bf16"))
    ]


SPEC = KernelSpec(
    name="bias_gelu",
    functions={"bias_gelu": KernelFunction(bias_gelu_reference, bias_gelu_triton)},
    jit=_triton_kernel,
    sample_cases=_sample_cases,
    compile_variants=_compile_variants,
)
