"""Residual add fused with LayerNorm (post-LN encoders: BERT, XLM-R) and with RMSNorm (pre-norm
Llama-style models: Qwen3, EuroBERT), forward only.

    add_layer_norm(x, residual, w, b, eps, x_bias) = LayerNorm(residual + (x + x_bias)) * w + b
    rms_norm(x, w, eps)                             = w * (x / sqrt(mean(x²) + eps))
    add_rms_norm(x, residual, w, eps)               = (s, rms_norm(s, w, eps)) with s = residual + x

Unfused, a residual add and a norm read three [T, H] tensors and write two (plus one more read and
write when the branch's bias is added on its own); the kernel reads two (or one) and writes one (or
two for ``add_rms_norm``, whose sum is the next residual). Statistics are computed in fp32 whatever
the input dtype. RMSNorm follows Qwen3/Llama's order: normalise in fp32, cast to the input dtype,
then multiply by the weight, and ``add_rms_norm`` normalises the sum as rounded to the input dtype
(the value the next residual carries), so its results match the unfused ops to the rounding of
the output.

- ``*_reference``: plain torch with the same signatures (the models' own CPU path computes the same).
- ``*_triton``: one program per row, the whole row in registers (widths up to a few thousand).

``use_fused_kernels(x)`` is what the model layers ask before taking the fused path: CUDA tensor,
Triton importable, the kernel not switched off by the start-up self-check, and the module switch
``enabled`` on (the GPU benchmark turns it off to time the plain layers in the same run). CPU
execution never reaches the kernels.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .spec import CompileVariant, KernelCase, KernelFunction, KernelSpec, SampleShapes, sampler
from .triton_support import use_triton

# Model layers take the fused path on CUDA while this is True.
enabled = True


def use_fused_kernels(x: torch.Tensor) -> bool:
    return enabled and use_triton("fused_norm", x)


# ---- references ---------------------------------------------------------------------------------


def add_layer_norm_reference(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    x_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x, residual [T, H]; weight, bias, x_bias [H] → [T, H] in x's dtype."""
    if x_bias is not None:
        x = x + x_bias
    return F.layer_norm(residual + x, (x.shape[-1],), weight, bias, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H]; weight [H] → x's shape, dtype promote(x, weight)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [T, H] → (residual + x, rms_norm(residual + x))."""
    summed = residual + x
    return summed, rms_norm_reference(summed, weight, eps)


# ---- kernel -------------------------------------------------------------------------------------


