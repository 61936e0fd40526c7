"""The fused GELU + FP8 quantization kernel (models/fused_quant.py) alone: launch configs, and closeness to torch.

In the default h200 package the kernel takes 5.38 ms of a 1024² step with no LoRA and 8.79 ms with a rank-64 LoRA
in slots (benchmarks/results/2026-12-03d-h200-normquant-default/), at ~2.5-3.7 TB/s in this probe. It times, at the
three FLUX.1-dev 1024² shapes (single block, double block image and text feed-forwards), with and without the LoRA
slot's extras (the GELU output kept, the preceding linear's bias and LoRA delta), the kernel for several
`num_warps`, each launch from a CUDA graph of 20 launches, replayed (an eager `wrap_triton` launch costs more host
time than the text shape's kernel takes). Every configuration's outputs are checked equal, bit for bit, to the
package's launch, and that one is compared with torch's eager reference (`gelu_quant_reference`: the share of
equal FP8 codes, scales and GELU outputs, and the relative error of the dequantized output).

A two-pass kernel (the row CHUNK columns at a time, amax first, quantization second from L2) was timed here on
2026-12-03 and dropped: slower with no LoRA at every chunk and warp count (single block 0.103-0.135 vs 0.082 ms),
a little faster in the slotted single block (0.142 vs 0.156 ms); in the package +1.95 ms with no LoRA, -0.11 ms in
slots (benchmarks/results/2026-12-03e-h200-gelu-two-pass/; its code is in the commit before that folder's).

On the GPU machine: `python3 scripts/gpu/probe_gelu_quant_kernel.py $OUT/probe_gelu_quant_kernel.json`
"""

import json
import sys

import torch

sys.path.insert(0, ".")
from aotpack.models.examples import relative_error  # noqa: E402
from aotpack.models.fused_quant import _gelu_quant_triton, gelu_quant_reference  # noqa: E402
from kernel_probe import equal_fraction, graph_ms  # noqa: E402  same folder

SHAPES = {  # name: (rows, prefix width, GELU width, calls per 1024² step)
    "single_block": (4608, 3072, 12288, 38),
    "double_block_image": (4096, 0, 12288, 19),
    "double_block_text": (512, 0, 12288, 19),
}
WARPS = (4, 8, 16)


def against_torch(outputs, reference):
    (q, scale, h), (q_ref, scale_ref, h_ref) = outputs, reference
    return {"fp8_codes_equal": round(equal_fraction(q, q_ref), 6), "scales_equal": round(equal_fraction(scale, scale_ref), 6),
            "gelu_equal": round(equal_fraction(h, h_ref), 6) if h.numel() else None,
            "rel_error": relative_error(q.float() * scale, q_ref.float() * scale_ref)}


def main(out_path):
    g = torch.Generator(device="cuda").manual_seed(0)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": []}
    for name, (rows, prefix_width, width, per_step) in SHAPES.items():
        def rnd(*shape):
            return 3 * torch.randn(*shape, device="cuda", generator=g, dtype=torch.bfloat16)
        prefix, pre = rnd(rows, prefix_width), rnd(rows, width)
        for slot in (False, True):  # slot: the GELU output kept, bias and LoRA delta added in the kernel
            bias = rnd(width) if slot else pre.new_empty(0)
            delta = rnd(rows, width) if slot else pre.new_empty(0)
            reads = (prefix.numel() + pre.numel() + delta.numel() + bias.numel()) * 2
            writes = rows * (prefix_width + width) * (1 + (2 if slot else 0)) + rows * 4
            package = _gelu_quant_triton(prefix, pre, bias, delta, slot)
            report["cases"].append({"shape": name, "slot": slot, "package_vs_torch_eager": against_torch(
                package, gelu_quant_reference(prefix, pre, bias, delta, slot))})
            print(json.dumps(report["cases"][-1]), flush=True)
            for num_warps in WARPS:
                def launch():
                    return _gelu_quant_triton(prefix, pre, bias, delta, slot, num_warps)
                try:
                    outputs = launch()
                    ms = graph_ms(launch)
                except Exception as err:  # a config that does not compile: record it and go on
                    report["cases"].append({"shape": name, "slot": slot, "num_warps": num_warps,
                                            "error": str(err)[:300]})
                    continue
                same = all(equal_fraction(a, b) == 1.0 for a, b in zip(outputs, package) if a.numel())
                case = {"shape": name, "slot": slot, "num_warps": num_warps, "ms": round(ms, 4),
                        "GB_per_s": round((reads + writes) / ms / 1e6, 1), "ms_per_step": round(ms * per_step, 3),
                        "equal_to_package_launch": same}
                report["cases"].append(case)
                print(json.dumps(case), flush=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
