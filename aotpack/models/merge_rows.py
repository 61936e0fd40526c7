"""The merge program: one FP8 row-wise weight plus a LoRA product, re-quantized per row, in one pass.

`merged_rows` is the math; `MergeRows` is what the build compiles ahead of time (AOTInductor) into
`merge_rows.pt2` for FP8 packages, with the weight's rows and columns dynamic, so one program serves
every layer shape. The runtime's merge (`runtime/merge.py`) calls it per touched layer and copies the
result into the bound storages.

Why a compiled program: merging r64 into all 494 block linears of FLUX.1-dev took 205 ms on the H200
in eager passes (dequantize 88 ms, product 23 ms, re-quantize 78 ms; each FP8 or mixed-dtype pass at
0.6-1.0 TB/s; benchmarks/results/2026-12-01-h200-speed). Fused, the row max and the FP8 write read the
FP8 weight and the bf16 product once per pass and write one byte per weight.

The value is formed in fp32 (`qdata * scale + B @ A`, the product itself a bf16 matmul), then
re-quantized the way torchao's per-row `from_hp` does (scale = amax / 448, data = fp8(value / scale)),
so no bf16 rounding of the merged weight comes in between.
"""

from __future__ import annotations

import torch
from torch import nn

MERGE_PROGRAM = "merge_rows"  # its name in the build and the package (merge_rows.pt2)
FP8_ROW_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
MIN_SCALE = 1e-12  # torchao's floor for an all-zero row


def merged_rows(qdata: torch.Tensor, scale: torch.Tensor, lora_a: torch.Tensor,
                lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(qdata [N, K] e4m3, scale [N, 1] fp32) + lora_b [N, R] @ lora_a [R, K] -> the new (qdata, scale).

    The adapter scales are already in `lora_b`; stacked adapters are concatenated along R."""
    value = qdata.to(torch.float32) * scale + torch.mm(lora_b, lora_a).to(torch.float32)
    new_scale = (value.abs().amax(dim=1, keepdim=True) / FP8_ROW_MAX).clamp(min=MIN_SCALE)
    new_qdata = (value / new_scale).clamp(-FP8_ROW_MAX, FP8_ROW_MAX).to(qdata.dtype)
    return new_qdata, new_scale


class MergeRows(nn.Module):
    """`merged_rows` as a program: positional tensors, then the (empty) LoRA-input dict every aotpack
    program ends with, so the runtime's program loader calls it like the block programs."""

    def forward(self, qdata, scale, lora_a, lora_b, lora: dict):
        return merged_rows(qdata, scale, lora_a, lora_b)


def export_merge_rows(max_rank: int, lora_dtype: torch.dtype, device, float8_dtype=torch.float8_e4m3fn):
    """`MergeRows` exported with the weight's rows and columns dynamic and the rank fixed at `max_rank`
    (the runtime pads a smaller stack with zero ranks: the product is the same)."""
    rows, cols = torch.export.Dim("rows", min=2, max=1 << 17), torch.export.Dim("cols", min=2, max=1 << 17)
    n, k = 48, 80  # example sizes (distinct, not 0/1, so export keeps them symbolic)
    example = (torch.zeros(n, k, device=device).to(float8_dtype), torch.ones(n, 1, device=device),
               torch.zeros(max_rank, k, dtype=lora_dtype, device=device),
               torch.zeros(n, max_rank, dtype=lora_dtype, device=device), {})
    dynamic = ({0: rows, 1: cols}, {0: rows}, {1: cols}, {0: rows}, {})
    return torch.export.export(MergeRows(), example, dynamic_shapes=dynamic, strict=False)
