"""Whether Triton can be imported here: kernels dispatch to their Triton version on CUDA only when
it can, and to their plain-torch reference otherwise."""

from __future__ import annotations

import functools


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
