"""Would a Triton LoRA up-projection, grouped over the slots that share an input, beat cuBLAS? (issue 11, slots)

In slots every block linear adds `u B^T` (K = rank = 64) to its base output. cuBLAS runs each as its own bf16 GEMM
(with a memset before the cooperative kernels), 418 launches a step; their output, 13.4 GB a 1024² step at
FLUX.1-dev's widths, is the least they must write (~2.8 ms at 4.8 TB/s). The down-projections of slots sharing an
input already run grouped (`builder/lora_grouping.py`), so their `u` lies side by side: `[u_q | u_k | u_v]`.
One kernel writes every up-projection of such a group (`aotpack/models/lora_up.py`, recipe lever `group_lora_up`):
output column tile n of slot j reads `u[:, j R:(j + 1) R]` and B_j's rows, one `tl.dot` (K = R), one store.

This probe times, per group shape of a FLUX.1-dev step (1024² and 512², 512 text tokens): cuBLAS one GEMM per
slot (as the programs run today), and the Triton kernel per slot and grouped at a few tile configurations; launches
replayed from CUDA graphs. It sums them over a step's groups and checks each result against float64.

On the GPU machine: `python3 scripts/gpu/probe_lora_up.py $OUT/lora_up.json` (after `source scripts/gpu/env.sh`)
"""

import json
import sys
from collections import Counter

import torch
import triton
from probe_lora_kappend import graph_ms

from aotpack.models.lora_up import _lora_up_triton

RANK = 64


def step_groups(image_tokens: int, text_tokens: int = 512) -> Counter:
    """{(tokens, (out widths of slots sharing an input)): count per step} for FLUX.1-dev (19 double, 38 single)."""
    joint = image_tokens + text_tokens
    groups = Counter()
    for tokens in (image_tokens, text_tokens):  # a double block's image and text streams
        groups[(tokens, (3072, 3072, 3072))] += 19  # q, k, v
        groups[(tokens, (3072,))] += 19 * 2  # attention out, ff out
        groups[(tokens, (12288,))] += 19  # ff in
    groups[(joint, (3072, 3072, 3072, 12288))] += 38  # single: q, k, v, mlp in
    groups[(joint, (3072,))] += 38  # single: out
    return groups


# One K step (K = R), so pipeline stages do not matter; tiles and warps do.
CONFIGS = [(bm, bn, w) for bm in (64, 128) for bn in (64, 128, 256) for w in (4, 8)]


def probe(tokens: int, widths: tuple, generator: torch.Generator) -> dict:
    dev = "cuda"
    u = torch.randn(tokens, RANK * len(widths), device=dev, generator=generator).bfloat16()
    bs = [(torch.randn(w, RANK, device=dev, generator=generator) * 0.1).bfloat16() for w in widths]
    parts = [u[:, j * RANK:(j + 1) * RANK] for j in range(len(widths))]  # views, as the grouped down leaves them
    reference = torch.cat([p.double() @ b.double().t() for p, b in zip(parts, bs)], 1)
    scale = float(reference.norm())

    def error(out):
        return float((out.double() - reference).norm()) / scale

    result = {"tokens": tokens, "widths": list(widths), "bytes_out": tokens * sum(widths) * 2,
              "cublas_per_slot_ms": graph_ms(lambda: [p @ b.t() for p, b in zip(parts, bs)]),
              "cublas_error": error(torch.cat([p @ b.t() for p, b in zip(parts, bs)], 1))}
    best = None
    for bm, bn, w in CONFIGS:
        try:
            out = _lora_up_triton(u, bs, block_m=bm, block_n=bn, num_warps=w)
        except Exception as err:  # noqa: BLE001 - a config Triton cannot build is skipped, and said
            result.setdefault("failed_configs", []).append([bm, bn, w, type(err).__name__])
            continue
        ms = graph_ms(lambda: _lora_up_triton(u, bs, block_m=bm, block_n=bn, num_warps=w))
        if best is None or ms < best["ms"]:
            best = {"ms": ms, "config": [bm, bn, w], "error": error(out)}
    result["triton_grouped"] = best
    if len(widths) > 1:
        bm, bn, w = best["config"]
        singles = [(p.contiguous(), b) for p, b in zip(parts, bs)]
        result["triton_per_slot_ms"] = graph_ms(
            lambda: [_lora_up_triton(p, [b], block_m=bm, block_n=bn, num_warps=w) for p, b in singles])
    return result


def main(out_path: str) -> None:
    generator = torch.Generator("cuda").manual_seed(0)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "rank": RANK, "sizes": {}}
    for size, image_tokens in ((1024, 4096), (512, 1024)):
        rows, cublas, grouped = [], 0.0, 0.0
        for (tokens, widths), count in step_groups(image_tokens).items():
            r = probe(tokens, widths, generator)
            r["count"] = count
            rows.append(r)
            cublas += count * r["cublas_per_slot_ms"]
            grouped += count * r["triton_grouped"]["ms"]
            print(size, json.dumps(r))
        written = sum(r["count"] * r["bytes_out"] for r in rows)
        report["sizes"][size] = {"groups": rows, "per_step_ms": {
            "cublas_per_slot": round(cublas, 3), "triton_grouped": round(grouped, 3),
            "bytes_written_gb": round(written / 1e9, 2),
            "cublas_tb_per_s": round(written / cublas / 1e9, 2), "triton_tb_per_s": round(written / grouped / 1e9, 2)}}
        print(size, json.dumps(report["sizes"][size]["per_step_ms"]))
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
