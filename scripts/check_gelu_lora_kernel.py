"""The Triton kernel of `fused_gelu_lora` run by Triton's CPU interpreter, against the torch reference.

    pip install --target /tmp/triton triton       # ~290 MB; not a dependency of aotpack or its tests
    PYTHONPATH=/tmp/triton .venv/bin/python scripts/check_gelu_lora_kernel.py     # from a directory without a triton/

No GPU needed. The interpreter's `tl.dot` on bf16 operands returns garbage, so the check runs the kernel's
`DOT_IN_FP32` form (otherwise the same code). The interpreter also rounds float32 to bf16 toward zero and converts
some values to FP8 a binade low (-7.95 -> -4), so the torch reference is no yardstick here: the kernel is compared
with the one-row GELU quantization kernel (`fused_quant`, checked on GPUs) under the same interpreter, given torch's
delta: the FP8 tiles against its bf16 GELU output (within 1.5x of its own FP8 tiles' error), the row scales and
`u_out` within 1e-2 (the scales are rounded to bf16 by torch here, toward zero by the interpreter there). Slices of
64 columns and 16-row blocks make every case several programs each way. An indexing fault (a tile's columns, a
slice's start, the prefix boundary, the rank columns, a ragged row block) gives O(1) errors.
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
    # the FP8 tiles against the one-row kernel's bf16 GELU output: within FP8's rounding (and the interpreter's)
    dequantized = relative_error(q.float() * scale, h_row.float())
    row_error = relative_error(q_row.float() * scale_row, h_row.float())
    errors = [relative_error(scale, scale_row)] + ([relative_error(u_out.float(), u_row.float())] if has_down else [])
    print(f"rows {rows}, prefix {prefix}, width {width}, rank {rank}, up {has_up}, down {has_down}: FP8 tiles "
          f"{dequantized:.2e} from h (the one-row kernel's {row_error:.2e}); scale{', u_out' if has_down else ''} "
          f"relative error {', '.join(f'{e:.2e}' for e in errors)}")
    return dequantized < 1.5 * row_error and max(errors) < 1e-2


if __name__ == "__main__":
    small = dict(block_m=16, block_k=32, slice_columns=64, num_warps=1, dot_in_fp32=True)  # several slices a row
    cases = [(40, 32, 96, 16, True, True), (17, 0, 64, 16, True, True), (3, 48, 80, 32, True, False),
             (33, 32, 96, 16, False, True), (16, 0, 32, 16, False, False)]
    raise SystemExit(0 if all([check(*case, **small) for case in cases]) else 1)
