"""The Triton kernel of `lora_down_from_fp8` run by Triton's CPU interpreter, against the torch reference.

    pip install --target /tmp/triton triton       # ~290 MB; not a dependency of aotpack or its tests
    PYTHONPATH=/tmp/triton .venv/bin/python scripts/check_lora_down_fp8_kernel.py

No GPU needed. The kernel converts FP8 to bf16 (exact) and accumulates in float32 per K slice; the reference
multiplies in float32. The interpreter's `tl.dot` on bf16 operands returns garbage (1e8 off on a 16 x 32 x 16
product that float32 operands get right), so the check runs the kernel's `DOT_IN_FP32` form, which casts both tiles
to float32 before the dot and is otherwise the same code; so for the FP8 x FP8 dots against A's halves (lever
`lora_down_fp8_dots`), whose reference sums the two halves' products under their row scales. The two agree up to summation order (relative L2 under
1e-5): that checks the
kernel's indexing (row blocks, K slices and their masks past a K that is no multiple of the tile, ragged last row
block, the rank axis) and the partial sum with the row scales. The GPU's own conversions are checked by the build
(`check_kernel_against_reference`). 2026-12-04, triton 3.9.0, torch 2.13.0 CPU: all cases pass.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

from aotpack.models.examples import relative_error  # noqa: E402
from aotpack.models.lora_down_fp8 import (  # noqa: E402
    _lora_down_fp8_triton,
    fp8_hi_lo_rows,
    lora_down_fp8_dots_reference,
    lora_down_fp8_reference,
)


def check(rows: int, k: int, rank: int, **config) -> bool:
    """Both forms of the kernel: A in bf16, and A's FP8 halves (recipe lever `lora_down_fp8_dots`)."""
    generator = torch.Generator().manual_seed(rows + k)
    x = 3 * torch.randn(rows, k, generator=generator)
    scale = (x.abs().amax(-1, keepdim=True) / 448).clamp_min(1e-12)
    q = (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    a = torch.randn(rank, k, generator=generator).to(torch.bfloat16)
    a[rank // 2] = 0  # an unused rank row: its halves' scale is `tiny`
    a8, a_scale = fp8_hi_lo_rows(a)
    errors = {
        "bf16 A": relative_error(_lora_down_fp8_triton(q, scale, a, **config).float(),
                                 lora_down_fp8_reference(q, scale, a).float()),
        "A halves": relative_error(_lora_down_fp8_triton(q, scale, a8, a_scale, torch.bfloat16, **config).float(),
                                   lora_down_fp8_dots_reference(q, scale, a8, a_scale, torch.bfloat16).float()),
    }
    print(f"rows {rows}, K {k}, rank {rank}, {config}: relative error "
          + ", ".join(f"{form} {error:.2e}" for form, error in errors.items()))
    return max(errors.values()) < 1e-5


if __name__ == "__main__":
    small = dict(block_m=16, block_k=32, per_slice=64, num_warps=1, num_stages=1, dot_in_fp32=True)
    cases = [(40, 200, 16, small), (16, 64, 32, small), (5, 96, 16, small), (33, 130, 64, dict(small, per_slice=100))]
    raise SystemExit(0 if all([check(*case[:3], **case[3]) for case in cases]) else 1)
