"""The fused LayerNorm + modulation + FP8 quantization kernel (models/norm_quant.py) alone: launch configs,
bandwidth and where its numbers part from the torch reference.

1. Stages, at the single block's 1024² shape: the kept modulated input against the reference's (bit for bit
   and in bf16 ulps), the norm alone (shift = scale = 0) against `F.layer_norm`, the kernel's FP8 codes against
   torch's conversion of its own `h / scale`, and the reference compiled by Inductor against the eager one.
2. Timing at FLUX.1-dev's 1024² shapes (single block: 4608 joint tokens; double block: 4096 image and 512 text
   tokens), with and without the kept input (LoRA slots), for several `num_warps`: 20 launches captured in a
   CUDA graph and replayed (an eager `wrap_triton` launch costs more host time than the kernel takes).

On the GPU machine: `python3 scripts/gpu/probe_norm_quant_kernel.py $OUT/probe_norm_quant_kernel.json`
"""

import json
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
from aotpack.models.examples import relative_error  # noqa: E402
from aotpack.models.fused_quant import quantize_rows  # noqa: E402
from aotpack.models.norm_quant import _norm_modulate_quant_triton, norm_modulate_quant_reference  # noqa: E402
from kernel_probe import equal_fraction as same, graph_ms  # noqa: E402  same folder

SHAPES = {  # name: (tokens, calls per 1024² step)
    "single_block": (4608, 38),
    "double_block_image": (4096, 38),  # norm1 and norm2
    "double_block_text": (512, 38),
}


def inputs(tokens, generator):
    x = (3 * torch.randn(1, tokens, 3072, device="cuda", generator=generator) + 0.5).to(torch.bfloat16)
    shift, scale, _ = torch.randn(1, 3 * 3072, device="cuda", generator=generator).to(torch.bfloat16).chunk(3, dim=1)
    return x, shift, scale


def stages(generator):
    x, shift, scale = inputs(4608, generator)
    q, row_scale, h = _norm_modulate_quant_triton(x, shift, scale, 1e-6, True)
    q_ref, scale_ref, h_ref = norm_modulate_quant_reference(x, shift, scale, 1e-6, True)
    zero = torch.zeros_like(shift)
    _, _, normed = _norm_modulate_quant_triton(x, zero, zero, 1e-6, True)
    torch_q, torch_scale = quantize_rows(h)
    compiled = torch.compile(norm_modulate_quant_reference, fullgraph=True)(x, shift, scale, 1e-6, True)
    ulps = ((h.float() - h_ref.float()).abs() / h_ref.float().abs().clamp_min(1e-30) * 128).round()
    return {
        "h_equal_fraction": same(h, h_ref), "h_rel_error": relative_error(h, h_ref),
        "h_diff_ulps_histogram": {str(int(k)): int(v) for k, v in zip(*torch.unique(ulps.clamp_max(8),
                                                                                   return_counts=True))},
        "norm_equal_fraction_vs_layer_norm": same(normed, F.layer_norm(x, (3072,), eps=1e-6)),
        "q_equal_fraction_vs_reference": same(q, q_ref), "scale_equal_fraction_vs_reference": same(row_scale, scale_ref),
        "q_equal_fraction_vs_torch_conversion_of_own_h": same(q, torch_q),
        "scale_equal_fraction_vs_own_h": same(row_scale, torch_scale),
        "compiled_reference_h_equal_fraction_vs_eager": same(compiled[2], h_ref),
        "compiled_reference_q_rel_error_vs_eager": relative_error(compiled[0].float() * compiled[1],
                                                                  q_ref.float() * scale_ref),
        "kernel_q_rel_error_vs_eager": relative_error(q.float() * row_scale, q_ref.float() * scale_ref),
    }


def main(out_path):
    g = torch.Generator(device="cuda").manual_seed(0)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "stages": stages(g), "cases": []}
    print(json.dumps(report["stages"]), flush=True)
    for name, (tokens, per_step) in SHAPES.items():
        x, shift, scale = inputs(tokens, g)
        for keep in (False, True):
            moved = x.numel() * 2 + x.numel() * (1 + (2 if keep else 0)) + tokens * 4
            for num_warps in (2, 4, 8, 16):
                ms = graph_ms(lambda: _norm_modulate_quant_triton(x, shift, scale, 1e-6, keep, num_warps))
                case = {"shape": name, "keep_input": keep, "num_warps": num_warps, "ms": round(ms, 4),
                        "GB_per_s": round(moved / ms / 1e6, 1), "ms_per_step": round(ms * per_step, 3)}
                report["cases"].append(case)
                print(json.dumps(case), flush=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
