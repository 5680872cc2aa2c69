"""The Triton kernels compile for an H100 (sm_90) on a machine without a GPU.

The interpreter tests check what the kernels compute, but the interpreter runs the kernel body as
Python: code the GPU compiler rejects (an unsupported construct, a type mismatch between branches,
a bad constexpr) still passes there. Triton ships its own LLVM and ptxas, so each kernel variant
the product launches (``KernelSpec.compile_variants`` of every kernel in ``kernels.registry``) is
compiled here, ahead of time, down to a cubin. This runs in a subprocess:
the test session has TRITON_INTERPRET=1 set, under which ``triton.jit`` yields interpreted kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parent.parent

COMPILE_ALL = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from infercore.kernels.registry import SPECS

    TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200
    failures = []
    for spec in SPECS:
        fn = spec.jit()
        for variant in spec.compile_variants(fn.arg_names):
            signature = {name: "constexpr" if name in variant.constexprs else variant.types[name]
                         for name in fn.arg_names}
            try:
                kernel = triton.compile(ASTSource(fn, signature, variant.constexprs), target=TARGET,
                                        options={"num_warps": 4})
                assert kernel.asm["cubin"], "no cubin"
            except Exception as exc:
                failures.append(f"{spec.name} {variant.label}: {type(exc).__name__}: {str(exc)[:1500]}")

    print("\\n".join(failures) if failures else "all compiled")
    raise SystemExit(1 if failures else 0)
    """
)


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE_ALL], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert "all compiled" in proc.stdout
