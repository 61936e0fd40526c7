"""Compile two of aotpack's Triton kernels for an H100/H200 (sm90) on a machine without a GPU, in every form a recipe
can ask for: Triton's own front end, its sm90 passes and ptxas (shipped in the triton wheel) accept them.

    pip install --target /tmp/triton36 triton==3.6.0     # the GPU machine's Triton (torch 2.11); ~290 MB
    PYTHONPATH=/tmp/triton36 .venv/bin/python scripts/check_kernels_compile_sm90.py

- `lora_down_fp8`'s kernel (models/lora_down_fp8.py) with A in bf16 and with A's FP8 halves (recipe lever
  `lora_down_fp8_dots`): the FP8 form must run its dots on Hopper's FP8 tensor cores (`wgmma` on e4m3 in the PTX);
- `tailed_rows`' kernel (models/lora_tails.py) with one buffer a reader and paired (recipe lever `lora_tails_paired`).
At FLUX.1-dev's shapes and the launch configs the library uses. What it cannot tell: speed, and numbers (the
interpreter checks, scripts/check_lora_down_fp8_kernel.py and scripts/check_tailed_rows_kernel.py, and the GPU's own
checks do). 2026-12-08, CPU: both kernels, every form, compile with triton 3.6.0 and 3.9.0; the FP8 form's PTX holds
8 `wgmma.mma_async` on e4m3 x e4m3, the bf16 form's 8 on bf16.
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from aotpack.models import lora_down_fp8, lora_tails

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(kernel, types: dict[str, str], constants: dict, **options):
    """`kernel` compiled for sm90: `types` the pointer and scalar arguments' Triton types, `constants` the rest."""
    signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    constexprs = {(kernel.arg_names.index(name),): value for name, value in constants.items()}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=TARGET,
                          options=options)


def main() -> int:
    ok = True
    down = lora_down_fp8._kernel()
    for halves in (False, True):
        a_type = "*fp8e4nv" if halves else "*bf16"
        compiled = compile_kernel(
            down, {"q_ptr": "*fp8e4nv", "a_ptr": a_type, "a_scale_ptr": "*fp32" if halves else a_type,
                   "partial_ptr": "*fp32", "rows": "i32"},
            {"K": 15360, "R": 64, "K_PER_SPLIT": 1024, "BLOCK_M": lora_down_fp8.BLOCK_M,
             "BLOCK_K": lora_down_fp8.BLOCK_K, "DOT_IN_FP32": False, "A_HALVES": halves},
            num_warps=lora_down_fp8.NUM_WARPS, num_stages=lora_down_fp8.NUM_STAGES)
        wgmma = [line for line in compiled.asm["ptx"].splitlines() if "wgmma.mma_async" in line]
        fp8_dots = sum("e4m3.e4m3" in line for line in wgmma)  # e.g. wgmma.mma_async...f32.e4m3.e4m3
        print(f"lora_down_fp8, A {'FP8 halves' if halves else 'bf16'}: cubin {len(compiled.asm['cubin'])} bytes, "
              f"{len(wgmma)} wgmma in the PTX, {fp8_dots} of them on e4m3 x e4m3")
        ok &= fp8_dots > 0 if halves else fp8_dots == 0
    rows = lora_tails._kernel()
    for sides in (1, 2):
        compiled = compile_kernel(
            rows, {"q_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "u_ptr": "*bf16", "factor_ptr": "*fp32",
                   "rows_ptr": "*fp8e4nv", "row_scale_ptr": "*fp32", "tokens": "i32"},
            {"K": 3072, "R": lora_tails.TAIL_RANK, "TAIL": lora_tails.TAIL_COLUMNS,
             "U_STRIDE": 4 * lora_tails.TAIL_RANK, "READERS": 4, "HAS_FACTORS": False, "SIDES": sides, "MIN_LOG2": 0, "BLOCK_T": 16, "BLOCK_K": 512},
            num_warps=4)
        print(f"tailed_rows, {'paired' if sides == 2 else 'one buffer a reader'}: cubin "
              f"{len(compiled.asm['cubin'])} bytes")
    print(f"triton {triton.__version__}: {'all compiled' if ok else 'the FP8-halves form runs no FP8 wgmma'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
