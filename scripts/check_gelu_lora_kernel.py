"""The Triton kernel of `fused_gelu_lora` run by Triton's CPU interpreter, against the torch reference.

    pip install --target /tmp/triton triton       # ~290 MB; not a dependency of aotpack or its tests
    PYTHONPATH=/tmp/triton .venv/bin/python scripts/check_gelu_lora_kernel.py     # from a directory without a triton/

No GPU needed. The interpreter's `tl.dot` on bf16 operands returns garbage, so the check runs the kernel's
`DOT_IN_FP32` form (otherwise the same code). The interpreter also rounds float32 to bf16 toward zero and converts
some values to FP8 a binade low (-7.95 -> -4), so the torch reference is no yardstick here: the kernel is compared
with the one-row GELU quantization kernel (`fused_quant`, checked on GPUs) under the same interpreter, given torch's
delta. Without an up-projection every FP8 code must be equal; with one, under 2% may differ (the in-kernel delta
rounds toward zero here); scales and u_out within 1e-2. An indexing fault (a tile's columns, the prefix boundary,
the rank columns, a ragged row block) moves most codes. The GPU's own result is checked by the build (`check_kernel_against_reference`).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from aotpack.models.examples import relative_error  # noqa: E402
from aotpack.models.fused_quant import _gelu_quant_triton  # noqa: E402
from aotpack.models.gelu_lora import _triton, example_inputs, kernel_fits  # noqa: E402


def check(rows: int, prefix: int, width: int, rank: int, has_up: bool, has_down: bool, **config) -> bool:
    inputs = example_inputs(rows, prefix, width, rank, has_up=has_up, has_down=has_down, seed=rows + prefix)
    prefix_t, pre, bias, u_in, b_in, a_out = inputs
    assert kernel_fits(pre, u_in, b_in, a_out)
    q, scale, u_out = _triton(*inputs, **config)
    # the one-row kernel (fused_quant, checked on GPUs and in packages since 2026-12-01) under the same interpreter,
    # given the delta by torch, and the down-projection of its bf16 output by torch
    delta = F.linear(u_in, b_in) if has_up else pre.new_empty(0)
    q_row, scale_row, h_row = _gelu_quant_triton(prefix_t, pre, bias, delta, True, num_warps=1)
    u_row = F.linear(h_row, a_out) if has_down else pre.new_empty(0)
    shapes = q.shape == q_row.shape and scale.shape == scale_row.shape and u_out.shape == u_row.shape
    if not shapes:
        print(f"rows {rows}, prefix {prefix}: shapes {q.shape} {scale.shape} {u_out.shape}, expected "
              f"{q_row.shape} {scale_row.shape} {u_row.shape}")
        return False
    differing = float((q.view(torch.uint8) != q_row.view(torch.uint8)).float().mean())
    errors = [relative_error(scale, scale_row)] + ([relative_error(u_out.float(), u_row.float())] if has_down else [])
    print(f"rows {rows}, prefix {prefix}, width {width}, rank {rank}, up {has_up}, down {has_down}: FP8 codes "
          f"differing {differing:.2%}; scale{', u_out' if has_down else ''} relative error "
          f"{', '.join(f'{e:.2e}' for e in errors)}")
    # without the delta the tiles are the one-row kernel's values: equal; with it, the in-kernel product rounds
    # toward zero here (torch's to nearest), which moves a rare last bit
    return (differing == 0.0 if not has_up else differing < 0.02) and max(errors) < 1e-2


if __name__ == "__main__":
    small = dict(block_m=16, block_k=32, num_warps=1, dot_in_fp32=True)
    cases = [(40, 32, 96, 16, True, True), (17, 0, 64, 16, True, True), (3, 48, 80, 32, True, False),
             (33, 32, 96, 16, False, True), (16, 0, 32, 16, False, False)]
    raise SystemExit(0 if all([check(*case, **small) for case in cases]) else 1)
