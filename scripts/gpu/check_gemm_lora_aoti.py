"""`aotpack::fp8_linear_lora` compiled by AOTInductor on the GPU: the kernel inside a program, against its reference.

A small program with two Flux linears (3072 -> 3072 with bias, 3072 -> 12288 without; rank 64) is exported with a
dynamic row count, its LoRA `u` taken as a column view of a grouped down-projection (as `group_lora_down` leaves it),
compiled and packaged, then run twice at 1, 3, 600 and 4608 rows: each output against `gemm_lora.reference` (relative
L2) and against the program's own second run (bit for bit). Device-made TMA descriptors need scratch memory that
AOTInductor allocates for the kernel, one slot a program (torch 2.11 allocated one slot in all and the first launch
gave NaN: `aotpack/builder/aoti_scratch.py` compiles it as the build does); a full build takes minutes, this one.

On the GPU machine: `source scripts/gpu/env.sh && python3 scripts/gpu/check_gemm_lora_aoti.py $OUT/gemm_lora_aoti.json`
"""

import json
import os
import sys
import zipfile

import torch

from aotpack.builder.aoti_scratch import scratch_for_every_program
from aotpack.models import gemm_lora

RANK = 64
# (k, n, bias) per slot, and whether u is made contiguous before the op; the first is the check, the others (with
# VARIANTS=1) tell apart where a failing program parts: the bias, u's column view, which slot
VARIANTS = {"check": (((3072, 3072, True), (3072, 12288, False)), False),
            "contiguous_u": (((3072, 3072, True), (3072, 12288, False)), True),
            "no_bias": (((3072, 3072, False), (3072, 12288, False)), False),
            "bias_second": (((3072, 3072, False), (3072, 12288, True)), False)}


class Program(torch.nn.Module):
    def __init__(self, contiguous_u: bool):
        super().__init__()
        self.contiguous_u = contiguous_u

    def forward(self, x, q, q_scale, a, weights, weight_scales, biases, bs):
        u_all = torch.nn.functional.linear(x, a)  # both slots' down-projections in one GEMM, split by rank
        outs = []
        for i, (w, ws, bias, b) in enumerate(zip(weights, weight_scales, biases, bs)):
            u = u_all[..., i * RANK:(i + 1) * RANK]
            u = u.contiguous() if self.contiguous_u else u
            outs.append(torch.ops.aotpack.fp8_linear_lora(q, q_scale, w, ws, bias, u, b, True) * 1.5)
        return outs


def main(out_path: str) -> None:
    names = list(VARIANTS) if os.environ.get("VARIANTS") == "1" else ["check"]
    reports = {name: check(*VARIANTS[name], name) for name in names}
    report = reports["check"] if len(reports) == 1 else {"variants": reports,
                                                         "passed": all(r["passed"] for r in reports.values())}
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report))
    sys.exit(0 if report["passed"] else 1)


def check(shapes, contiguous_u: bool, name: str) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the reference: a smoke test of this script

    def inputs(rows, seed=0):
        q, q_scale, *_ = gemm_lora.example_inputs(rows, 3072, 16, RANK, device=device, seed=seed)
        x = torch.randn(rows, 3072, generator=torch.Generator().manual_seed(seed)).to(device, torch.bfloat16)
        return x, q, q_scale

    generator = torch.Generator().manual_seed(1)
    weights, weight_scales, biases, bs = [], [], [], []
    for k, n, has_bias in shapes:
        _, _, w, ws, bias, _, b = gemm_lora.example_inputs(4, k, n, RANK, device=device, seed=n)
        weights.append(w)
        weight_scales.append(ws)
        biases.append(bias if has_bias else bias[:0])
        bs.append(b)
    a = (torch.randn(RANK * len(shapes), 3072, generator=generator) * 3072 ** -0.5).to(device, torch.bfloat16)
    rows = torch.export.Dim("rows", min=1, max=8192)
    static = [None] * len(shapes)
    dynamic = ({0: rows}, {0: rows}, {0: rows}, None, static, static, static, static)
    exported = torch.export.export(Program(contiguous_u), (*inputs(40), a, weights, weight_scales, biases, bs),
                                   dynamic_shapes=dynamic)
    targets = [str(n.target) for n in exported.graph.nodes]
    with scratch_for_every_program():  # as the build compiles (aotpack/builder/aoti_scratch.py)
        path = torch._inductor.aoti_compile_and_package(exported, package_path=f"/tmp/gemm_lora_{name}.pt2")
    if os.environ.get("OUT") and device == "cuda":  # the generated wrapper, to read how the kernel is launched
        with zipfile.ZipFile(path) as package:
            for member in package.namelist():
                if member.endswith(".cpp") and "wrapper" in member or member.endswith(".wrapper.cpp"):
                    with open(os.path.join(os.environ["OUT"], f"{name}-wrapper.cpp"), "wb") as f:
                        f.write(package.read(member))
    runner = torch._inductor.aoti_load_package(path)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "op_nodes": targets.count("aotpack.fp8_linear_lora.default"), "cases": []}
    for count in (1, 3, 600, 4608):
        x, q, q_scale = inputs(count, seed=count)
        args = (x, q, q_scale, a, weights, weight_scales, biases, bs)
        first, second = runner(*args), runner(*args)
        u_all = torch.nn.functional.linear(x, a)
        for i, ((k, n, _), got, again) in enumerate(zip(shapes, first, second)):
            u = u_all[:, i * RANK:(i + 1) * RANK]
            want = gemm_lora.reference(q, q_scale, weights[i], weight_scales[i], biases[i], u, bs[i], True) * 1.5
            report["cases"].append({
                "rows": count, "k": k, "n": n,
                "rel_error": float((got.float() - want.float()).norm() / want.float().norm()),
                "finite": bool(torch.isfinite(got).all()),
                "repeatable": bool(torch.equal(got, again))})
    report["passed"] = report["op_nodes"] == len(shapes) and all(
        c["rel_error"] < 1e-2 and c["finite"] and c["repeatable"] for c in report["cases"])
    return report


if __name__ == "__main__":
    main(sys.argv[1])
