"""The fused GELU + FP8 quantization kernel (models/fused_quant.py) alone: launch configs and bandwidth.

In the default h200 package the kernel takes 8.79 ms of a 1024² step with a rank-64 LoRA in slots
(benchmarks/results/2026-12-01m-h200-fused-quant/), about 2/3 of what its bytes need at the H200's
bandwidth. This probe times it at the three FLUX.1-dev 1024² shapes (single block, double block image
and text feed-forwards), with and without the LoRA slot's extras (the GELU output kept, the preceding
linear's bias and LoRA delta), for several `num_warps`, and reports ms per call, GB/s and ms per step.
Each configuration's output is checked equal to the first one's (4 warps) bit for bit. The launches go
through the package's own launcher (`_gelu_quant_triton`, eager), so they time what the programs run.

On the GPU machine: `python3 scripts/gpu/probe_gelu_quant_kernel.py $OUT/probe_gelu_quant_kernel.json`
"""

import json
import sys

import torch

sys.path.insert(0, ".")
from aotpack.models.fused_quant import FP8, _gelu_quant_triton  # noqa: E402

SHAPES = {  # name: (rows, prefix width, GELU width, calls per 1024² step)
    "single_block": (4608, 3072, 12288, 38),
    "double_block_image": (4096, 0, 12288, 19),
    "double_block_text": (512, 0, 12288, 19),
}


def main(out_path):
    import triton.testing

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
            reference = None
            for num_warps in (4, 8, 16, 32):
                try:
                    outputs = _gelu_quant_triton(prefix, pre, bias, delta, slot, num_warps)
                    ms = triton.testing.do_bench(
                        lambda: _gelu_quant_triton(prefix, pre, bias, delta, slot, num_warps), warmup=25, rep=200)
                except Exception as err:  # a config that does not compile: record it and go on
                    report["cases"].append({"shape": name, "slot": slot, "num_warps": num_warps,
                                            "error": str(err)[:300]})
                    continue
                reference = reference or outputs
                same = all(torch.equal(a.view(torch.uint8) if a.dtype == FP8 else a,
                                       b.view(torch.uint8) if b.dtype == FP8 else b) for a, b in zip(outputs, reference))
                case = {"shape": name, "slot": slot, "num_warps": num_warps, "ms": round(ms, 4),
                        "GB_per_s": round((reads + writes) / ms / 1e6, 1), "ms_per_step": round(ms * per_step, 3),
                        "equal_to_first_config": same}
                report["cases"].append(case)
                print(json.dumps(case), flush=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
