"""The Triton kernels compile for a GPU (Hopper, sm_90) even here without one: Triton's own ptxas
turns them into cubins. The interpreter tests check what they compute; this checks that the
compiler accepts them (the interpreter is more lenient). Runs in a subprocess because the test
process defines the kernels for the interpreter."""
import os
import subprocess
import sys
import textwrap

import pytest

from mmfast.dispatch import triton_available

SCRIPT = textwrap.dedent("""
    import itertools
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from mmfast.kernels.balance_coefficients import _balance_coefficients_kernel
    from mmfast.kernels.modality_scores import _modality_scores_kernel

    target = GPUTarget("cuda", 90, 32)
    count = 0
    scores_sig = {"logits_ptr": None, "labels_ptr": "*i64", "mask_ptr": "*fp32", "s_ptr": "*fp32",
                  "partial_ptr": "*fp32", "B": "i32", "C": "i32", "num_row_blocks": "i32",
                  "stride_lm": "i64", "stride_lb": "i64", "stride_lc": "i64", "stride_mask_m": "i64",
                  "stride_mask_b": "i64", "HAS_MASK": "constexpr", "BLOCK_B": "constexpr", "BLOCK_C": "constexpr"}
    for dtype, has_mask, (bb, bc) in itertools.product(["*fp32", "*fp16", "*bf16"], [False, True], [(64, 2), (4, 1024)]):
        sig = dict(scores_sig, logits_ptr=dtype)
        src = ASTSource(fn=_modality_scores_kernel, signature=sig,
                        constexprs={"HAS_MASK": has_mask, "BLOCK_B": bb, "BLOCK_C": bc})
        assert "cubin" in triton.compile(src, target=target).asm
        count += 1
    coef_sig = {"in_ptr": "*fp32", "out_ptr": "*fp32", "M": "i32", "NB": "i32", "alpha": "fp32", "q_base": "fp32",
                "lam": "fp32", "INPUT_IS_RHO": "constexpr", "KIND": "constexpr", "FORM": "constexpr", "Z": "constexpr",
                "BLOCK_M": "constexpr", "BLOCK_NB": "constexpr"}
    for is_rho, kind, form, z in itertools.product([False, True], [0, 1], [0, 1, 2], [0, 1]):
        src = ASTSource(fn=_balance_coefficients_kernel, signature=coef_sig,
                        constexprs={"INPUT_IS_RHO": is_rho, "KIND": kind, "FORM": form, "Z": z,
                                    "BLOCK_M": 4, "BLOCK_NB": 128})
        assert "cubin" in triton.compile(src, target=target).asm
        count += 1
    print("compiled", count)
""")


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_triton_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "compiled 36" in out.stdout
