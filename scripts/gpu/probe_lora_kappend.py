"""Would the LoRA branch cost less with its rank appended to the FP8 GEMM's K? (issue 11, slots at 0.88x)

In slots each block linear runs the FP8 base GEMM plus two bf16 GEMMs, `u = x A^T` (down, N = R) and `u B^T`
(up, K = R), whose output is added to the base's (11.5 ms of cuBLAS per step at 1024², r64 on all 494 block
linears, H200). Appending the rank to K computes the up-projection inside the base GEMM:

    y = s_x s_w [x_q | u_q] [W_q | B_q]^T,   u_q = quant(u / s_x),  B_q[n] = quant(B[n] / s_w[n])

(one row scale for `[x | u]`, taken over both; `B` quantized against W's own row scales, so the bound FP8 weight
needs R spare columns that a switch rewrites in place). What it would cost: the down GEMM as today, the base GEMM
with K + R, and no up GEMM nor delta add. This probe times, per FLUX.1-dev linear shape at 1024² (512 text +
4096 image tokens): the FP8 GEMM at K and K + R, the bf16 down and up GEMMs, the FP8 down GEMM (from the
already quantized x), and the quantization of x alone vs of `[x | u]`; launches replayed from CUDA graphs.
It sums them over a step's linears and reports the LoRA delta's error (vs fp32) both ways.

2026-12-02 (H200) it measured K + 64 at +6.9 ms a step against 5.9 ms of up GEMMs saved, and a 15-44% delta error
(B clamped to W's row range). Since 2026-12-05 it also times what would fix both: fast accumulation, as the
packages' GEMMs run, and three FP8 tails (`three_tails`: bf16's precision on the CPU, K + 3R zero-padded to a
multiple of 128 so cuBLAS keeps an aligned K) against the fast GEMM + the bf16 up GEMM; `three_tails_saves_ms`
is the per-step difference (positive: the tails would pay, before their small quantization kernel).

On the GPU machine: `python3 scripts/gpu/probe_lora_kappend.py $OUT/lora_kappend.json`
"""

import json
import sys

import torch

RANK = 64
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
# (tokens, in, out): count of such linears per step of FLUX.1-dev at 1024² (19 double blocks, 38 single).
SHAPES = {
    (4096, 3072, 3072): 19 * 4,   # double: image q, k, v, out
    (4096, 3072, 12288): 19,      # double: image feed-forward in
    (4096, 12288, 3072): 19,      # double: image feed-forward out
    (512, 3072, 3072): 19 * 4,    # double: text q, k, v, out
    (512, 3072, 12288): 19,
    (512, 12288, 3072): 19,
    (4608, 3072, 3072): 38 * 3,   # single: q, k, v
    (4608, 3072, 12288): 38,      # single: mlp in
    (4608, 15360, 3072): 38,      # single: out (attention + mlp concatenated)
}


def rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def graph_ms(fn, calls: int = 20, replays: int = 10) -> float:
    """Median ms per call of `fn`, launched `calls` times inside one CUDA graph, replayed `replays` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def rel(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm())


def three_tails(x, u, b, w_q, s_w, pad_to: int = 1):
    """`[x | u]` and `[W | B]` for one FP8 GEMM whose LoRA delta keeps bf16's precision (CPU study, 2026-12-05:
    0.35% relative error against 0.37% for today's bf16 slots, one FP8 tail 3.7%): u and B each split into an FP8
    high part and the FP8 rounding of the rest, K grows by 3R: `[x_q | u_hi | u_lo | u_hi]` against
    `[W_q | B_hi | B_hi | B_lo]` (the lo x lo term, ~2^-8 of the delta, left out). B is scaled by one factor c per
    linear, the largest that keeps every `c B[n] / s_w[n]` in FP8's range; a row of x whose `u / c` would overflow
    widens its own scale (its base product loses a little precision, never the range). K is zero-padded to a
    multiple of `pad_to`."""
    s_x = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    c = (s_w * FP8_MAX / b.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)).min()
    s = s_x * (u.abs().amax(dim=-1, keepdim=True).float() / (c * s_x * FP8_MAX)).clamp(min=1)
    u_scaled, b_scaled = u.float() / (s * c), b.float() * c / s_w
    u_hi, b_hi = u_scaled.to(FP8), b_scaled.to(FP8)
    u_lo, b_lo = (u_scaled - u_hi.float()).to(FP8), (b_scaled - b_hi.float()).to(FP8)
    x_q = (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    k = x.shape[-1] + 3 * u.shape[-1]
    pad = -k % pad_to
    xs = torch.cat([x_q, u_hi, u_lo, u_hi, torch.zeros(x.shape[0], pad, device=x.device, dtype=FP8)], dim=-1)
    ws = torch.cat([w_q, b_hi, b_hi, b_lo, torch.zeros(w_q.shape[0], pad, device=x.device, dtype=FP8)], dim=-1)
    return xs.contiguous(), s, ws.contiguous()


def random_layer(tokens: int, k: int, n: int, generator: torch.Generator):
    """bf16 x [tokens, k], W [n, k], a rank-RANK LoRA's A and B, on the GPU (B moves the output by ~30%)."""
    dev = "cuda"
    x = torch.randn(tokens, k, device=dev, generator=generator).bfloat16()
    w = (torch.randn(n, k, device=dev, generator=generator) * k ** -0.5).bfloat16()
    a = (torch.randn(RANK, k, device=dev, generator=generator) * k ** -0.5).bfloat16()
    b = (torch.randn(n, RANK, device=dev, generator=generator) * (0.3 * RANK ** -0.5)).bfloat16()
    return x, w, a, b


def probe(tokens: int, k: int, n: int, generator: torch.Generator) -> dict:
    x, w, a, b = random_layer(tokens, k, n, generator)
    x_q, s_x = rowwise(x)
    w_q, s_w = rowwise(w)
    a_q, s_a = rowwise(a)
    u = x @ a.t()
    xu = torch.cat([x.float(), u.float()], dim=-1)
    xu_q, s_xu = rowwise(xu)
    # B against W's row scales (clamped where a B row outgrows its W row), R spare columns beside W.
    b_q = (b.float() / s_w).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    wb_q = torch.cat([w_q, b_q], dim=1).contiguous()
    w_t, wb_t, a_t = w_q.t(), wb_q.t(), a_q.t()
    s_w_row, s_a_row = s_w.t().contiguous(), s_a.t().contiguous()

    def base():
        return torch._scaled_mm(x_q, w_t, scale_a=s_x, scale_b=s_w_row, out_dtype=torch.bfloat16)

    def appended():
        return torch._scaled_mm(xu_q, wb_t, scale_a=s_xu, scale_b=s_w_row, out_dtype=torch.bfloat16)

    # Fast accumulation, as the packages' GEMMs run (torchao's default); three tails at K + 3R, as is and padded.
    xt_q, s_xt, wt_q = three_tails(x, u, b, w_q, s_w)
    xp_q, s_xp, wp_q = three_tails(x, u, b, w_q, s_w, pad_to=128)

    def fast(a_q, s_a, b_q):
        return torch._scaled_mm(a_q, b_q.t(), scale_a=s_a, scale_b=s_w_row, out_dtype=torch.bfloat16,
                                use_fast_accum=True)

    result = {
        "fp8_gemm_fast_ms": graph_ms(lambda: fast(x_q, s_x, w_q)),
        "fp8_gemm_fast_plus_up_ms": graph_ms(lambda: (fast(x_q, s_x, w_q), u @ b.t())),
        "fp8_gemm_fast_k_plus_3r_ms": graph_ms(lambda: fast(xt_q, s_xt, wt_q)),
        "fp8_gemm_fast_k_plus_3r_padded_ms": graph_ms(lambda: fast(xp_q, s_xp, wp_q)),
        "fp8_gemm_ms": graph_ms(base),
        "fp8_gemm_k_plus_r_ms": graph_ms(appended),
        "down_bf16_ms": graph_ms(lambda: x @ a.t()),
        "up_bf16_ms": graph_ms(lambda: u @ b.t()),
        "down_fp8_ms": graph_ms(lambda: torch._scaled_mm(x_q, a_t, scale_a=s_x, scale_b=s_a_row,
                                                          out_dtype=torch.bfloat16)),
        "quant_x_ms": graph_ms(lambda: rowwise(x)),
        "quant_x_u_ms": graph_ms(lambda: rowwise(torch.cat([x, u], dim=-1))),
    }
    # Errors vs fp64 of the same (bf16) x, A, B, W: the LoRA delta today (bf16 GEMMs) and appended (its FP8
    # columns), and the base product with x's own row scale vs the joint scale of [x | u].
    reference = x.double() @ a.double().t() @ b.double().t()
    kappend_delta = (xu_q[:, k:].double() * s_xu.double()) @ (b_q.double() * s_w.double()).t()
    base_reference = x.double() @ w.double().t()
    w_deq = w_q.double() * s_w.double()
    result["delta_error_slots"] = rel((u @ b.t()).double(), reference)
    result["delta_error_kappend"] = rel(kappend_delta, reference)
    result["base_error_own_scale"] = rel((x_q.double() * s_x.double()) @ w_deq.t(), base_reference)
    result["base_error_joint_scale"] = rel((xu_q[:, :k].double() * s_xu.double()) @ w_deq.t(), base_reference)
    base_fp8 = (x_q.double() * s_x.double()) @ w_deq.t()
    result["delta_error_three_tails"] = rel(fast(xp_q, s_xp, wp_q).double() - base_fp8, reference)
    result["delta_error_three_tails_exact"] = rel(
        (xp_q.double() * s_xp.double()) @ (wp_q.double() * s_w.double()).t()
        - (xp_q[:, :k].double() * s_xp.double()) @ w_deq.t(), reference)
    result["three_tails_rows_widened"] = float((s_xp > s_x).float().mean())
    result["b_clamped_fraction"] = float(((b.float() / s_w).abs() > FP8_MAX).float().mean())
    return result


