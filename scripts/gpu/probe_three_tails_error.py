"""How far off is a layer's whole output with the LoRA rank appended to the FP8 GEMM's K as three tails? (issue 11)

`probe_lora_kappend.py` timed three tails (`[x_q | u_hi | u_lo | u_hi]` against `[W_q | B_hi | B_hi | B_lo]`, K + 3R
padded to a multiple of 128) and scored their delta against a base quantized at x's own scale, which mixes the
re-quantization of x (its row scale widened so that u fits) into the "delta error". This probe scores what a user
sees instead: the whole output `x W^T + x A^T B^T` against fp64 of the same bf16 tensors, for
- today's slots: the fast-accumulation FP8 base GEMM plus the bf16 up GEMM's delta (added in bf16);
- three tails with each row's scale widened where u would overflow (`widen`, as probed);
- three tails with a fixed headroom h on x's row scale (h = 16, 64: the norm/GELU quantization kernels would
  multiply their scale by h, no second pass over x), u clamped where it still overflows (fraction reported).
It also reports the LoRA delta's error with the base taken from the same GEMM inputs (tails zeroed), i.e. with
one and the same quantized x on both sides. Random weights, FLUX.1-dev shapes at 1024², fast accumulation.

On the GPU machine: `python3 scripts/gpu/probe_three_tails_error.py $OUT/three_tails_error.json`
"""

import json
import sys

import torch

from probe_lora_kappend import FP8, FP8_MAX, RANK, SHAPES, random_layer, rel, rowwise


def tails(x, u, b, w_q, s_w, headroom=None):
    """(A, its row scale, W) of three tails; `headroom` None widens the rows that need it, else a fixed factor."""
    s_x = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    c = (s_w * FP8_MAX / b.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)).min()
    if headroom is None:
        s = s_x * (u.abs().amax(dim=-1, keepdim=True).float() / (c * s_x * FP8_MAX)).clamp(min=1)
    else:
        s = s_x * headroom
    u_scaled = u.float() / (s * c)
    clamped = float((u_scaled.abs() > FP8_MAX).float().mean())
    u_scaled = u_scaled.clamp(-FP8_MAX, FP8_MAX)
    b_scaled = b.float() * c / s_w
    u_hi, b_hi = u_scaled.to(FP8), b_scaled.to(FP8)
    u_lo, b_lo = (u_scaled - u_hi.float()).to(FP8), (b_scaled - b_hi.float()).to(FP8)
    x_q = (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    pad = -(x.shape[-1] + 3 * u.shape[-1]) % 128
    zeros_a = torch.zeros(x.shape[0], pad, device=x.device, dtype=FP8)
    zeros_w = torch.zeros(w_q.shape[0], pad, device=x.device, dtype=FP8)
    a_cat = torch.cat([x_q, u_hi, u_lo, u_hi, zeros_a], dim=-1).contiguous()
    w_cat = torch.cat([w_q, b_hi, b_hi, b_lo, zeros_w], dim=-1).contiguous()
    return a_cat, s, w_cat, clamped


def probe(tokens, k, n, generator):
    x, w, a, b = random_layer(tokens, k, n, generator)
    x_q, s_x = rowwise(x)
    w_q, s_w = rowwise(w)
    s_w_row = s_w.t().contiguous()
    u = x @ a.t()

    def fast(a_q, s_a, b_q):
        return torch._scaled_mm(a_q, b_q.t(), scale_a=s_a, scale_b=s_w_row, out_dtype=torch.bfloat16,
                                use_fast_accum=True)

    base_ref = x.double() @ w.double().t()
    delta_ref = x.double() @ a.double().t() @ b.double().t()
    reference = base_ref + delta_ref
    today_base = fast(x_q, s_x, w_q)
    result = {"output_error_today": rel((today_base + (u @ b.t())).double(), reference),
              "base_error_today": rel(today_base.double(), base_ref),
              "delta_error_today": rel((u @ b.t()).double(), delta_ref),
              "delta_share_of_output": float(delta_ref.norm() / reference.norm())}
    for label, headroom in (("widen", None), ("h16", 16.0), ("h64", 64.0)):
        a_cat, s, w_cat, clamped = tails(x, u, b, w_q, s_w, headroom)
        out = fast(a_cat, s, w_cat)
        no_tails = a_cat.clone()
        no_tails[:, k:] = torch.zeros_like(no_tails[:, k:])
        base_same_x = fast(no_tails, s, w_cat)
        result[f"output_error_{label}"] = rel(out.double(), reference)
        result[f"delta_error_{label}"] = rel(out.double() - base_same_x.double(), delta_ref)
        result[f"u_clamped_{label}"] = clamped
        result[f"scale_widening_{label}"] = float((s / s_x).mean())
    return result


def main(out_path):
    generator = torch.Generator("cuda").manual_seed(0)
    rows = []
    for (tokens, k, n), count in SHAPES.items():
        row = probe(tokens, k, n, generator)
        row.update(tokens=tokens, k=k, n=n, count=count)
        rows.append(row)
        print(json.dumps({key: round(v, 5) if isinstance(v, float) else v for key, v in row.items()}))
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rank": RANK, "per_shape": rows}
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
