"""Would the LoRA down-projection cost less as extra output rows of the FP8 base GEMM? (issue 11, slots at 0.86x)

In slots each block linear runs the FP8 base GEMM plus two bf16 GEMMs: the down-projection `u = x A^T` (one GEMM
for the slots that share an input since `group_lora_down`) and the up-projection `u B^T`. The base GEMM already
reads x quantized (row-wise FP8). Appending A's rows to the base weight's N computes u inside that GEMM:

    [y | u] = s_x [x_q] [W_q ; A_q]^T s_[w;a],   A_q row-wise, its own row scales beside W's

so the bound FP8 weight would need R spare rows that a switch rewrites in place (A quantized there), and u comes
out as R extra columns of the base output (read by the up GEMM with a leading dimension of N + R). What it would
cost: the base GEMM at N + R, the up GEMM from a strided u, and no down GEMM nor bf16 copy of x for it. This probe
times, per FLUX.1-dev input group at 1024² (512 text + 4096 image tokens), launches replayed from CUDA graphs:
the FP8 GEMM at N and at N + R (R = 64 per slot, the group's rows appended to one linear of it), today's bf16
down (grouped) and up GEMMs, the up GEMM from the strided u; sums them over a step and reports u's error
(FP8 vs today's bf16, both vs fp64).

On the GPU machine: `python3 scripts/gpu/probe_lora_nappend.py $OUT/lora_nappend.json`
"""

import json
import sys

import torch

# the K-append probe's helpers (this script runs from scripts/gpu/, which is then on sys.path)
from probe_lora_kappend import RANK, graph_ms, rel, rowwise, write_report

# Input groups of FLUX.1-dev at 1024²: (tokens, in, [out of each linear reading that input]) and count per step.
GROUPS = {
    "double image qkv": ((4096, 3072, [3072, 3072, 3072]), 19),
    "double image out": ((4096, 3072, [3072]), 19),
    "double image ff in": ((4096, 3072, [12288]), 19),
    "double image ff out": ((4096, 12288, [3072]), 19),
    "double text qkv": ((512, 3072, [3072, 3072, 3072]), 19),
    "double text out": ((512, 3072, [3072]), 19),
    "double text ff in": ((512, 3072, [12288]), 19),
    "double text ff out": ((512, 12288, [3072]), 19),
    "single qkv mlp": ((4608, 3072, [3072, 3072, 3072, 12288]), 38),
    "single out": ((4608, 15360, [3072]), 38),
}


def fp8_gemm_ms(x_q, s_x, rows: int, k: int, generator) -> float:
    w = (torch.randn(rows, k, device="cuda", generator=generator) * k ** -0.5).bfloat16()
    w_q, s_w = rowwise(w)
    w_t, s_w_row = w_q.t(), s_w.t().contiguous()
    return graph_ms(lambda: torch._scaled_mm(x_q, w_t, scale_a=s_x, scale_b=s_w_row, out_dtype=torch.bfloat16))


def probe(tokens: int, k: int, outs: list[int], generator: torch.Generator) -> dict:
    dev = "cuda"
    r_group = RANK * len(outs)
    x = torch.randn(tokens, k, device=dev, generator=generator).bfloat16()
    a = (torch.randn(r_group, k, device=dev, generator=generator) * k ** -0.5).bfloat16()
    x_q, s_x = rowwise(x)
    a_q, s_a = rowwise(a)
    base = [fp8_gemm_ms(x_q, s_x, n, k, generator) for n in outs]
    # The group's rows on one linear (each choice), or 64 rows on each of its linears.
    on_one = [fp8_gemm_ms(x_q, s_x, n + r_group, k, generator) - t for n, t in zip(outs, base)]
    on_each = sum(fp8_gemm_ms(x_q, s_x, n + RANK, k, generator) - t for n, t in zip(outs, base))
    up_contiguous, up_strided = 0.0, 0.0
    for n in outs:
        b = (torch.randn(n, RANK, device=dev, generator=generator) * RANK ** -0.5).bfloat16()
        u = torch.randn(tokens, RANK, device=dev, generator=generator).bfloat16()
        wide = torch.randn(tokens, n + RANK, device=dev, generator=generator).bfloat16()
        u_strided = wide[:, n:]
        up_contiguous += graph_ms(lambda: u @ b.t())
        up_strided += graph_ms(lambda: u_strided @ b.t())
    u_ref = x.double() @ a.double().t()
    u_fp8 = (x_q.double() * s_x.double()) @ (a_q.double() * s_a.double()).t()
    return {
        "fp8_gemm_ms": sum(base),
        "extra_rows_on_one_ms": [round(v, 4) for v in on_one],
        "extra_best_on_one_ms": min(on_one),
        "extra_rows_on_each_ms": on_each,
        "down_bf16_grouped_ms": graph_ms(lambda: x @ a.t()),
        "up_bf16_ms": up_contiguous,
        "up_bf16_strided_ms": up_strided,
        "u_error_bf16": rel((x @ a.t()).double(), u_ref),
        "u_error_fp8": rel(u_fp8, u_ref),
    }


def main(out_path: str) -> None:
    generator = torch.Generator("cuda").manual_seed(0)
    rows, totals = [], {}
    for name, ((tokens, k, outs), count) in GROUPS.items():
        r = probe(tokens, k, outs, generator)
        r.update(group=name, tokens=tokens, k=k, outs=outs, count=count)
        rows.append(r)
        for key, value in r.items():
            if key.endswith("_ms") and isinstance(value, float):
                totals[key] = totals.get(key, 0.0) + count * value
        print(json.dumps({key: round(v, 4) if isinstance(v, float) else v for key, v in r.items()}))
    step = {key: round(v, 2) for key, v in totals.items()}
    step["today_lora_gemms_ms"] = round(totals["down_bf16_grouped_ms"] + totals["up_bf16_ms"], 2)
    extra = min(totals["extra_best_on_one_ms"], totals["extra_rows_on_each_ms"])
    step["nappend_lora_gemms_ms"] = round(extra + totals["up_bf16_strided_ms"], 2)
    write_report(out_path, "per_group", rows, step)


if __name__ == "__main__":
    main(sys.argv[1])