def main(out_path: str) -> None:
    generator = torch.Generator("cuda").manual_seed(0)
    rows, totals = [], {}
    for (tokens, k, n), count in SHAPES.items():
        r = probe(tokens, k, n, generator)
        r.update(tokens=tokens, k=k, n=n, count=count)
        rows.append(r)
        for key, value in r.items():
            if key.endswith("_ms"):
                totals[key] = totals.get(key, 0.0) + count * value
        print(json.dumps({key: round(v, 4) if isinstance(v, float) else v for key, v in r.items()}))
    step = {key: round(v, 2) for key, v in totals.items()}
    # Today's LoRA GEMMs per step vs what K-append would add: the down GEMM (bf16 or FP8), the wider base GEMM
    # and the joint quantization's extra.
    step["today_lora_gemms_ms"] = round(totals["down_bf16_ms"] + totals["up_bf16_ms"], 2)
    extra = totals["fp8_gemm_k_plus_r_ms"] - totals["fp8_gemm_ms"] + totals["quant_x_u_ms"] - totals["quant_x_ms"]
    step["kappend_bf16_down_ms"] = round(totals["down_bf16_ms"] + extra, 2)
    step["kappend_fp8_down_ms"] = round(totals["down_fp8_ms"] + extra, 2)
    # Three tails with fast accumulation: the up GEMMs go, the base GEMM grows (the tails' small quantization
    # kernel is not counted).
    step["three_tails_saves_ms"] = round(totals["fp8_gemm_fast_plus_up_ms"] - totals["fp8_gemm_fast_k_plus_3r_padded_ms"], 2)
    write_report(out_path, "per_shape", rows, step)


def write_report(out_path: str, rows_key: str, rows: list, step: dict) -> None:
    """The probe's JSON (machine, rows, per-step sums) at `out_path`; the per-step sums printed too."""
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rank": RANK,
              rows_key: rows, "per_step_ms": step}
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(step))


if __name__ == "__main__":
    main(sys.argv[1])
