"""Do three FP8 tails pay a whole block's linears, the readers of their outputs included? (issue 11, 512² at 0.84x)

`probe_lora_kappend.py` timed GEMMs alone (three tails: -3.62 ms a 1024² step, H100). The kernel breakdown of
2026-12-07b says the larger part of the slot tax is elsewhere: each up-projection writes a bf16 delta as wide as its
linear's output, which the next kernel reads beside the GEMM output. This probe times what a block does around each
slotted linear, for today's slots and for tails built the simplest way a package could (no kernel changed):

- slots (today): `y = fp8_gemm(q, W)`, `u = h A^T` (one down-projection GEMM for the linears that share an input, as
  `group_lora_down`), `d = u B^T`, then the reader: `y + bias + d` quantized row-wise to FP8 (what the GELU
  quantization does; the q/k norm and the residual adds read the same two tensors);
- tails: the same `u`, one Inductor kernel writing the linear's own rows `[q / H | u_hi | u_lo | u_hi]` (a copy of
  the already quantized input moved down by a power-of-two headroom H, its row scale `H s_x`, plus u at that scale
  over one factor c per linear, `c = min_n(s_w[n] 448 / max|B[n]|)`, clamped: fraction given), `y = fp8_gemm(rows,
  [W | B_hi | B_hi | B_lo])` at K + 3R, the reader on `y + bias` alone;
- no LoRA: `y = fp8_gemm(q, W[:, :K])` read from the tailed weight (the no-slot programs would read that view: no
  second copy), beside the contiguous weight, and the reader on `y + bias`.

Per group of linears (FLUX.1-dev shapes), ms from CUDA graphs at 512² and 1024², summed over a step's groups; and
each tailed linear's whole-output error against fp64 beside slots'. A double block's q/k/v run as one GEMM over their
joined weights today (`joined_qkv`): tails there either keep the join with a block-diagonal tail (K + 9R) or split
into three GEMMs with their own rows.

On the GPU machine: `cd scripts/gpu && python3 probe_tails_block.py $OUT/tails_block.json` (~100 s on an H100);
`python3 probe_tails_block.py --summary tails_block.json` sums an earlier run per step.
"""

import json
import sys

import torch
import torch._dynamo

from probe_lora_kappend import FP8, FP8_MAX, RANK, graph_ms, rel, rowwise

