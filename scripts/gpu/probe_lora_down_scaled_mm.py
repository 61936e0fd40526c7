"""The LoRA down-projection after the MLP GELUs as a cuBLASLt FP8 GEMM, against today's Triton kernel.

`lora_down_from_fp8` (models/lora_down_fp8.py) computes `u = A x` from the GELU output's FP8 copy `q, scale` with a
split-K Triton kernel that converts each FP8 tile to bf16: 24.5 us a single-block call at 512² where cuBLAS reads a
bf16 copy (twice the bytes) in 15.7 (H200, 2026-12-04f), 1.14 ms of a 512² step in all (2026-12-07j). This probe
times the same product as `torch._scaled_mm(q, [A_hi; A_lo]^T)`: A split per rank row into an FP8 high part and the
FP8 rounding of the rest (each row its own scale, given as the GEMM's column scales, so the epilogue applies both),
out `[rows, 2R]` in bf16, and the up-projection reading it against `[B | B]` (so `B u_hi + B u_lo` needs no add).
Also the high part alone (N = R: A's own FP8 rounding in u) for its error, and the FP8-dot Triton kernel of
`probe_lora_down_fp8_dots.py` (2026-12-06d, which timed cuBLAS's halves as two float32 GEMMs) with A's halves given,
and since 2026-12-08 the packaged kernel's own FP8-dot form (`library_dots`: recipe lever `lora_down_fp8_dots`, at
the library's launch config). Per shape: us a call from CUDA graphs
(kernel_probe.graph_ms), down alone and down + up, and u's and the delta's relative error against float64 from the
same FP8 input. Per-step totals weight each shape by its calls (38 single blocks' `proj_out`, 19 double blocks'
image `ff.net.2`; the text stream's stays bf16).

On the GPU machine: `python3 scripts/gpu/probe_lora_down_scaled_mm.py $OUT/probe_lora_down_scaled_mm.json`
(PROBE_FP8_DOT_SWEEP=0: the FP8-dot kernel at its fixed launch configuration only, no sweep).
"""

import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
sys.path.insert(0, "scripts/gpu")
from aotpack.models import lora_down_fp8 as lever  # noqa: E402
from aotpack.models.examples import relative_error  # noqa: E402
from aotpack.models.fp8_attention import FP8, FP8_MAX  # noqa: E402

