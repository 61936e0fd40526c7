"""The Triton kernel of `group_lora_up` run by Triton's CPU interpreter, against the torch reference.

    pip install --target /tmp/triton triton       # ~290 MB; not a dependency of aotpack or its tests
    PYTHONPATH=/tmp/triton .venv/bin/python scripts/check_lora_up_kernel.py

No GPU needed. The interpreter's `tl.dot` on bf16 operands returns garbage, so the check runs the kernel's
`DOT_IN_FP32` form (otherwise the same code). The interpreter rounds float32 to bf16 toward zero (the GPU rounds to
nearest), so the reference here is the float32 product truncated to bf16: the two agree to summation order
(relative L2 under 1e-4; 0.0 on 2026-12-05, triton 3.9.0, torch 2.13.0 CPU). That checks the indexing (which output
a column tile belongs to, u's rank columns for it, ragged last row block, fewer rows than a block, unused B
pointers). The GPU's own result is checked by the build (`check_kernel_against_reference`).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

from aotpack.models.examples import relative_error  # noqa: E402
from aotpack.models.lora_up import _lora_up_triton, kernel_fits  # noqa: E402


def check(rows: int, widths: tuple[int, ...], rank: int, **config) -> bool:
    generator = torch.Generator().manual_seed(rows + len(widths))
    u = torch.randn(2, rows, rank * len(widths), generator=generator).to(torch.bfloat16)
    bs = [(torch.randn(w, rank, generator=generator) * 0.1).to(torch.bfloat16) for w in widths]
    assert kernel_fits(u, bs, config["block_n"])
    got = _lora_up_triton(u, bs, **config)
    # the float32 product, rounded toward zero as the interpreter rounds to bf16
    want = torch.cat([(p.float() @ b.float().t()).view(torch.int32).bitwise_and(~0xFFFF).view(torch.float32)
                      for p, b in zip(torch.split(u, rank, -1), bs)], -1)
    error = relative_error(got.float(), want)
    shapes_match = got.shape == want.shape
    print(f"rows {rows}, widths {widths}, rank {rank}, {config}: relative error {error:.2e}, shapes {shapes_match}")
    return error < 1e-4 and shapes_match


if __name__ == "__main__":
    small = dict(block_m=16, block_n=32, num_warps=1, dot_in_fp32=True)
    cases = [(40, (64, 32, 96), 16, small), (33, (32,), 32, small), (17, (64, 32, 32, 96), 16, small),
             (3, (64, 32), 16, small), (16, (128, 64), 64, dict(small, block_n=64))]
    raise SystemExit(0 if all([check(*case[:3], **case[3]) for case in cases]) else 1)