torch._dynamo.config.cache_size_limit = 256
HEADROOMS = (16.0, 64.0)
# groups of linears that read one input: (name, input width, output widths, per-step count, stream)
GROUPS = (
    ("single_qkv_mlp", 3072, (3072, 3072, 3072, 12288), 38, "single"),
    ("single_proj_out", 15360, (3072,), 38, "single"),
    ("double_qkv", 3072, (3072, 3072, 3072), 19, "both"),
    ("double_out", 3072, (3072,), 19, "both"),
    ("double_mlp_in", 3072, (12288,), 19, "both"),
    ("double_mlp_out", 12288, (3072,), 19, "both"),
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the errors only (a smoke test, small tokens)
TOKENS = {512: {"single": 1536, "image": 1024, "text": 512}, 1024: {"single": 4608, "image": 4096, "text": 512}}


@torch.compile(dynamic=False)
def read_output(y, bias, d):
    """The reader after a linear: `y + bias (+ d)` quantized row-wise to FP8 (the GELU quantization's pattern)."""
    z = y.float() + bias.float()
    if d is not None:
        z = z + d.float()
    scale = z.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (z / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@torch.compile(dynamic=False)
def tailed_rows(q, s_x, u, c, headroom: float):
    """`[q / H | u_hi | u_lo | u_hi]` at the row scale `H s_x`: the linear's own GEMM rows, u at that scale over
    the linear's factor c. H a power of two: q / H is exact but where it falls below FP8's normal range."""
    s = s_x * headroom
    t = (u.float() / (s * c)).clamp(-FP8_MAX, FP8_MAX)
    hi = t.to(FP8)
    lo = (t - hi.float()).to(FP8)
    return torch.cat([(q.float() / headroom).to(FP8), hi, lo, hi], dim=-1), s


@torch.compile(dynamic=False)
def tailed_rows_joined(q, s_x, u, c, headroom: float):
    """Joined q/k/v: `[q / H | u_hi_q u_lo_q u_hi_q | .. k .. | .. v ..]` against the block-diagonal tail weight."""
    s = s_x * headroom
    t = (u.float() / (s * c)).clamp(-FP8_MAX, FP8_MAX)
    hi = t.to(FP8)
    lo = (t - hi.float()).to(FP8)
    parts = [(q.float() / headroom).to(FP8)]
    for i in range(u.shape[-1] // RANK):
        part = slice(RANK * i, RANK * (i + 1))
        parts += [hi[:, part], lo[:, part], hi[:, part]]
    return torch.cat(parts, dim=-1), s


@torch.compile(dynamic=False)
def write_tails_(rows_list, s_x, u, cs, headroom: float):
    """In place: each linear's tail columns of its rows buffer from the group's `u` (one kernel for the group, as a
    package would launch after the group's down-projection; the quantization kernels would write `q / H` before).
    The buffers come as uint8 views (Inductor's CPU codegen cannot promote FP8 in a masked store; same bytes)."""
    s = s_x * headroom
    for i, rows in enumerate(rows_list):
        t = (u[:, RANK * i:RANK * (i + 1)].float() / (s * cs[i])).clamp(-FP8_MAX, FP8_MAX)
        hi = t.to(FP8)
        lo = (t - hi.float()).to(FP8).view(torch.uint8)
        hi = hi.view(torch.uint8)
        k = rows.shape[-1] - 3 * RANK
        rows[:, k:k + RANK] = hi
        rows[:, k + RANK:k + 2 * RANK] = lo
        rows[:, k + 2 * RANK:] = hi


@torch.compile(dynamic=False)
def copy_rows_(rows_list, q, headroom: float):
    """What a quantization kernel would add to write one input's `q / H` into each reader's own rows (the copies a
    shared input needs beyond the first)."""
    q_h = (q.float() / headroom).to(FP8).view(torch.uint8)
    for rows in rows_list:
        rows[:, :q.shape[-1]] = q_h


def write_tails_triton_(rows, u, s_x, cs, headroom: float):
    """`write_tails_` as one hand-written Triton launch for the group: rows `[n, T, Kp]` (each linear's rows in one
    allocation), tails at columns K .. K + 3R of each (K = Kp - 256: K + 3R padded to a multiple of 128)."""
    import triton
    import triton.language as tl

    global _tails_kernel
    if _tails_kernel is None:
        @triton.jit
        def kernel(u_ptr, stride_u, s_ptr, c_ptr, rows_ptr, T, Kp, K, headroom, BLOCK_T: tl.constexpr,
                   R: tl.constexpr):
            pid_t = tl.program_id(0)
            i = tl.program_id(1)
            offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
            offs_r = tl.arange(0, R)
            mask = offs_t[:, None] < T
            u = tl.load(u_ptr + offs_t[:, None] * stride_u + i * R + offs_r[None, :], mask=mask).to(tl.float32)
            s = tl.load(s_ptr + offs_t, mask=offs_t < T, other=1.0) * headroom
            c = tl.load(c_ptr + i)
            t = tl.clamp(u / (s[:, None] * c), -448.0, 448.0)
            hi = t.to(tl.float8e4nv)
            lo = (t - hi.to(tl.float32)).to(tl.float8e4nv)
            out = rows_ptr + i * T * Kp + offs_t[:, None] * Kp + K + offs_r[None, :]
            tl.store(out, hi, mask=mask)
            tl.store(out + R, lo, mask=mask)
            tl.store(out + 2 * R, hi, mask=mask)

        _tails_kernel = kernel
    n, tokens, kp = rows.shape
    block_t = 64
    _tails_kernel[(triton.cdiv(tokens, block_t), n)](u, u.stride(0), s_x, cs, rows, tokens, kp, kp - 256, headroom,
                                                     BLOCK_T=block_t, R=RANK)


_tails_kernel = None


def tail_weight(w_q, s_w, b):
    """`[W | B_hi | B_hi | B_lo]` and the factor c, the largest that keeps every `c B[n] / s_w[n]` in FP8's range."""
    c = (s_w * FP8_MAX / b.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)).min()
    b_scaled = b.float() * c / s_w
    b_hi = b_scaled.to(FP8)
    b_lo = (b_scaled - b_hi.float()).to(FP8)
    return torch.cat([w_q, b_hi, b_hi, b_lo], dim=-1).contiguous(), c


def block_diagonal_tail_weight(w_qs, s_ws, bs):
    """Joined q/k/v: `[W_i | 0.. B_i tails ..0]` stacked, one factor for all three (rows `[q | t_q | t_k | t_v]`)."""
    c = min((s_w * FP8_MAX / b.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)).min()
            for s_w, b in zip(s_ws, bs))
    rows = []
    for i, (w_q, s_w, b) in enumerate(zip(w_qs, s_ws, bs)):
        b_scaled = b.float() * c / s_w
        b_hi = b_scaled.to(FP8)
        b_lo = (b_scaled - b_hi.float()).to(FP8)
        tail = torch.zeros(w_q.shape[0], 9 * RANK, device=w_q.device, dtype=FP8)
        tail[:, 3 * RANK * i:3 * RANK * (i + 1)] = torch.cat([b_hi, b_hi, b_lo], dim=-1)
        rows.append(torch.cat([w_q, tail], dim=-1))
    return torch.cat(rows).contiguous(), c


def gemm(a_q, s_a, w_q, s_w_row):
    """The packages' FP8 GEMM: row-wise scales, fast accumulation, bf16 out (w_q may be a strided view)."""
    return torch._scaled_mm(a_q, w_q.t(), scale_a=s_a, scale_b=s_w_row, out_dtype=torch.bfloat16, use_fast_accum=True)


class Group:
    """One group's random linears (bf16 masters, FP8 weights, LoRA factors) on one token count."""

    def __init__(self, tokens, k, outs, generator, headroom):
        dev = DEVICE
        self.h = torch.randn(tokens, k, device=dev, generator=generator).bfloat16()
        self.q, self.s_x = rowwise(self.h)
        self.ws = [(torch.randn(n, k, device=dev, generator=generator) * k ** -0.5).bfloat16() for n in outs]
        self.biases = [(torch.randn(n, device=dev, generator=generator) * 0.02).bfloat16() for n in outs]
        self.a = (torch.randn(RANK * len(outs), k, device=dev, generator=generator) * k ** -0.5).bfloat16()
        self.bs = [(torch.randn(n, RANK, device=dev, generator=generator) * (0.3 * RANK ** -0.5)).bfloat16()
                   for n in outs]
        quantized = [rowwise(w) for w in self.ws]
        self.w_qs = [w_q for w_q, _ in quantized]
        self.s_ws = [s_w for _, s_w in quantized]
        self.s_w_rows = [s_w.t().contiguous() for s_w in self.s_ws]
        tailed = [tail_weight(w_q, s_w, b) for w_q, s_w, b in zip(self.w_qs, self.s_ws, self.bs)]
        self.w_tails = [w for w, _ in tailed]
        self.cs = [c for _, c in tailed]
        self.k = k
        self.headroom = headroom
        if len(outs) == 3:  # joined q/k/v, today's form and a block-diagonal tail
            self.w_joined = torch.cat(self.w_qs).contiguous()
            self.s_joined = torch.cat(self.s_ws).t().contiguous()
            self.b_joined = torch.cat(self.biases)
            self.w_joined_tail, self.c_joined = block_diagonal_tail_weight(self.w_qs, self.s_ws, self.bs)

    def u_parts(self):
        u = self.h @ self.a.t()
        return [u[:, RANK * i:RANK * (i + 1)] for i in range(len(self.ws))]

    def slots(self):
        us = self.u_parts()
        for i, w_q in enumerate(self.w_qs):
            y = gemm(self.q, self.s_x, w_q, self.s_w_rows[i])
            read_output(y, self.biases[i], us[i] @ self.bs[i].t())

    def slots_joined(self):
        us = self.u_parts()
        y = gemm(self.q, self.s_x, self.w_joined, self.s_joined)
        n = self.ws[0].shape[0]
        for i in range(3):
            read_output(y[:, n * i:n * (i + 1)], self.biases[i], us[i] @ self.bs[i].t())

    def tails(self):
        us = self.u_parts()
        for i, w_tail in enumerate(self.w_tails):
            y = gemm(*tailed_rows(self.q, self.s_x, us[i], self.cs[i], self.headroom), w_tail, self.s_w_rows[i])
            read_output(y, self.biases[i], None)

    def tails_joined(self):
        rows, s = tailed_rows_joined(self.q, self.s_x, self.h @ self.a.t(), self.c_joined, self.headroom)
        y = gemm(rows, s, self.w_joined_tail, self.s_joined)
        n = self.ws[0].shape[0]
        for i in range(3):
            read_output(y[:, n * i:n * (i + 1)], self.biases[i], None)

    def parts(self):
        """Each piece of the two paths alone, to see which piece costs (callables by name)."""
        us = self.u_parts()
        rows = [tailed_rows(self.q, self.s_x, u, c, self.headroom) for u, c in zip(us, self.cs)]
        deltas = [u @ b.t() for u, b in zip(us, self.bs)]
        ys = [gemm(self.q, self.s_x, w_q, s) for w_q, s in zip(self.w_qs, self.s_w_rows)]
        n = len(self.ws)
        buffers = [r.clone().view(torch.uint8) for r, _ in rows]
        u_all = self.h @ self.a.t()
        scale = rows[0][1]
        cs = torch.stack([c.reshape(()) for c in self.cs])
        pad = -(self.k + 3 * RANK) % 128
        padded_rows = [torch.nn.functional.pad(r.view(torch.uint8), (0, pad)).view(FP8) for r, _ in rows]
        padded_w = [torch.nn.functional.pad(w.view(torch.uint8), (0, pad)).view(FP8) for w in self.w_tails]
        triton_rows = torch.stack(padded_rows) if self.k + 3 * RANK + pad == self.k + 256 else None
        parts = {
            "down": lambda: self.h @ self.a.t(),
            "base_gemms": lambda: [gemm(self.q, self.s_x, self.w_qs[i], self.s_w_rows[i]) for i in range(n)],
            "up_gemms": lambda: [us[i] @ self.bs[i].t() for i in range(n)],
            "reads_with_delta": lambda: [read_output(ys[i], self.biases[i], deltas[i]) for i in range(n)],
            "reads": lambda: [read_output(ys[i], self.biases[i], None) for i in range(n)],
            "rows": lambda: [tailed_rows(self.q, self.s_x, us[i], self.cs[i], self.headroom) for i in range(n)],
            "tail_gemms": lambda: [gemm(*rows[i], self.w_tails[i], self.s_w_rows[i]) for i in range(n)],
            "tail_gemms_padded": lambda: [gemm(padded_rows[i], scale, padded_w[i], self.s_w_rows[i]) for i in range(n)],
            "write_tails": lambda: write_tails_(buffers, self.s_x, u_all, cs, self.headroom),
            "extra_copies": lambda: copy_rows_(buffers[1:], self.q, self.headroom) if n > 1 else None,
        }
        if DEVICE == "cuda" and triton_rows is not None:
            expected = triton_rows.clone()
            triton_rows.view(torch.uint8)[:, :, self.k:] = 0
            s_flat = self.s_x.reshape(-1).contiguous()
            try:
                write_tails_triton_(triton_rows, u_all, s_flat, cs, self.headroom)
                self.triton_tails_bit_equal = torch.equal(triton_rows.view(torch.uint8), expected.view(torch.uint8))
                parts["write_tails_triton"] = lambda: write_tails_triton_(triton_rows, u_all, s_flat, cs,
                                                                          self.headroom)
            except Exception as error:  # a probe: record it, time the rest
                self.triton_tails_bit_equal = f"failed: {type(error).__name__}: {str(error)[:300]}"
        return parts

    def no_lora(self, view: bool | str):
        """No LoRA: the contiguous weight, or (view) a view of the tailed weight `[n, K + 3R]`, or ("padded") of
        the tailed weight padded to `[n, K + 256]` (row stride a multiple of 128 bytes)."""
        if view == "padded" and not hasattr(self, "w_tails_padded"):
            pad = -(self.k + 3 * RANK) % 128
            self.w_tails_padded = [torch.nn.functional.pad(w.view(torch.uint8), (0, pad)).view(FP8)
                                   for w in self.w_tails]
        for i, w_q in enumerate(self.w_qs):
            w = (self.w_tails_padded[i] if view == "padded" else self.w_tails[i])[:, :self.k] if view else w_q
            read_output(gemm(self.q, self.s_x, w, self.s_w_rows[i]), self.biases[i], None)

    def errors(self):
        """Whole-output error of each linear vs fp64, slots and tails; and whether the view's GEMM is bit-equal."""
        us = self.u_parts()
        out = []
        for i, w in enumerate(self.ws):
            reference = (self.h.double() @ w.double().t() + self.biases[i].double()
                         + self.h.double() @ self.a[RANK * i:RANK * (i + 1)].double().t() @ self.bs[i].double().t())
            slots = gemm(self.q, self.s_x, self.w_qs[i], self.s_w_rows[i]) + self.biases[i] + us[i] @ self.bs[i].t()
            t = us[i].float() / (self.s_x * self.headroom * self.cs[i])
            tailed = gemm(*tailed_rows(self.q, self.s_x, us[i], self.cs[i], self.headroom), self.w_tails[i],
                          self.s_w_rows[i]) + self.biases[i]
            view_equal = torch.equal(gemm(self.q, self.s_x, self.w_tails[i][:, :self.k], self.s_w_rows[i]),
                                     gemm(self.q, self.s_x, self.w_qs[i], self.s_w_rows[i]))
            out.append({"slots": rel(slots.double(), reference), "tails": rel(tailed.double(), reference),
                        "u_clamped": float((t.abs() > FP8_MAX).float().mean()), "base_view_bit_equal": view_equal})
        if len(self.ws) == 3:
            y = gemm(*tailed_rows_joined(self.q, self.s_x, self.h @ self.a.t(), self.c_joined, self.headroom),
                     self.w_joined_tail, self.s_joined)
            n = self.ws[0].shape[0]
            for i, w in enumerate(self.ws):
                reference = (self.h.double() @ w.double().t() + self.biases[i].double() + self.h.double()
                             @ self.a[RANK * i:RANK * (i + 1)].double().t() @ self.bs[i].double().t())
                out[i]["tails_joined"] = rel((y[:, n * i:n * (i + 1)] + self.biases[i]).double(), reference)
        return out


def step_summary(report: dict) -> dict:
    """Per size, ms a step summed over the groups (x count): today's slots (double q/k/v joined), tails built from
    the measured pieces (down-projection, the faster of the unpadded/padded tail GEMM, the readers without a delta,
    the extra copies a shared input needs, the hand-written tail writer), tails only where a group gains, the same
    with the rows for free (a bound), and the no-LoRA GEMMs on contiguous / viewed / padded-viewed weights."""
    summary = {}
    for size, data in report["sizes"].items():
        totals = dict.fromkeys(("slots_today", "tails_every_group", "tails_where_faster", "tails_rows_free"), 0.0)
        for row in data["per_group"]:
            if "slots_ms" not in row or "part_write_tails_triton_ms" not in row:
                continue
            slots = row.get("slots_joined_ms", row["slots_ms"])
            gemm = min(row["part_tail_gemms_ms"], row["part_tail_gemms_padded_ms"])
            rows_free = row["part_down_ms"] + gemm + row["part_reads_ms"]
            copies = row["part_extra_copies_ms"] if len(row["errors"]) > 1 else 0.0
            tails = rows_free + copies + row["part_write_tails_triton_ms"]
            for key, value in (("slots_today", slots), ("tails_every_group", tails),
                               ("tails_where_faster", min(tails, slots)), ("tails_rows_free", rows_free)):
                totals[key] += value * row["count"]
        totals.update({k: v for k, v in data["step_totals_ms"].items() if k.startswith("no_lora")})
        summary[size] = {k: round(v, 2) for k, v in totals.items()}
    return summary


def main(out_path):
    generator = torch.Generator(DEVICE).manual_seed(0)
    if DEVICE == "cpu":
        TOKENS.clear()
        TOKENS[16] = {"single": 48, "image": 32, "text": 16}
    report = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
              "rank": RANK, "sizes": {}}
    for size, tokens in TOKENS.items():
        rows, totals = [], {}
        for name, k, outs, count, stream in GROUPS:
            for stream_name in (("single",) if stream == "single" else ("image", "text")):
                for headroom in HEADROOMS:
                    group = Group(tokens[stream_name], k, outs, generator, headroom)
                    row = {"group": name, "stream": stream_name, "tokens": tokens[stream_name], "count": count,
                           "headroom": headroom, "errors": group.errors()}
                    if headroom == HEADROOMS[0] and DEVICE == "cuda":  # timings once (the headroom changes no shape)
                        row["slots_ms"] = graph_ms(group.slots, calls=4)
                        row["tails_ms"] = graph_ms(group.tails, calls=4)
                        row["no_lora_ms"] = graph_ms(lambda: group.no_lora(False), calls=4)
                        row["no_lora_view_ms"] = graph_ms(lambda: group.no_lora(True), calls=4)
                        row["no_lora_view_padded_ms"] = graph_ms(lambda: group.no_lora("padded"), calls=4)
                        row["no_lora_again_ms"] = graph_ms(lambda: group.no_lora(False), calls=4)
                        for part, fn in group.parts().items():
                            row[f"part_{part}_ms"] = graph_ms(fn, calls=4)
                        row["triton_tails_bit_equal"] = getattr(group, "triton_tails_bit_equal", None)
                        if len(outs) == 3:
                            row["slots_joined_ms"] = graph_ms(group.slots_joined, calls=4)
                            row["tails_joined_ms"] = graph_ms(group.tails_joined, calls=4)
                        for key in [k_ for k_ in row if k_.endswith("_ms")]:
                            totals[key] = totals.get(key, 0.0) + row[key] * count
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    del group
                    torch.cuda.empty_cache()
        # today's step: joined q/k/v in slots; tails: each group's faster form
        report["sizes"][size] = {"per_group": rows, "step_totals_ms": {k_: round(v, 3) for k_, v in totals.items()}}
        print(size, json.dumps(report["sizes"][size]["step_totals_ms"]), flush=True)
    report["step_summary_ms"] = step_summary(report)
    print(json.dumps(report["step_summary_ms"]))
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1] == "--summary":  # an earlier run's JSON
        print(json.dumps(step_summary(json.load(open(sys.argv[2]))), indent=1))
    else:
        main(sys.argv[1])