@functools.cache
def _triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def norm_kernel(
        x_ptr, residual_ptr, x_bias_ptr, weight_ptr, bias_ptr, out_ptr, sum_ptr,
        width, inner, stride_xo, stride_xi, stride_ro, stride_ri, eps,
        IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_X_BIAS: tl.constexpr,
        STORE_SUM: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # Row r of the [rows, width] problem is (r // inner, r % inner) of a [outer, inner, width]
        # view with unit column stride: [T, heads, head_dim] slices of a fused projection fit as is.
        row = tl.program_id(0).to(tl.int64)
        outer_i = row // inner
        inner_i = row % inner
        cols = tl.arange(0, BLOCK_N)
        ok = cols < width
        x = tl.load(x_ptr + outer_i * stride_xo + inner_i * stride_xi + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_X_BIAS:
            x += tl.load(x_bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x += tl.load(
                residual_ptr + outer_i * stride_ro + inner_i * stride_ri + cols, mask=ok, other=0.0
            ).to(tl.float32)
        w = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        if IS_RMS:
            if STORE_SUM:
                # The sum as the next residual carries it; the norm is taken of that rounded value.
                rounded = x.to(sum_ptr.dtype.element_ty)
                tl.store(sum_ptr + row * width + cols, rounded, mask=ok)
                x = rounded.to(tl.float32)
            normed = x * tl.math.rsqrt(tl.sum(x * x, axis=0) / width + eps)
            # Cast to the input dtype before the weight, as the reference does.
            y = normed.to(x_ptr.dtype.element_ty).to(tl.float32) * w
        else:
            mean = tl.sum(x, axis=0) / width
            centred = tl.where(ok, x - mean, 0.0)
            rstd = tl.math.rsqrt(tl.sum(centred * centred, axis=0) / width + eps)
            y = centred * rstd * w + tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * width + cols, y.to(out_ptr.dtype.element_ty), mask=ok)

    return norm_kernel


def _rows_view(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(rows, inner, outer stride, inner stride) of a 2-D or 3-D tensor with unit last stride."""
    if t.dim() == 2:
        return t.shape[0], 1, t.stride(0), 0
    if t.dim() == 3:
        return t.shape[0] * t.shape[1], t.shape[1], t.stride(0), t.stride(1)
    raise ValueError(f"expected a 2-D or 3-D tensor, got shape {tuple(t.shape)}")


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    x_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
    is_rms: bool,
    store_sum: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    import triton

    x = _unit_last_stride(x)
    rows, inner, stride_xo, stride_xi = _rows_view(x)
    stride_ro = stride_ri = 0
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} differs from {tuple(x.shape)}")
        residual = _unit_last_stride(residual)
        _, _, stride_ro, stride_ri = _rows_view(residual)
    width = x.shape[-1]
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    summed = torch.empty(x.shape, dtype=x.dtype, device=x.device) if store_sum else None
    if rows == 0:
        return out, summed
    block_n = triton.next_power_of_2(width)
    # Unused pointers are never read; any tensor will do.
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _triton_kernel()[(rows,)](
            x, residual if residual is not None else x, x_bias if x_bias is not None else weight,
            weight.contiguous(), bias.contiguous() if bias is not None else weight, out,
            summed if summed is not None else out,
            width, inner, stride_xo, stride_xi, stride_ro, stride_ri, eps,
            IS_RMS=is_rms, HAS_RESIDUAL=residual is not None, HAS_X_BIAS=x_bias is not None,
            STORE_SUM=store_sum, BLOCK_N=block_n,
            num_warps=min(max(block_n // 256, 1), 8),
        )
    return out, summed


def add_layer_norm_triton(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    x_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ``add_layer_norm_reference`` (x and residual 2-D)."""
    out, _ = _launch(x, residual, x_bias, weight, bias, eps, x.dtype, is_rms=False, store_sum=False)
    return out


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Same contract as ``rms_norm_reference`` for 2-D or 3-D x (any strides; the result is contiguous)."""
    out, _ = _launch(x, None, None, weight, None, eps, torch.promote_types(x.dtype, weight.dtype),
                     is_rms=True, store_sum=False)
    return out


def add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``add_rms_norm_reference`` (x and residual 2-D)."""
    out, summed = _launch(x, residual, None, weight, None, eps, torch.promote_types(x.dtype, weight.dtype),
                          is_rms=True, store_sum=True)
    return summed, out


# ---- dispatch -----------------------------------------------------------------------------------


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    x_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    if use_fused_kernels(x):
        return add_layer_norm_triton(x, residual, weight, bias, eps, x_bias)
    return add_layer_norm_reference(x, residual, weight, bias, eps, x_bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_fused_kernels(x):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_fused_kernels(x):
        return add_rms_norm_triton(x, residual, weight, eps)
    return add_rms_norm_reference(x, residual, weight, eps)


# ---- registry -----------------------------------------------------------------------------------

def _sample_cases(
    shapes: SampleShapes, device: torch.device, dtype: torch.dtype, generator: torch.Generator
) -> list[KernelCase]:
    randn = sampler(device, dtype, generator)
    tokens, h, d = shapes.tokens, shapes.hidden_size, shapes.head_dim
    x, residual, w, b, x_bias = randn(tokens, h), randn(tokens, h), randn(h), randn(h), randn(h)
    # Query heads as the model norms them: a strided [T, heads, head_dim] view of a fused projection.
    heads = randn(tokens, 2 * shapes.heads * d)[:, : shapes.heads * d].view(tokens, shapes.heads, d)
    head_w = randn(d)
    dtype_name = str(dtype).removeprefix("torch.")
    functions = SPEC.functions
    return [
        KernelCase("add_layer_norm", functions["add_layer_norm"], (x, residual, w, b, 1e-5, x_bias),
                   {"tokens": tokens, "hidden": h, "dtype": dtype_name}),
        KernelCase("rms_norm_heads", functions["rms_norm"], (heads, head_w, 1e-6),
                   {"tokens": tokens, "heads": shapes.heads, "head_dim": d, "dtype": dtype_name}),
        KernelCase("add_rms_norm", functions["add_rms_norm"], (x, residual, w, 1e-6),
                   {"tokens": tokens, "hidden": h, "dtype": dtype_name}, output=torch.cat),
    ]


def _compile_variants(arg_names: Sequence[str]) -> list[CompileVariant]:
    # (IS_RMS, HAS_RESIDUAL, HAS_X_BIAS, STORE_SUM): add_layer_norm ±bias, rms_norm, add_rms_norm
    flags = ((False, True, True, False), (False, True, False, False), (True, False, False, False),
             (True, True, False, True))
    variants = []
    for (is_rms, residual, x_bias, store_sum), dtype in itertools.product(flags, ("*fp16", "*bf16")):
        types = {name: dtype for name in arg_names if name.endswith("_ptr")}
        types.update({name: "i32" for name in ("width", "inner", "stride_xo", "stride_xi", "stride_ro", "stride_ri")})
        types["eps"] = "fp32"
        constexprs = {"IS_RMS": is_rms, "HAS_RESIDUAL": residual, "HAS_X_BIAS": x_bias, "STORE_SUM": store_sum,
                      "BLOCK_N": 1024}
        variants.append(CompileVariant(f"{constexprs} {dtype}", types, constexprs))
    return variants


SPEC = KernelSpec(
    name="fused_norm",
    functions={
        "add_layer_norm": KernelFunction(add_layer_norm_reference, add_layer_norm_triton),
        "rms_norm": KernelFunction(rms_norm_reference, rms_norm_triton),
        "add_rms_norm": KernelFunction(add_rms_norm_reference, add_rms_norm_triton),
    },
    jit=_triton_kernel,
    sample_cases=_sample_cases,
    compile_variants=_compile_variants,
)