RANK, OUT_FEATURES = 64, 3072
SHAPES = {  # size: {name: (rows, K, calls per step)}
    512: {"single_proj_out": (1536, 15360, 38), "double_ff_out_image": (1024, 12288, 19)},
    1024: {"single_proj_out": (4608, 15360, 38), "double_ff_out_image": (4096, 12288, 19)},
}


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, K] float32 as FP8 codes and one float32 scale a row (x ~ codes * scale)."""
    scale = (x.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_dot_down(q, scale, a8, a_scale, block_m=128, block_k=128, per_slice=2048, num_warps=8, num_stages=3):
    """u [rows, R] in bf16 from `q, scale` and `[A_hi; A_lo]` (`lora_down_fp8.fp8_hi_lo_rows`) by the FP8-dot split-K
    kernel of `probe_lora_down_fp8_dots.py` (2026-12-06d), at today's kernel's launch configuration by default."""
    from probe_lora_down_fp8_dots import down_fp8_dots  # noqa: PLC0415  same folder; GPU only

    rank = a8.shape[0] // 2
    halves = (a8[:rank], a_scale[0, :rank, None], a8[rank:], a_scale[0, rank:, None].contiguous())
    return down_fp8_dots(q, scale, halves, block_m=block_m, block_k=block_k, per_slice=per_slice,
                         num_warps=num_warps, num_stages=num_stages)


SWEEP = {"block_m": (64, 128), "per_slice": (1024, 2048), "num_warps": (4, 8)}  # each a compile: kept small


def main(out_path: str) -> None:
    from kernel_probe import graph_ms, timed_sweep  # noqa: PLC0415  same folder; GPU only

    g = torch.Generator(device="cuda").manual_seed(0)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rank": RANK, "sizes": {}}
    for size, shapes in SHAPES.items():
        totals: dict[str, float] = {}
        rows_out = []
        for name, (rows, k, calls) in shapes.items():
            q, scale = fp8_rows(3 * torch.randn(rows, k, device="cuda", generator=g))
            a = (torch.randn(RANK, k, device="cuda", generator=g) * k**-0.5).to(torch.bfloat16)
            b = (torch.randn(OUT_FEATURES, RANK, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
            h = (q.float() * scale).to(torch.bfloat16)  # the bf16 copy today's GELU kernel no longer writes
            a8, a_scale = lever.fp8_hi_lo_rows(a)
            a_hi, a_hi_scale = a8[:RANK], a_scale[:, :RANK]
            b2 = torch.cat([b, b], dim=1)

            def triton_down():
                return lever._lora_down_fp8_triton(q, scale, a)

            def library_dots():  # recipe lever lora_down_fp8_dots: the packaged kernel's A_HALVES form, its config
                return lever._lora_down_fp8_triton(q, scale, a8, a_scale, torch.bfloat16)

            def scaled_hilo():
                return torch._scaled_mm(q, a8.t(), scale_a=scale, scale_b=a_scale, out_dtype=torch.bfloat16)

            def scaled_hi():
                return torch._scaled_mm(q, a_hi.t(), scale_a=scale, scale_b=a_hi_scale, out_dtype=torch.bfloat16)

            exact_u = (q.double() * scale.double()) @ a.double().t()
            exact_delta = exact_u @ b.double().t()
            u_hilo = scaled_hilo().double()
            u_hilo = u_hilo[:, :RANK] + u_hilo[:, RANK:]
            row = {"shape": name, "rows": rows, "k": k, "calls_per_step": calls,
                   "u_error": {"triton": relative_error(triton_down().double(), exact_u),
                               "fp8_dot": relative_error(fp8_dot_down(q, scale, a8, a_scale).double(), exact_u),
                               "library_dots": relative_error(library_dots().double(), exact_u),
                               "scaled_mm_hilo": relative_error(u_hilo, exact_u),
                               "scaled_mm_hi": relative_error(scaled_hi().double(), exact_u),
                               "cublas_bf16_input": relative_error(F.linear(h, a).double(), exact_u)},
                   "delta_error": {"triton": relative_error(F.linear(triton_down(), b).double(), exact_delta),
                                   "scaled_mm_hilo": relative_error(F.linear(scaled_hilo(), b2).double(),
                                                                    exact_delta)},
                   "us": {"triton_down": graph_ms(triton_down) * 1e3,
                          "scaled_mm_hilo_down": graph_ms(scaled_hilo) * 1e3,
                          "scaled_mm_hi_down": graph_ms(scaled_hi) * 1e3,
                          "cublas_bf16_down": graph_ms(lambda: F.linear(h, a)) * 1e3,
                          "fp8_dot_down": graph_ms(lambda: fp8_dot_down(q, scale, a8, a_scale)) * 1e3,
                          "library_dots_down": graph_ms(library_dots) * 1e3,
                          "triton_down_up": graph_ms(lambda: F.linear(triton_down(), b)) * 1e3,
                          "scaled_mm_hilo_down_up": graph_ms(lambda: F.linear(scaled_hilo(), b2)) * 1e3}}
            sweep = SWEEP if os.environ.get("PROBE_FP8_DOT_SWEEP", "1") == "1" else {}  # 0: the fixed config only
            _, timed = timed_sweep(sweep, lambda **config: fp8_dot_down(q, scale, a8, a_scale, **config))
            row["fp8_dot_sweep_best"] = timed[:4]
            if timed:
                row["us"]["fp8_dot_down_best"] = timed[0]["ms"] * 1e3
            for key, value in row["us"].items():
                totals[f"{key}_ms"] = totals.get(f"{key}_ms", 0.0) + calls * value / 1e3
            rows_out.append(row)
            print(json.dumps(row), flush=True)
        report["sizes"][size] = {"per_step_ms": totals, "shapes": rows_out}
        print(f"[{size}] per step: {json.dumps(totals)}", flush=True)
        with open(out_path, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
