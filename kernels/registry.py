"""Every Triton kernel infercore dispatches to, one ``spec.KernelSpec`` each (defined in its module).

Read by the start-up self-check (``self_check``), ``triton_support.disable``, the sm_90 compile test
(tests/test_kernels_compile_for_hopper.py) and the GPU benchmark (benchmarks/bench_gpu.py). A new
kernel is its module, with its ``SPEC`` at the bottom, plus one entry here.
"""

from __future__ import annotations

import torch

from . import bias_gelu, fused_norm, segment_pool, splade_pool
from .spec import KernelCase, KernelSpec, SampleShapes

SPECS: tuple[KernelSpec, ...] = (fused_norm.SPEC, bias_gelu.SPEC, segment_pool.SPEC, splade_pool.SPEC)

# The kernels by the name the self-check switches off and the logs use.
KERNELS: tuple[str, ...] = tuple(spec.name for spec in SPECS)


def sample_cases(shapes: SampleShapes, device: torch.device, dtype: torch.dtype) -> list[tuple[str, KernelCase]]:
    """(kernel name, case) for every kernel's sample cases at ``shapes``, inputs drawn from one seeded
    generator (the same inputs on every run)."""
    generator = torch.Generator().manual_seed(0)
    return [(spec.name, case) for spec in SPECS for case in spec.sample_cases(shapes, device, dtype, generator)]
