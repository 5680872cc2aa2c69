"""Whether a Triton kernel may run: Triton importable, a CUDA tensor, and the kernel not switched off
by the start-up self-check (``kernels.self_check``), which falls back to the plain-torch reference
for a kernel that fails or disagrees with it on this GPU, toolchain and model shapes."""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger("infercore.kernels")

# kernel name → why it was switched off (for this process).
_disabled: dict[str, str] = {}


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(kernel: str, x: torch.Tensor) -> bool:
    """Dispatch test of every kernel: its Triton version for CUDA tensors, unless switched off."""
    return x.is_cuda and kernel not in _disabled and triton_available()


def disable(kernel: str, reason: str) -> None:
    # Imported here: the registry imports every kernel module, and each of them imports this one.
    from .registry import KERNELS

    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}")
    if kernel not in _disabled:
        log.error("Triton kernel %s switched off, its torch reference runs instead: %s", kernel, reason)
    _disabled[kernel] = reason


def disabled() -> dict[str, str]:
    """The kernels switched off in this process and why."""
    return dict(_disabled)


def enable_all() -> None:
    """Forget what the self-check switched off (tests; a new process starts this way)."""
    _disabled.clear()
