"""The fused GELU + FP8 quantization kernel (models/fused_quant.py) alone: one pass vs two passes, launch configs.

In the default h200 package the kernel takes 5.38 ms of a 1024² step with no LoRA and 8.79 ms with a rank-64 LoRA
in slots (benchmarks/results/2026-12-03d-h200-normquant-default/), at ~2.5-3 TB/s in this probe's first run
(2026-12-01m). The one-pass kernel holds a whole 15360-wide row in registers, so one program fills an SM and its
load, reduction and store phases do not overlap. This probe times, at the three FLUX.1-dev 1024² shapes (single
block, double block image and text feed-forwards), with and without the LoRA slot's extras (the GELU output kept,
the preceding linear's bias and LoRA delta):
- the one-pass kernel for several `num_warps`;
- the two-pass kernel (`chunk` columns at a time) for several chunks and `num_warps`.
Each launch is timed from a CUDA graph of 20 launches, replayed (an eager `wrap_triton` launch costs more host time
than the text shape's kernel takes). Every configuration's outputs are checked equal, bit for bit, to the one-pass
kernel's at 8 warps (the package's until 2026-12-03), and that one and the launcher's default are compared with
torch's eager reference (`gelu_quant_reference`: the share of equal FP8 codes, scales and GELU outputs, and the
relative error of the dequantized output).

On the GPU machine: `python3 scripts/gpu/probe_gelu_quant_kernel.py $OUT/probe_gelu_quant_kernel.json`
"""

import json
import sys

import torch

sys.path.insert(0, ".")
from aotpack.models.fused_quant import FP8, _gelu_quant_triton, gelu_quant_reference  # noqa: E402

SHAPES = {  # name: (rows, prefix width, GELU width, calls per 1024² step)
    "single_block": (4608, 3072, 12288, 38),
    "double_block_image": (4096, 0, 12288, 19),
    "double_block_text": (512, 0, 12288, 19),
}
CONFIGS = [(0, w) for w in (4, 8, 16)] + [(c, w) for c in (1024, 2048, 4096) for w in (2, 4, 8)]  # chunk 0: one pass


def graph_ms(fn, launches=20, replays=20):
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays / launches


def bits(t):
    return t.view(torch.uint8) if t.dtype == FP8 else t


def against_torch(outputs, reference):
    (q, scale, h), (q_ref, scale_ref, h_ref) = outputs, reference
    dequant, dequant_ref = q.float() * scale, q_ref.float() * scale_ref
    return {"fp8_codes_equal": round((bits(q) == bits(q_ref)).float().mean().item(), 6),
            "scales_equal": round((scale == scale_ref).float().mean().item(), 6),
            "gelu_equal": round((h == h_ref).float().mean().item(), 6) if h.numel() else None,
            "rel_error": float((dequant - dequant_ref).norm() / dequant_ref.norm())}


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
            one_pass = _gelu_quant_triton(prefix, pre, bias, delta, slot, 8, chunk=0)
            reference = gelu_quant_reference(prefix, pre, bias, delta, slot)
            report["cases"].append({"shape": name, "slot": slot,
                                    "one_pass_vs_torch_eager": against_torch(one_pass, reference),
                                    "default_vs_torch_eager": against_torch(
                                        _gelu_quant_triton(prefix, pre, bias, delta, slot), reference)})
            print(json.dumps(report["cases"][-1]), flush=True)
            for chunk, num_warps in CONFIGS:
                def launch():
                    return _gelu_quant_triton(prefix, pre, bias, delta, slot, num_warps, chunk)
                try:
                    outputs = launch()
                    ms = graph_ms(launch)
                except Exception as err:  # a config that does not compile: record it and go on
                    report["cases"].append({"shape": name, "slot": slot, "chunk": chunk, "num_warps": num_warps,
                                            "error": str(err)[:300]})
                    continue
                same = all(torch.equal(bits(a), bits(b)) for a, b in zip(outputs, one_pass))
                case = {"shape": name, "slot": slot, "chunk": chunk, "num_warps": num_warps, "ms": round(ms, 4),
                        "GB_per_s": round((reads + writes) / ms / 1e6, 1), "ms_per_step": round(ms * per_step, 3),
                        "equal_to_one_pass_8_warps": same}
                report["cases"].append(case)
                print(json.dumps(case), flush=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
