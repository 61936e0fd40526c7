"""The LoRA down-projection after the MLP GELUs from the FP8 activation (models/lora_down_fp8.py) against today's path.

Today a bound slot after a GELU makes the fused GELU kernel also write its output in bf16 (`keep_input`), and
cuBLAS reads it back for `u = A h`. The lever `lora_down_from_fp8` skips that copy and computes u from the FP8
output and row scales the base GEMM reads. At the FLUX.1-dev shapes of a 1024² and a 512² step (single block:
[attention, GELU(mlp)], K = 15360; double block image and text feed-forwards, K = 12288), rank 64, this times
- today: the GELU kernel keeping its output + `F.linear(h, A)` (cuBLAS bf16);
- the lever: the GELU kernel without it + `lora_down_fp8` (Triton split-K kernel + the partial sum);
- the kernel alone for a sweep of launch configurations (rows per program, K tile, columns per K slice, warps,
  stages),
each from a CUDA graph of 20 launches (kernel_probe.graph_ms), and u's relative error against a float64 product
of the same bf16 GELU output both ways (today: bf16 input; the lever: its FP8 rounding). Per-step totals weight
each shape by its calls in a step (38 single blocks; 19 double blocks, one image and one text feed-forward each).

On the GPU machine: `python3 scripts/gpu/probe_lora_down_fp8.py $OUT/probe_lora_down_fp8.json`
"""

import json
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
from aotpack.models import lora_down_fp8 as lever  # noqa: E402
from aotpack.models.examples import relative_error  # noqa: E402
from aotpack.models.fused_quant import _gelu_quant_triton  # noqa: E402
from kernel_probe import graph_ms, record_size, shapes_from_env, sweep_from_env, timed_sweep  # noqa: E402  same folder

RANK = 64
SHAPES = {  # size: {name: (rows, prefix width, GELU width, calls per step)}
    1024: {"single_block": (4608, 3072, 12288, 38), "double_block_image": (4096, 0, 12288, 19),
           "double_block_text": (512, 0, 12288, 19)},
    512: {"single_block": (1536, 3072, 12288, 38), "double_block_image": (1024, 0, 12288, 19),
          "double_block_text": (512, 0, 12288, 19)},
}
SWEEP = sweep_from_env({"block_m": (64, 128), "block_k": (128, 256), "per_slice": (1024, 2048, 4096),
                        "num_warps": (4, 8), "num_stages": (3, 4)})  # PROBE_SWEEP replaces it (kernel_probe.py)
SHAPES = shapes_from_env(SHAPES)  # PROBE_SHAPES="1024:single_block 512:single_block" keeps only those


def gelu_inputs(rows: int, prefix_width: int, width: int, g: torch.Generator) -> tuple:
    """Random bf16 (prefix, GELU input, bias, LoRA delta) for the GELU kernel, and a rank-RANK A over its output."""
    prefix = 3 * torch.randn(rows, prefix_width, device="cuda", generator=g, dtype=torch.bfloat16)
    pre = 3 * torch.randn(rows, width, device="cuda", generator=g, dtype=torch.bfloat16)
    bias = torch.randn(width, device="cuda", generator=g, dtype=torch.bfloat16)
    delta = 0.1 * torch.randn(rows, width, device="cuda", generator=g, dtype=torch.bfloat16)
    k = prefix_width + width
    return prefix, pre, bias, delta, (torch.randn(RANK, k, device="cuda", generator=g) * k**-0.5).to(torch.bfloat16)


def main(out_path):
    g = torch.Generator(device="cuda").manual_seed(0)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rank": RANK,
              "default_config": dict(block_m=lever.BLOCK_M, block_k=lever.BLOCK_K, per_slice=lever.K_PER_SLICE,
                                     num_warps=lever.NUM_WARPS, num_stages=lever.NUM_STAGES), "sizes": {}}
    for size, shapes in SHAPES.items():
        if not shapes:
            continue
        rows_out, totals = [], {"today_ms": 0.0, "lever_ms": 0.0, "best_config_lever_ms": 0.0}
        for name, (rows, prefix_width, width, calls) in shapes.items():
            prefix, pre, bias, delta, a = gelu_inputs(rows, prefix_width, width, g)
            k = prefix_width + width

            def today():
                _, _, h = _gelu_quant_triton(prefix, pre, bias, delta, True)
                return F.linear(h, a)

            def with_lever(**config):
                q, scale, _ = _gelu_quant_triton(prefix, pre, bias, delta, False)
                return lever._lora_down_fp8_triton(q, scale, a, **config)

            q, scale, h = _gelu_quant_triton(prefix, pre, bias, delta, True)
            exact = F.linear(h.double(), a.double())
            row = {"shape": name, "rows": rows, "k": k, "calls_per_step": calls,
                   "u_error_today": relative_error(today().double(), exact),
                   "u_error_lever": relative_error(with_lever().double(), exact),
                   "kernel_vs_reference": relative_error(lever._lora_down_fp8_triton(q, scale, a).float(),
                                                         lever.lora_down_fp8_reference(q, scale, a).float()),
                   "today_ms": graph_ms(today), "lever_ms": graph_ms(with_lever),
                   "gelu_keep_ms": graph_ms(lambda: _gelu_quant_triton(prefix, pre, bias, delta, True)),
                   "gelu_no_keep_ms": graph_ms(lambda: _gelu_quant_triton(prefix, pre, bias, delta, False)),
                   "cublas_bf16_down_ms": graph_ms(lambda: F.linear(h, a)),
                   "lever_down_ms": graph_ms(lambda: lever._lora_down_fp8_triton(q, scale, a))}
            sweep, timed = timed_sweep(SWEEP, lambda **config: lever._lora_down_fp8_triton(q, scale, a, **config))
            row["sweep_best"] = timed[:5]
            best = {key: timed[0][key] for key in SWEEP}
            row["best_config_lever_ms"] = graph_ms(lambda: with_lever(**best))
            row["sweep"] = sweep
            for key in totals:
                totals[key] += calls * row[key]
            rows_out.append(row)
            print(json.dumps({key: value for key, value in row.items() if key != "sweep"}), flush=True)
        record_size(report, size, totals, rows_out, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
