"""The Triton kernel of `lora_up_in_gemm` run by Triton's CPU interpreter, against a float32 product.

    pip install --target /tmp/triton triton       # ~290 MB; not a dependency of aotpack or its tests
    cd /tmp && PYTHONPATH=/tmp/triton:<this checkout> <python> <this checkout>/scripts/check_gemm_lora_kernel.py

No GPU needed. The interpreter has no FP8 and reads bf16 TMA tiles wrongly (values of ~1e11), so the operands here
are fp16 and the kernel runs as written otherwise: persistent programs walking the tiles (3 programs over 3 x 3
tiles), a ragged last row block (300 rows), the scales, the bias, `u` as a column view (row stride 2R), both
accumulation forms, and the LoRA tiles loaded after the K loop or before it. Relative L2 against float32
`x W^T * scales + bias + u B^T`: 2.1e-4 each on 2026-12-05 (triton 3.9.0, torch 2.13.0 CPU; fp16 output rounding).
The GPU's own result is checked by the build (`check_kernel_against_reference`) and inside a package by
`scripts/gpu/check_gemm_lora_aoti.py`.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402

from aotpack.models import gemm_lora  # noqa: E402
from aotpack.models.examples import relative_error  # noqa: E402


def main() -> None:
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8))  # this script only
    generator = torch.Generator().manual_seed(0)
    rows, n, k, rank, programs = 300, 384, 256, 64, 3
    x, w = torch.randn(rows, k, generator=generator).half(), torch.randn(n, k, generator=generator).half()
    x_scale, w_scale = torch.rand(rows, generator=generator) + 0.5, torch.rand(n, generator=generator) + 0.5
    bias = torch.randn(n, generator=generator).half()
    u = torch.randn(rows, 2 * rank, generator=generator).half()[:, rank:]  # a column view, as group_lora_down leaves
    b = torch.randn(n, rank, generator=generator).half()
    worst = 0.0
    for lora, has_bias, fast, prefetch in ((False, False, True, False), (True, True, True, False),
                                           (True, True, False, False), (True, True, True, True)):
        y = torch.empty(rows, n, dtype=torch.float16)
        gemm_lora._kernel()[(programs,)](
            x, x_scale, w, w_scale, bias, u, u.stride(0), b, y, rows, N=n, K=k, R=rank, PROGRAMS=programs,
            HAS_BIAS=has_bias, HAS_LORA=lora, FAST_ACCUM=fast, PREFETCH_LORA=prefetch, BM=128, BN=128, BK=128,
            GROUP=gemm_lora.GROUP_M)
        want = (x.float() @ w.float().t()) * x_scale[:, None] * w_scale[None, :]
        want = want + (bias.float() if has_bias else 0) + (u.float() @ b.float().t() if lora else 0)
        error = relative_error(y.float(), want)
        worst = max(worst, error)
        print(f"lora {lora}, bias {has_bias}, fast accumulation {fast}, LoRA tiles first {prefetch}: "
              f"relative L2 {error:.2e}")
    assert worst < 1e-3, worst


if __name__ == "__main__":
    main()
