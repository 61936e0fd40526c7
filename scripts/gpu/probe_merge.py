"""Where the merge's time goes (issue 11): each phase of `runtime.merge.fold_into` timed on FLUX.1-dev
block-linear shapes with random FP8 row-wise weights and a rank-64 LoRA, plus alternatives per phase.

Run on the GPU machine: `python3 scripts/gpu/probe_merge.py > $OUT/probe_merge.json` (about 1 minute).
Counts are FLUX.1-dev's 494 block linears: 19 double blocks (img+txt: q/k/v/out 3072x3072, ff
12288x3072 and 3072x12288, modulation 18432x3072), 38 single blocks (q/k/v 3072x3072, proj_mlp
12288x3072, proj_out 3072x15360, modulation 9216x3072).
"""

import json
import sys

import torch

sys.path.insert(0, ".")
from aotpack.bench.speed import requantization_matches_torchao
from aotpack.runtime.merge import _requantize_rows_into, fold_into

SHAPES = {(3072, 3072): 19 * 8 + 38 * 3, (12288, 3072): 19 * 2 + 38, (3072, 12288): 19 * 2, (3072, 15360): 38,
          (18432, 3072): 19 * 2, (9216, 3072): 38}  # the last two: the blocks' modulation linears
FP8 = torch.float8_e4m3fn


def timed(fn, repeats=5):
    for _ in range(2):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


class W:  # the attributes fold_into reads of a torchao Float8Tensor
    def __init__(self, out, inp):
        self.qdata = (torch.randn(out, inp, device="cuda") * 100).clamp(-448, 448).to(FP8)
        self.scale = torch.rand(out, 1, device="cuda") * 1e-4 + 1e-5
        self.dtype = torch.bfloat16


def _matches_torchao() -> dict:
    """The merge's row re-quantization vs torchao's `from_hp` on this GPU, bit for bit, per shape
    (rows with an outlier and a constant row included)."""
    result = {}
    for out, inp in SHAPES:
        value = (torch.randn(out, inp, device="cuda") * torch.logspace(-3, 3, out, device="cuda")[:, None])
        value = value.to(torch.bfloat16)
        value[5] = 0.5
        value[7, 3] = -1e4
        result[f"{out}x{inp}"] = requantization_matches_torchao(value, FP8)
    return result


def main():
    rows = {}
    totals = {}
    for (out, inp), count in SHAPES.items():
        w = W(out, inp)
        a = torch.randn(64, inp, device="cuda", dtype=torch.bfloat16) * 0.01
        b = torch.randn(out, 64, device="cuda", dtype=torch.bfloat16) * 0.01
        value = torch.empty(out, inp, device="cuda", dtype=torch.bfloat16)
        value32 = torch.empty(out, inp, device="cuda", dtype=torch.float32)
        keep = torch.empty_like(w.qdata)
        scale_bf16 = w.scale.to(torch.bfloat16)
        phases = {
            "fold_into (all)": lambda: fold_into(w, [(a, b, 1.0)]),
            "keep copy (fp8)": lambda: keep.copy_(w.qdata),
            "copy fp8->bf16": lambda: value.copy_(w.qdata),
            "mul_ fp32 scale (bf16 out)": lambda: value.mul_(w.scale),
            "addmm_ r64": lambda: value.addmm_(b, a),
            "vector_norm inf": lambda: torch.linalg.vector_norm(value, ord=float("inf"), dim=1, keepdim=True),
            "div -> fp8 out": lambda: torch.div(value, w.scale, out=w.qdata),
            "requantize (norm+div)": lambda: _requantize_rows_into(value, w.qdata, w.scale),
            # alternatives
            "alt: fp8->fp32 copy": lambda: value32.copy_(w.qdata),
            "alt: fp32 mul_ fp32": lambda: value32.mul_(w.scale),
            "alt: fp32->bf16 copy": lambda: value.copy_(value32),
            "alt: mul_ bf16 scale": lambda: value.mul_(scale_bf16),
            "alt: torch.mul(bf16, fp32, out=fp32)": lambda: torch.mul(value, w.scale, out=value32),
            "alt: fp32 div_ then to fp8": lambda: w.qdata.copy_(value32.div_(w.scale)),
            "alt: amax(abs)": lambda: value.abs().amax(dim=1, keepdim=True),
            "alt: aminmax": lambda: torch.aminmax(value, dim=1),
        }
        shape_rows = {name: timed(fn) for name, fn in phases.items()}
        rows[f"{out}x{inp} (x{count})"] = shape_rows
        for name, ms in shape_rows.items():
            totals[name] = totals.get(name, 0.0) + ms * count
        del w, value, value32, keep
        torch.cuda.empty_cache()
    equal = _matches_torchao()
    weights = sum(o * i * c for (o, i), c in SHAPES.items())
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "weights": weights,
                      "requantization_equals_torchao_from_hp": equal, "total_ms_all_layers": totals, "per_shape_ms": rows}, indent=1))


if __name__ == "__main__":
    main()
