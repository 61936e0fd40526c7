"""The merge program: FP8 row-wise weights plus their LoRA products, re-quantized per row, in one pass.

`merged_rows` is the math; `MergeLayers` is what the build compiles ahead of time (AOTInductor) into
`merge_layers.pt2` for FP8 packages: a stack of layers of one shape `[L, N, K]`, with the layer count,
rows, columns and rank all dynamic, so one program serves every layer shape and every adapter rank. The
runtime's merge (`runtime/merge.py`) groups the touched layers by shape and calls it once per group (in
calls of bounded size) and copies the results into the bound storages.

Why a compiled program: merging r64 into all 494 block linears of FLUX.1-dev took 205 ms on the H200
in eager passes (dequantize 88 ms, product 23 ms, re-quantize 78 ms; each FP8 or mixed-dtype pass at
0.6-1.0 TB/s; benchmarks/results/2026-12-01-h200-speed). Fused, the row max and the FP8 write read the
FP8 weight and the bf16 product once per pass and write one byte per weight. Why layers in one call: with
one call per layer (the earlier `merge_rows.pt2`, 2-D) the fold was host-bound, 494 program calls at ~95 µs
plus ~2500 launches for the factors (scripts/gpu/probe_first_merge.py, 2026-12-02).

The value is formed in fp32 (`qdata * scale + B @ A`, the product itself a bf16 matmul), then
re-quantized the way torchao's per-row `from_hp` does (scale = amax / 448, data = fp8(value / scale)),
so no bf16 rounding of the merged weight comes in between.
"""

from __future__ import annotations

import torch
from torch import nn

MERGE_PROGRAM = "merge_layers"  # its name in the build and the package (merge_layers.pt2)
FP8_ROW_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
MIN_SCALE = 1e-12  # torchao's floor for an all-zero row


def merged_rows(qdata: torch.Tensor, scale: torch.Tensor, lora_a: torch.Tensor,
                lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(qdata [..., N, K] e4m3, scale [..., N, 1] fp32) + lora_b [..., N, R] @ lora_a [..., R, K] -> the new
    (qdata, scale); the leading dimension, when there is one, counts layers of one shape.

    The adapter scales are already in `lora_b`; stacked adapters are concatenated along R."""
    value = qdata.to(torch.float32) * scale + torch.matmul(lora_b, lora_a).to(torch.float32)
    new_scale = (value.abs().amax(dim=-1, keepdim=True) / FP8_ROW_MAX).clamp(min=MIN_SCALE)
    new_qdata = (value / new_scale).clamp(-FP8_ROW_MAX, FP8_ROW_MAX).to(qdata.dtype)
    return new_qdata, new_scale


class MergeLayers(nn.Module):
    """`merged_rows` over a stack of layers as a program: positional tensors, then the (empty) LoRA-input dict
    every aotpack program ends with, so the runtime's program loader calls it like the block programs."""

    def forward(self, qdata, scale, lora_a, lora_b, lora: dict):
        return merged_rows(qdata, scale, lora_a, lora_b)


def export_merge_layers(lora_dtype: torch.dtype, device, float8_dtype=torch.float8_e4m3fn):
    """`MergeLayers` exported with the layer count, the weight's rows and columns and the rank dynamic (a
    rank-16 adapter merges at rank 16, not padded to the package's max rank)."""
    layers, rank = torch.export.Dim("layers", min=1, max=1 << 12), torch.export.Dim("rank", min=1, max=1 << 14)
    rows, cols = torch.export.Dim("rows", min=2, max=1 << 17), torch.export.Dim("cols", min=2, max=1 << 17)
    count, n, k, r = 3, 48, 80, 16  # example sizes (distinct, not 0/1, so export keeps them symbolic and apart)
    example = (torch.zeros(count, n, k, device=device).to(float8_dtype), torch.ones(count, n, 1, device=device),
               torch.zeros(count, r, k, dtype=lora_dtype, device=device),
               torch.zeros(count, n, r, dtype=lora_dtype, device=device), {})
    dynamic = ({0: layers, 1: rows, 2: cols}, {0: layers, 1: rows}, {0: layers, 1: rank, 2: cols},
               {0: layers, 1: rows, 2: rank}, {})
    return torch.export.export(MergeLayers(), example, dynamic_shapes=dynamic, strict=False)
