"""Does the GELU quantization kernel with the LoRA projections inside (`fused_gelu_lora`) beat the path it replaces?

Per MLP of a FLUX.1-dev step in slots (r64), today's programs run: cuBLAS `delta = u_in B_in^T` (the linear before
the GELU), the one-row GELU kernel reading the delta and writing the FP8 tile and a bf16 copy of the GELU output,
and cuBLAS `u_out = h A_out^T` (the linear after it). The lever's op does all three in two launches of one kernel
over row blocks and column slices (`aotpack/models/gelu_lora.py`; its first form, one program walking a row
block's whole width twice, measured 2.8x slower here on 2026-12-05). This probe checks the op against its reference on the GPU (`kernel_errors`), then
times both paths at each MLP shape of a 1024² step (single blocks: 4608 rows, 3072 + 12288 wide; double blocks'
image and text streams: 4096 and 512 rows, 12288 wide) over a few launch configurations, replayed from CUDA graphs,
and sums them over a step (38 single, 19 + 19 double).

On the GPU machine: `python3 scripts/gpu/probe_gelu_lora.py $OUT/gelu_lora.json` (after `source scripts/gpu/env.sh`)
"""

import json
import sys

import torch
import torch.nn.functional as F
from probe_lora_kappend import graph_ms

from aotpack.models import gelu_lora
from aotpack.models.fused_quant import _gelu_quant_triton

SHAPES = {"single": (4608, 3072, 38), "double_image": (4096, 0, 19), "double_text": (512, 0, 19)}  # rows, prefix, per step
# (BLOCK_M, BLOCK_K, columns a slice, warps); the first is the op's default
CONFIGS = [(64, 64, 1024, 4), (64, 128, 1024, 4), (32, 64, 1024, 4), (64, 64, 2048, 4), (64, 64, 512, 4),
           (128, 64, 1024, 8), (64, 64, 1024, 8)]


def main(out_path: str) -> None:
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "kernel_errors": gelu_lora.kernel_errors("cuda"), "shapes": {}}
    print(json.dumps(report["kernel_errors"]), flush=True)
    totals = {"today": 0.0, **{str(c): 0.0 for c in CONFIGS}}
    for name, (rows, prefix, count) in SHAPES.items():
        prefix_t, pre, bias, u_in, b_in, a_out = gelu_lora.example_inputs(rows, prefix, 12288, 64, device="cuda")

        def today():
            delta = F.linear(u_in, b_in)
            q, scale, h = _gelu_quant_triton(prefix_t, pre, bias, delta, True)
            return q, scale, F.linear(h, a_out)

        shape = {"today_ms": graph_ms(today), "configs": {}}
        reference = gelu_lora.reference(prefix_t, pre, bias, u_in, b_in, a_out)
        for block_m, block_k, slice_columns, warps in CONFIGS:
            def fused(block_m=block_m, block_k=block_k, slice_columns=slice_columns, warps=warps):
                return gelu_lora._triton(prefix_t, pre, bias, u_in, b_in, a_out, block_m=block_m, block_k=block_k,
                                         slice_columns=slice_columns, num_warps=warps)
            q, scale, u_out = fused()
            error = max(gelu_lora.relative_error(q.float() * scale, reference[0].float() * reference[1]),
                        gelu_lora.relative_error(u_out.float(), reference[2].float()))
            shape["configs"][str((block_m, block_k, slice_columns, warps))] = {"ms": graph_ms(fused), "error": error}
        report["shapes"][name] = shape
        totals["today"] += count * shape["today_ms"]
        for config, result in shape["configs"].items():
            totals[config] += count * result["ms"]
        print(name, json.dumps(shape), flush=True)
    report["step_ms_1024"] = totals
    print(json.dumps(totals), flush=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
