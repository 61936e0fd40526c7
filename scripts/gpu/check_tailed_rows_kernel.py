"""Does `aotpack::tailed_rows`' Triton kernel write what its torch reference writes, and how long does it take?

`aotpack/models/lora_tails.py`: one launch per group of linears that read one input writes each reader's rows
`[q / H | u_hi | u_lo | u_hi | 0]`, each row's H chosen from the readers' u (`row_headroom`). The 2026-12-07d probe
(`probe_tails_block.py`) counted the tails' gain with the first reader's rows free (its quantization kernel would write
them) plus 2.7-4.9 us of tail writer and the other readers' copies; this kernel writes every reader's rows from `q`, so its time against those pieces is the check.
Random inputs at FLUX.1-dev's shapes; bit-equality per shape, then us a call from CUDA graphs; for groups of an even
number of readers the paired layout too (`[tail_a | q / H | tail_b]` a pair, recipe lever `lora_tails_paired`).

On the GPU machine: `python3 scripts/gpu/check_tailed_rows_kernel.py $OUT/tailed_rows.json`
"""

import json
import sys

import torch

sys.path.insert(0, ".")
sys.path.insert(0, "scripts/gpu")
from probe_lora_kappend import graph_ms  # noqa: E402

from aotpack.models.fused_quant import quantize_rows  # noqa: E402
from aotpack.models.lora_tails import MIN_HEADROOM, TAIL_RANK, tailed_rows_reference  # noqa: E402

# (group, tokens, K, readers)
SHAPES = (("single q/k/v/MLP-in 1024²", 4608, 3072, 4), ("single q/k/v/MLP-in 512²", 1536, 3072, 4),
          ("double MLP-in image 1024²", 4096, 3072, 1), ("double MLP-in text", 512, 3072, 1),
          ("single proj_out 1024²", 4608, 15360, 1), ("double MLP-out image 1024²", 4096, 12288, 1))


def main(out_path):
    generator = torch.Generator("cuda").manual_seed(0)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": []}
    for name, tokens, k, readers in SHAPES:
        x = torch.randn(tokens, k, device="cuda", generator=generator).bfloat16()
        q, s_x = quantize_rows(x)
        # magnitudes over 12 decades across rows: most rows keep H = 1, the larger ones take their own headroom
        order = torch.randperm(tokens, device="cuda", generator=generator)
        spread = torch.logspace(-6, 6, tokens, device="cuda")[order]
        u = (torch.randn(tokens, readers * TAIL_RANK, device="cuda", generator=generator) * spread[:, None]).bfloat16()
        factors = torch.rand(readers, device="cuda", generator=generator) + 0.25
        rows, row_scale = torch.ops.aotpack.tailed_rows(q, s_x, u, factors, MIN_HEADROOM)
        expected_rows, expected_scale = tailed_rows_reference(q, s_x, u, factors, MIN_HEADROOM)
        # no factors (as the programs call it since 2026-12-08: every c is 1, no fill kernel)
        no_factors = torch.empty(0, device="cuda")
        rows_1, scale_1 = torch.ops.aotpack.tailed_rows(q, s_x, u, no_factors, MIN_HEADROOM)
        expected_1 = tailed_rows_reference(q, s_x, u, torch.ones(readers, device="cuda"), MIN_HEADROOM)
        row = {"group": name, "tokens": tokens, "k": k, "readers": readers,
               "bit_equal": torch.equal(rows.view(torch.uint8), expected_rows.view(torch.uint8)),
               "bit_equal_without_factors": (torch.equal(rows_1.view(torch.uint8), expected_1[0].view(torch.uint8))
                                             and torch.equal(scale_1, expected_1[1])),
               "scale_equal": torch.equal(row_scale, expected_scale),
               "rows_with_headroom": int((row_scale > s_x).sum()),
               "differing_bytes": int((rows.view(torch.uint8) != expected_rows.view(torch.uint8)).sum()),
               "us": 1000 * graph_ms(lambda: torch.ops.aotpack.tailed_rows(q, s_x, u, factors, MIN_HEADROOM))}
        moved = q.numel() + readers * rows[0].numel() + u.numel() * 2
        row["tb_per_s"] = moved / (row["us"] * 1e-6) / 1e12
        if readers % 2 == 0:  # recipe lever lora_tails_paired: one `[tail_a | q / H | tail_b]` buffer a pair
            pairs, pairs_scale = torch.ops.aotpack.tailed_rows(q, s_x, u, no_factors, MIN_HEADROOM, True)
            expected_pairs = tailed_rows_reference(q, s_x, u, no_factors, MIN_HEADROOM, True)
            row["bit_equal_paired"] = (torch.equal(pairs.view(torch.uint8), expected_pairs[0].view(torch.uint8))
                                       and torch.equal(pairs_scale, expected_pairs[1]))
            row["us_paired"] = 1000 * graph_ms(
                lambda: torch.ops.aotpack.tailed_rows(q, s_x, u, no_factors, MIN_HEADROOM, True))
        report["shapes"].append(row)
        print(json.dumps(row), flush=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
