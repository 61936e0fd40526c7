"""Would the FP8 base GEMMs cost less grouped? (issue 11: 512² slots at 0.86x of the recipe's kernel time)

A FLUX double block runs every linear twice, once on the image rows and once on the text rows (512 for a batch-1
prompt), with weights of the same shape: two cuBLASLt launches, the text one at M = 512, where a Hopper GEMM fills
few of its 132 SMs. `torch._scaled_grouped_mm` (row-wise FP8, in AOTInductor's C shim since torch 2.10) runs both
in one launch over the stacked rows [image; text] against the two weights stacked [2, N, K]. The single blocks'
q, k, v and MLP-in linears read one input: one GEMM at N = 21504 over their concatenated weights replaces four
(and one at N = 9216 the three q, k, v GEMMs of each double-block stream).
Either would need the runtime to bind weights as slices of one buffer (a merge keeps working in place on them).
Not counted here: a joined GEMM's outputs are column slices of one output, which the kernels after it (q/k norm +
RoPE, the GELU) would read with a row stride of the joined width, or copy.

This probe times, from CUDA graphs, each FLUX.1-dev linear pair as today's two row-wise `_scaled_mm` calls (fast
accumulation, as torchao's FP8 linears run) against one grouped call, and the GEMMs that share an input against one
over their concatenated weights, at 512², 1024² and 2048² (image tokens 1024 / 4096 / 16384, text 512), summed over
a step (19 double, 38 single blocks), with the grouped outputs' difference from the separate ones.

On the GPU machine: `python3 scripts/gpu/probe_grouped_gemm.py $OUT/grouped_gemm.json`
"""

import json
import sys

import torch

# the K-append probe's helpers (this script runs from scripts/gpu/, which is then on sys.path)
from probe_lora_kappend import graph_ms, rel, rowwise

WIDTH, MLP, TEXT = 3072, 12288, 512
DOUBLE, SINGLE = 19, 38
# a double block's linear pairs, image and text: (in, out, pairs of that shape in a block): q/k/v, out, ff in, ff out
PAIRS = {"qkv (each of 3)": (WIDTH, WIDTH, 3), "attention out": (WIDTH, WIDTH, 1), "ff in": (WIDTH, MLP, 1),
         "ff out": (MLP, WIDTH, 1)}


def weight(n: int, k: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = (torch.randn(n, k, device="cuda", generator=generator) * k ** -0.5).bfloat16()
    w_q, s_w = rowwise(w)
    return w_q, s_w.t().contiguous()  # (n, k) FP8, (1, n) scales: nothing left to copy inside the timed graphs


def mm(x_q, s_x, w_q, s_w_row):
    return torch._scaled_mm(x_q, w_q.t(), scale_a=s_x, scale_b=s_w_row, out_dtype=torch.bfloat16,
                            use_fast_accum=True)


def pair(image_rows: int, k: int, n: int, generator) -> dict:
    x = torch.randn(image_rows + TEXT, k, device="cuda", generator=generator).bfloat16()
    x_q, s_x = rowwise(x)
    (wi, si), (wt, st) = weight(n, k, generator), weight(n, k, generator)
    image_x, text_x = (x_q[:image_rows], s_x[:image_rows]), (x_q[image_rows:], s_x[image_rows:])
    separate_ms = graph_ms(lambda: (mm(*image_x, wi, si), mm(*text_x, wt, st)))
    row = {"image_rows": image_rows, "k": k, "n": n, "separate_ms": separate_ms,
           "image_alone_ms": graph_ms(lambda: mm(*image_x, wi, si)),
           "text_alone_ms": graph_ms(lambda: mm(*text_x, wt, st))}
    stacked = torch.stack([wi, wt])  # [2, n, k]: each weight a contiguous slice, as a bound buffer would hold them
    stacked_t = stacked.transpose(-2, -1)  # [2, k, n], column-major as the grouped kernel wants
    scales_b = torch.cat([si, st])  # [2, n]
    scales_a = s_x.reshape(-1).contiguous()
    offs = torch.tensor([image_rows, image_rows + TEXT], device="cuda", dtype=torch.int32)
    reference = torch.cat([mm(*image_x, wi, si), mm(*text_x, wt, st)]).float()
    for accum in (True, False):
        key = "grouped_fast_ms" if accum else "grouped_ms"
        try:
            fn = lambda: torch._scaled_grouped_mm(x_q, stacked_t, scales_a, scales_b, offs=offs,
                                                 out_dtype=torch.bfloat16, use_fast_accum=accum)
            grouped = fn()
            row[key] = graph_ms(fn)
            row[key.replace("_ms", "_vs_separate")] = rel(grouped.float(), reference)
        except Exception as err:  # what the op refuses here is the finding
            row[key.replace("_ms", "_error")] = f"{type(err).__name__}: {str(err)[:300]}"
    return row


def concatenated(rows: int, outs: tuple[int, ...], generator) -> dict:
    """The linears reading one input (`outs`: their widths) as one GEMM each, against one GEMM over their weights
    concatenated along N."""
    x = torch.randn(rows, WIDTH, device="cuda", generator=generator).bfloat16()
    x_q, s_x = rowwise(x)
    weights = [weight(n, WIDTH, generator) for n in outs]
    joined = (torch.cat([w for w, _ in weights]), torch.cat([s for _, s in weights], dim=1))
    return {"rows": rows, "outs": list(outs),
            "separate_ms": graph_ms(lambda: [mm(x_q, s_x, w, s) for w, s in weights]),
            "concatenated_ms": graph_ms(lambda: mm(x_q, s_x, *joined))}


def main(out_path: str) -> None:
    generator = torch.Generator("cuda").manual_seed(0)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "sizes": {}}
    for size in (512, 1024, 2048):
        image_rows = (size // 16) ** 2
        rows = {label: pair(image_rows, k, n, generator) for label, (k, n, _) in PAIRS.items()}
        # the single blocks' q, k, v and MLP in; the double blocks' q, k, v of each stream
        joins = {"single qkv mlp": (concatenated(image_rows + TEXT, (WIDTH,) * 3 + (MLP,), generator), SINGLE),
                 "double image qkv": (concatenated(image_rows, (WIDTH,) * 3, generator), DOUBLE),
                 "double text qkv": (concatenated(TEXT, (WIDTH,) * 3, generator), DOUBLE)}
        step = {}
        for key in ("separate_ms", "grouped_fast_ms", "grouped_ms"):
            if all(key in row for row in rows.values()):
                step[key] = DOUBLE * sum(rows[label][key] * count for label, (_, _, count) in PAIRS.items())
        for label, (row, count) in joins.items():
            step[f"{label}: separate_ms"] = count * row["separate_ms"]
            step[f"{label}: concatenated_ms"] = count * row["concatenated_ms"]
        report["sizes"][size] = {"pairs": rows, "concatenated": {label: row for label, (row, _) in joins.items()},
                                 "per_step_ms": step}
        print(size, json.dumps(step), flush=True)
        for label, row in rows.items():
            print(" ", label, json.dumps(row), flush=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
