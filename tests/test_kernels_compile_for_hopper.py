"""The Triton kernels compile for an H100 (sm_90) on a machine without a GPU.

The interpreter tests check what the kernels compute, but the interpreter runs the kernel body as
Python: code the GPU compiler rejects (an unsupported construct, a type mismatch between branches,
a bad constexpr) still passes there. Triton ships its own LLVM and ptxas, so each kernel variant
the product launches is compiled here, ahead of time, down to a cubin. This runs in a subprocess:
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
    import itertools
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from infercore.kernels import bias_gelu, fused_norm, segment_pool, splade_pool

    TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200
    failures = []

    def compile_variant(fn, types, constexprs, label):
        signature = {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}
        try:
            kernel = triton.compile(ASTSource(fn, signature, constexprs), target=TARGET, options={"num_warps": 4})
            assert kernel.asm["cubin"], "no cubin"
        except Exception as exc:
            failures.append(f"{label}: {type(exc).__name__}: {str(exc)[:1500]}")

    fn = segment_pool._triton_kernel()
    for mode, flags, dtype in itertools.product(range(5), ((False, False), (True, True)), ("*bf16", "*fp32")):
        types = {name: "*i32" for name in fn.arg_names if name.endswith("_ptr")}
        types.update(hidden_ptr=dtype, out_ptr="*fp32", width="i32", stride_ht="i32", stride_hk="i32",
                     stride_ob="i32")
        constexprs = {"MODE": mode, "HAS_SKIP": flags[0], "EPILOGUE": flags[1], "BLOCK_T": 8, "BLOCK_H": 1024}
        compile_variant(fn, types, constexprs, f"segment_pool {constexprs} {dtype}")

    fn = fused_norm._triton_kernel()
    variants = [  # (IS_RMS, HAS_RESIDUAL, HAS_X_BIAS, STORE_SUM): add_layer_norm ±bias, rms_norm, add_rms_norm
        (False, True, True, False), (False, True, False, False), (True, False, False, False), (True, True, False, True)
    ]
    for (is_rms, residual, x_bias, store_sum), dtype in itertools.product(variants, ("*fp16", "*bf16")):
        types = {name: dtype for name in fn.arg_names if name.endswith("_ptr")}
        types.update({name: "i32" for name in ("width", "inner", "stride_xo", "stride_xi", "stride_ro", "stride_ri")})
        types["eps"] = "fp32"
        constexprs = {"IS_RMS": is_rms, "HAS_RESIDUAL": residual, "HAS_X_BIAS": x_bias, "STORE_SUM": store_sum,
                      "BLOCK_N": 1024}
        compile_variant(fn, types, constexprs, f"fused_norm {constexprs} {dtype}")

    fn = bias_gelu._triton_kernel()
    for tanh, dtype in itertools.product((False, True), ("*fp16", "*bf16")):
        types = {"x_ptr": dtype, "bias_ptr": dtype, "out_ptr": dtype, "numel": "i64", "width": "i32"}
        compile_variant(fn, types, {"TANH": tanh, "BLOCK": 1024}, f"bias_gelu tanh={tanh} {dtype}")

    fn = splade_pool._triton_kernel()
    for has_bias, dtype in itertools.product((False, True), ("*bf16", "*fp16", "*fp32")):
        types = {"hidden_ptr": dtype, "weight_ptr": dtype, "bias_ptr": dtype, "cu_seqlens_ptr": "*i32",
                 "out_ptr": "*fp32"}
        types.update({name: "i32" for name in ("vocab", "width", "stride_ht", "stride_hk", "stride_wv", "stride_wk",
                                                "stride_ob")})
        # What splade_pool_triton passes: full-precision products for fp32 weights.
        constexprs = {"HAS_BIAS": has_bias, "INPUT_PRECISION": "ieee" if dtype == "*fp32" else "tf32",
                      "BLOCK_T": 64, "BLOCK_V": 128, "BLOCK_K": 64}
        compile_variant(fn, types, constexprs, f"splade_pool {constexprs} {dtype}")

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
