"""`aotpack::lora_up` compiled by AOTInductor on the GPU: the kernel inside a program, against its reference.

A small program with the three group shapes of a Flux step (a lone slot, three slots, four slots; widths that are
multiples of the kernel's tile) is exported with a dynamic row count, compiled and packaged, then run twice at
1, 3, 600 and 4608 rows: each output against `lora_up_reference` (relative L2) and against the program's own second
run (bit for bit). The first form of the kernel failed exactly this inside a build (2026-12-05, H100: unwritten
outputs wherever a group had fewer than four slots); a full build takes minutes, this ~1 minute.

On the GPU machine: `source scripts/gpu/env.sh && python3 scripts/gpu/check_lora_up_aoti.py $OUT/lora_up_aoti.json`
"""

import json
import sys

import torch

from aotpack.models.lora_up import lora_up_reference

GROUPS = ((3072,), (256, 512, 768), (128, 128, 384, 256))
RANK = 64


class Program(torch.nn.Module):
    def forward(self, us, bs):
        return [torch.ops.aotpack.lora_up(u, list(b)) * 1.5 for u, b in zip(us, bs)]  # an epilogue to fuse with


def main(out_path: str) -> None:
    generator = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the reference: a smoke test of this script

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator) * std).to(torch.bfloat16).to(device)

    bs = [[rand(w, RANK, std=0.1) for w in widths] for widths in GROUPS]
    us = [rand(40, RANK * len(widths)) for widths in GROUPS]
    rows = torch.export.Dim("rows", min=1, max=8192)
    dynamic = ([{0: rows} for _ in GROUPS], [[None] * len(b) for b in bs])  # the row count; B's shapes are fixed
    exported = torch.export.export(Program(), (us, bs), dynamic_shapes=dynamic)
    path = torch._inductor.aoti_compile_and_package(exported, package_path="/tmp/lora_up_check.pt2")
    runner = torch._inductor.aoti_load_package(path)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "cases": []}
    for count in (1, 3, 600, 4608):
        inputs = [rand(count, RANK * len(widths)) for widths in GROUPS]
        first = runner(inputs, bs)
        second = runner(inputs, bs)
        for widths, u, b, got, again in zip(GROUPS, inputs, bs, first, second):
            want = lora_up_reference(u, b) * 1.5
            report["cases"].append({
                "rows": count, "widths": list(widths),
                "rel_error": float((got.float() - want.float()).norm() / want.float().norm()),
                "finite": bool(torch.isfinite(got).all()),
                "repeatable": bool(torch.equal(got, again))})
    report["passed"] = all(c["rel_error"] < 1e-2 and c["finite"] and c["repeatable"] for c in report["cases"])
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
