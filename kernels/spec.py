"""What the kernel registry (``kernels.registry``) knows of each Triton kernel: ``KernelSpec``.

One spec per kernel module, defined at the bottom of that module beside the code it describes, holds
every fact the rest of the tree needs about the kernel: its name (the unit the start-up self-check
switches off), its entry points (torch reference + Triton launcher with the same contract), sample
cases drawn at given widths (the self-check runs them at a model's widths, the GPU benchmark at
serving sizes) and the variants the product compiles (the sm_90 compile test builds each one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class SampleShapes:
    """The widths sample cases are drawn at: a model's (start-up self-check) or a serving size (GPU
    benchmark). ``lengths``: the packed sequences' token counts (several, one of a single token by
    default); ``heads``: query heads of the per-head norm's input; ``vocab_size``: SPLADE models
    only (None: no SPLADE case)."""

    hidden_size: int
    intermediate_size: int
    head_dim: int
    vocab_size: int | None = None
    lengths: tuple[int, ...] = (5, 1, 9, 3)
    heads: int = 2

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def cu_seqlens(self, device: torch.device) -> torch.Tensor:
        """[len(lengths) + 1] int32 cumulative lengths on ``device``."""
        return torch.tensor((0, *torch.tensor(self.lengths).cumsum(0).tolist()), dtype=torch.int32, device=device)


@dataclass(frozen=True)
class KernelFunction:
    """One entry point of a kernel: the torch reference and the Triton launcher, same signature and
    contract (the dispatcher beside them picks one)."""

    reference: Callable[..., Any]
    triton: Callable[..., Any]


def _same(result: Any) -> torch.Tensor:
    return result


@dataclass(frozen=True)
class KernelCase:
    """One call of an entry point on sample inputs, to compare (self-check, tests) or time (benchmark)."""

    name: str
    function: KernelFunction
    args: tuple[Any, ...]
    # What the case measures, for reports: sizes and dtype.
    shape: dict[str, Any]
    # The result as one tensor (entry points returning several are concatenated).
    output: Callable[[Any], torch.Tensor] = _same

    def run_reference(self) -> torch.Tensor:
        return self.output(self.function.reference(*self.args))

    def run_triton(self, **options: Any) -> torch.Tensor:
        """``options``: tuning keywords of the Triton launcher (block sizes)."""
        return self.output(self.function.triton(*self.args, **options))


@dataclass(frozen=True)
class CompileVariant:
    """One specialisation the product launches: a Triton type per runtime argument and a value per
    constexpr."""

    label: str
    types: dict[str, str]
    constexprs: dict[str, Any]


@dataclass(frozen=True)
class KernelSpec:
    """A kernel's facts, read by the self-check, the compile test, the GPU benchmark and
    ``triton_support``.

    name:             the name the self-check switches off and the logs use
    functions:        entry point name → reference and Triton launcher; sample cases call them
                      through this table (a test replaces an entry to fake a broken kernel)
    jit:              builds the ``@triton.jit`` function (imports Triton; cached)
    sample_cases:     (shapes, device, dtype, generator) → the cases at those widths
    compile_variants: the jit function's argument names → every variant the launchers use
    """

    name: str
    functions: dict[str, KernelFunction]
    jit: Callable[[], Any]
    sample_cases: Callable[[SampleShapes, torch.device, torch.dtype, torch.Generator], list[KernelCase]]
    compile_variants: Callable[[Sequence[str]], list[CompileVariant]] = field(repr=False)


def sampler(device: torch.device, dtype: torch.dtype, generator: torch.Generator) -> Callable[..., torch.Tensor]:
    """randn(*shape, scale=1.0) drawn on the CPU from ``generator`` (the same values on every device),
    then moved to ``device`` in ``dtype``."""

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    return randn
