"""Where do the merge-by-address kernels lose time? (issue 11: a 28-step 512² image under the merge policy is 18 ms
over 0.80x of the recipe's kernel-time bound; a merge of r64 into all 494 block linears costs ~35 ms, of which the two
Triton passes take 23.4 ms and the stack of the originals 6 ms.)

The passes move ~35 GB (FP8 read twice, written once): ~8 ms at the H200's bandwidth; their r64 products are
~3 TFLOP: a few ms on tensor cores. At 23.4 ms neither bound holds, so the tiles are the suspect: 64 x 128 with a
rank step of 16 reloads each layer's A once per 64 rows (2 bytes per weight element) and issues four K=16 dots.

This probe runs the same math (q * s + bf16(B A), row amax, FP8 re-quantization, the new rows written by address)
over FLUX.1-dev's 494 block linears (random FP8 weights, random r64 factors) in these forms:
- `stack`: as packages did (`merge_by_address.pt2`): originals stacked per shape first (timed apart), both passes
  read the stack;
- `table`: no stack: both passes read the bound storages through the address table, the amax pass saves the
  original scales and the quantize pass writes each original tile to the save buffer before overwriting it
  (one write instead of the stack's read and write);
- `rows`: one launch, a program per block of whole rows looping over the columns twice (amax, then quantize);
each over tile sizes (rows BN x columns BK), rank step RC, warps, stages and CT column tiles per program; and
ablations of the table form (ABLATE: 1 the product's bf16 rounding in integer ops, 2 no product, 3 no rounding;
passes timed alone). Every form is checked against the bytes of the package's first-form kernels (`FIRST_FORM`,
timed as `current_ms`): share of FP8 bytes equal, largest relative scale difference; and its save against the
originals. CONFIGS holds the last call's list (the first
calls swept the stack and table forms over 18 tile configs each; benchmarks/results/2026-12-02h-h200-merge-tiles).

On the GPU machine: `python3 scripts/gpu/probe_merge_tiles.py $OUT/merge_tiles.json`
"""

import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from aotpack.bench.timing import time_ms

RANK = 64
FP8 = torch.float8_e4m3fn
SHAPES = {(3072, 3072): 19 * 8 + 38 * 3, (12288, 3072): 19 * 2 + 38, (3072, 12288): 19 * 2, (3072, 15360): 38,
          (18432, 3072): 19 * 2, (9216, 3072): 38}


@triton.jit
def _layer_base(src_ptr, table_ptr, layer, size, FROM_TABLE: tl.constexpr, ELEMENT: tl.constexpr):
    if FROM_TABLE:
        base = tl.multiple_of(tl.load(table_ptr + layer).to(tl.pointer_type(ELEMENT)), 16)
    else:
        base = src_ptr + layer * size
    return base


@triton.jit
def _bf16_round(x):
    """fp32 -> bf16 -> fp32 (round to nearest even) in integer ops, not conversions (finite inputs)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _tile(qb, s, a_ptr, b_ptr, layer, rows, cols, row_in, col_in, K, R, N,
          BN: tl.constexpr, BK: tl.constexpr, RC: tl.constexpr, ABLATE: tl.constexpr):
    q = tl.load(qb + rows[:, None] * K + cols[None, :], mask=row_in[:, None] & col_in[None, :], other=0.0)
    product = tl.zeros((BN, BK), dtype=tl.float32)
    if ABLATE != 2:  # 2: no product at all
        for start in tl.range(0, R, RC):
            rank = start + tl.arange(0, RC)
            b = tl.load(b_ptr + layer * N * R + rows[:, None] * R + rank[None, :], mask=row_in[:, None], other=0.0)
            a = tl.load(a_ptr + layer * R * K + rank[:, None] * K + cols[None, :], mask=col_in[None, :], other=0.0)
            product = tl.dot(b, a, product)
    if ABLATE == 1:  # the product's bf16 rounding in integer ops
        product = _bf16_round(product)
    elif ABLATE == 3:  # no rounding of the product
        product = product
    else:
        product = product.to(a_ptr.dtype.element_ty).to(tl.float32)
    return q, q.to(tl.float32) * s[:, None] + product


@triton.jit
def amax_kernel(q_src, s_src, q_table, s_table, a_ptr, b_ptr, amax_ptr, s_save, N16, K16, R16,
                BN: tl.constexpr, BK: tl.constexpr, RC: tl.constexpr, CT: tl.constexpr, FROM_TABLE: tl.constexpr, ABLATE: tl.constexpr):
    N, K, R = N16 * 16, K16 * 16, R16 * 16
    layer = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    row_in = rows < N
    qb = _layer_base(q_src, q_table, layer, N * K, FROM_TABLE, tl.float8e4nv)
    sb = _layer_base(s_src, s_table, layer, N, FROM_TABLE, tl.float32)
    s = tl.load(sb + rows, mask=row_in, other=0.0)
    if FROM_TABLE:
        if tl.program_id(0) == 0:
            tl.store(s_save + layer * N + rows, s, mask=row_in)
    top = tl.zeros((BN,), dtype=tl.float32)
    for c in range(CT):
        cols = (tl.program_id(0) * CT + c) * BK + tl.arange(0, BK)
        _, value = _tile(qb, s, a_ptr, b_ptr, layer, rows, cols, row_in, cols < K, K, R, N, BN, BK, RC, ABLATE)
        top = tl.maximum(top, tl.max(tl.abs(value), axis=1))
    tl.atomic_max(amax_ptr + layer * N + rows, top, mask=row_in)


@triton.jit
def quantize_kernel(q_src, s_src, q_table, s_table, a_ptr, b_ptr, amax_ptr, q_save, s_saved, new_scale_ptr,
                    N16, K16, R16, BN: tl.constexpr, BK: tl.constexpr, RC: tl.constexpr, CT: tl.constexpr,
                    FROM_TABLE: tl.constexpr, ABLATE: tl.constexpr):
    N, K, R = N16 * 16, K16 * 16, R16 * 16
    layer = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    row_in = rows < N
    qb = _layer_base(q_src, q_table, layer, N * K, FROM_TABLE, tl.float8e4nv)
    if FROM_TABLE:
        s = tl.load(s_saved + layer * N + rows, mask=row_in, other=0.0)  # the amax pass saved them
    else:
        s = tl.load(s_src + layer * N + rows, mask=row_in, other=0.0)
    dst = tl.multiple_of(tl.load(q_table + layer).to(tl.pointer_type(tl.float8e4nv)), 16)
    scale = tl.maximum(tl.load(amax_ptr + layer * N + rows, mask=row_in, other=1.0) / 448.0, 1e-12)
    for c in range(CT):
        cols = (tl.program_id(0) * CT + c) * BK + tl.arange(0, BK)
        col_in = cols < K
        mask = row_in[:, None] & col_in[None, :]
        q, value = _tile(qb, s, a_ptr, b_ptr, layer, rows, cols, row_in, col_in, K, R, N, BN, BK, RC, ABLATE)
        if FROM_TABLE:
            tl.store(q_save + layer * N * K + rows[:, None] * K + cols[None, :], q, mask=mask)
        out = tl.minimum(tl.maximum(value / scale[:, None], -448.0), 448.0)
        tl.store(dst + rows[:, None] * K + cols[None, :], out.to(tl.float8e4nv), mask=mask)
    if tl.program_id(0) == 0:
        st = tl.multiple_of(tl.load(s_table + layer).to(tl.pointer_type(tl.float32)), 16)
        tl.store(st + rows, scale, mask=row_in)
        tl.store(new_scale_ptr + layer * N + rows, scale, mask=row_in)


@triton.jit
def rows_kernel(q_table, s_table, a_ptr, b_ptr, q_save, s_save, new_scale_ptr, N16, K16, R16,
                BN: tl.constexpr, BK: tl.constexpr, RC: tl.constexpr):
    """One program per block of whole rows: a loop over the column tiles for the rows' amax, then a second loop
    that saves each original tile and writes the re-quantized one (the second read of a row block finds it in L2
    more often than a second pass over all layers does; one launch, no atomics, no amax buffer)."""
    N, K, R = N16 * 16, K16 * 16, R16 * 16
    layer = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    row_in = rows < N
    qb = tl.multiple_of(tl.load(q_table + layer).to(tl.pointer_type(tl.float8e4nv)), 16)
    sb = tl.multiple_of(tl.load(s_table + layer).to(tl.pointer_type(tl.float32)), 16)
    s = tl.load(sb + rows, mask=row_in, other=0.0)
    tl.store(s_save + layer * N + rows, s, mask=row_in)
    top = tl.zeros((BN,), dtype=tl.float32)
    for start in tl.range(0, K, BK):
        cols = start + tl.arange(0, BK)
        _, value = _tile(qb, s, a_ptr, b_ptr, layer, rows, cols, row_in, cols < K, K, R, N, BN, BK, RC, 0)
        top = tl.maximum(top, tl.max(tl.abs(value), axis=1))
    scale = tl.maximum(top / 448.0, 1e-12)
    for start in tl.range(0, K, BK):
        cols = start + tl.arange(0, BK)
        col_in = cols < K
        mask = row_in[:, None] & col_in[None, :]
        q, value = _tile(qb, s, a_ptr, b_ptr, layer, rows, cols, row_in, col_in, K, R, N, BN, BK, RC, 0)
        tl.store(q_save + layer * N * K + rows[:, None] * K + cols[None, :], q, mask=mask)
        out = tl.minimum(tl.maximum(value / scale[:, None], -448.0), 448.0)
        tl.store(qb + rows[:, None] * K + cols[None, :], out.to(tl.float8e4nv), mask=mask)
    tl.store(sb + rows, scale, mask=row_in)
    tl.store(new_scale_ptr + layer * N + rows, scale, mask=row_in)


def run_rows(groups, config, factors):
    for group, (a, b) in zip(groups, factors):
        grid = (triton.cdiv(group.rows, config["BN"]), group.count)
        rows_kernel[grid](group.q_table, group.s_table, a, b, group.save_q, group.save_s, group.new_scale,
                          group.rows // 16, group.cols // 16, a.shape[1] // 16, BN=config["BN"], BK=config["BK"],
                          RC=config["RC"], num_warps=config["warps"], num_stages=config["stages"])


class Group:
    """The layers of one shape: bound storages, their pristine copies, the factors, address tables, buffers."""

    def __init__(self, rows, cols, count, rank, generator, device="cuda"):
        self.rows, self.cols, self.count, self.rank = rows, cols, count, rank
        self.qdata = [(torch.randn(rows, cols, device=device, generator=generator) * 100).clamp(-448, 448).to(FP8)
                      for _ in range(count)]
        self.scale = [torch.rand(rows, device=device, generator=generator) * 1e-4 + 1e-5 for _ in range(count)]
        self.pristine_q = torch.stack([q.view(torch.uint8) for q in self.qdata])
        self.pristine_s = torch.stack(self.scale)
        self.a = (torch.randn(count, rank, cols, device=device, generator=generator) * 0.02).to(torch.bfloat16)
        self.b = (torch.randn(count, rows, rank, device=device, generator=generator) * 0.02).to(torch.bfloat16)
        self.q_table = torch.tensor([q.data_ptr() for q in self.qdata], dtype=torch.int64, device=device)
        self.s_table = torch.tensor([s.data_ptr() for s in self.scale], dtype=torch.int64, device=device)
        self.amax = torch.zeros(count, rows, device=device)
        self.new_scale = torch.empty(count, rows, device=device)
        self.save_q = torch.empty(count, rows, cols, dtype=FP8, device=device)
        self.save_s = torch.empty(count, rows, device=device)

    def reset(self):
        for i, (q, s) in enumerate(zip(self.qdata, self.scale)):
            q.view(torch.uint8).copy_(self.pristine_q[i])
            s.copy_(self.pristine_s[i])

    def stack(self):
        words = [q.view(torch.uint8).reshape(-1).view(torch.int64) for q in self.qdata]
        return torch.stack(words).view(FP8).view(self.count, self.rows, self.cols), torch.stack(self.scale)

    def factors(self, rank_multiple):
        pad = -self.rank % rank_multiple
        if not pad:
            return self.a, self.b
        zeros_a = torch.zeros(self.count, pad, self.cols, dtype=self.a.dtype, device=self.a.device)
        zeros_b = torch.zeros(self.count, self.rows, pad, dtype=self.b.dtype, device=self.b.device)
        return torch.cat([self.a, zeros_a], 1), torch.cat([self.b, zeros_b], 2)

    def snapshot(self):
        return torch.stack([q.view(torch.uint8) for q in self.qdata]), torch.stack(self.scale)


# the kernels of the package's first form (`merge_by_address.pt2`: stack first, 64 x 128, rank step 16, 4 warps,
# Triton's default 3 stages), as this probe's stack form; the reference every other form is checked against
FIRST_FORM = dict(BN=64, BK=128, RC=16, CT=1, warps=4, stages=3, table=False)


def run_variant(groups, stacked, config, factors, passes=("amax", "quantize")):
    bn, bk, rc, ct, warps, stages, from_table = (config[k] for k in ("BN", "BK", "RC", "CT", "warps", "stages",
                                                                     "table"))
    for group, stack, (a, b) in zip(groups, stacked, factors):
        sq, ss = stack if stack is not None else (group.save_q, group.save_s)
        grid = (triton.cdiv(group.cols, bk * ct), triton.cdiv(group.rows, bn), group.count)
        sixteenths = (group.rows // 16, group.cols // 16, a.shape[1] // 16)
        meta = {"BN": bn, "BK": bk, "RC": rc, "CT": ct, "FROM_TABLE": from_table, "num_warps": warps,
                "num_stages": stages, "ABLATE": config.get("ablate", 0)}
        if "amax" in passes:
            group.amax.zero_()
            amax_kernel[grid](sq, ss, group.q_table, group.s_table, a, b, group.amax, group.save_s, *sixteenths,
                              **meta)
        if "quantize" in passes:
            quantize_kernel[grid](sq, ss, group.q_table, group.s_table, a, b, group.amax, group.save_q, group.save_s,
                                  group.new_scale, *sixteenths, **meta)


def events_ms(fn, before=None):
    """Best and median of 5 device-timed runs, each after an untimed `before()`."""
    timed = time_ms(fn, "cuda", warmup=0, repeats=5, before=before)
    return round(timed["min_ms"], 3), round(timed["median_ms"], 3)


BEST = dict(BN=128, BK=128, RC=64, CT=1, warps=4, stages=2)  # the first call's best (23.0 ms, table form)
CONFIGS = [dict(BEST)] + [dict(BN=bn, BK=bk, RC=64, warps=w, stages=st, form="rows") for bn, bk, w, st in [
    (64, 128, 4, 2), (64, 128, 4, 3), (128, 128, 4, 2), (128, 128, 4, 3), (128, 128, 8, 2), (64, 64, 4, 2),
    (64, 256, 4, 2), (64, 256, 8, 2), (32, 128, 4, 2), (32, 256, 4, 2), (128, 64, 4, 2), (64, 128, 8, 3)]]


def main(path):
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    generator = torch.Generator("cuda").manual_seed(0)
    groups = [Group(rows, cols, count, RANK, generator) for (rows, cols), count in SHAPES.items()]
    result["fp8_gb"] = round(sum(g.count * g.rows * g.cols for g in groups) / 1e9, 2)
    reset = lambda: [g.reset() for g in groups]  # noqa: E731

    holder = {}
    result["stack_ms"] = events_ms(lambda: holder.update(stacked=[g.stack() for g in groups]), before=reset)
    stacked = holder["stacked"]
    first_form = [g.factors(FIRST_FORM["RC"]) for g in groups]
    def run_first_form(): run_variant(groups, stacked, FIRST_FORM, first_form)  # noqa: E306,E704
    reset()
    run_first_form()  # JIT compile
    result["current_ms"] = events_ms(run_first_form, before=reset)  # the package's kernels when this probe began
    reset()
    run_first_form()
    expected = [g.snapshot() for g in groups]
    print(json.dumps(result), flush=True)

    def compare(check_save):
        equal = total = 0
        worst_scale = 0.0
        save_ok = True
        for g, (eq, es) in zip(groups, expected):
            q, s = g.snapshot()
            equal += int((q == eq).sum())
            total += q.numel()
            worst_scale = max(worst_scale, float(((s - es).abs() / es).max()))
            if check_save:
                save_ok &= torch.equal(g.save_q.view(torch.uint8), g.pristine_q) and torch.equal(g.save_s, g.pristine_s)
        return {"fp8_bytes_equal": equal / total, "scale_max_rel_diff": worst_scale, "save_exact": save_ok}

    rows = []
    copy_ms = events_ms(lambda: [g.save_q.view(torch.uint8).copy_(g.pristine_q) for g in groups])
    result["copy_11.8GB_ms"] = copy_ms  # a plain copy: what the bandwidth allows for a read and a write
    for config in CONFIGS:
        config = dict(config, table=True)
        passes = config.get("passes", ("amax", "quantize"))
        factors = [g.factors(config["RC"]) for g in groups]
        use = [None] * len(groups)
        if config.get("form") == "rows":
            def run(): run_rows(groups, config, factors)  # noqa: E306,E704
        else:
            def run(): run_variant(groups, use, config, factors, passes)  # noqa: E306,E704
        try:
            reset()
            started = time.perf_counter()
            run()
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - started
            reset()
            run()
            torch.cuda.synchronize()
            row = dict(config, **compare(True), compile_s=round(compile_s, 1))
            row["ms"] = events_ms(run, before=reset)
        except Exception as err:  # noqa: BLE001 -- a config Triton refuses (registers, shared memory)
            row = dict(config, error=f"{type(err).__name__}: {str(err)[:200]}")
        rows.append(row)
        print(json.dumps(row), flush=True)
    result["variants"] = rows

    # rank 16 through the best table form: its own rank step against padding to 64
    best = min((r for r in rows if "ms" in r and "passes" not in r and r["fp8_bytes_equal"] == 1.0),
               key=lambda r: r["ms"][0], default=None)
    if best is not None:
        result["best"] = best
        small = [Group(rows_, cols, count, 16, generator) for (rows_, cols), count in SHAPES.items()]
        for g in groups:  # free the r64 set's memory first
            del g.pristine_q, g.save_q
        groups.clear()
        result["rank16"] = {}
        for rc in (16, best["RC"]):
            config = dict(best, RC=rc)
            factors = [g.factors(rc) for g in small]
            if best.get("form") == "rows":
                def run(): run_rows(small, config, factors)  # noqa: E306,E704
            else:
                def run(): run_variant(small, [None] * len(small), config, factors)  # noqa: E306,E704
            run()
            result["rank16"][f"RC{rc}"] = events_ms(run, before=lambda: [g.reset() for g in small])
    text = json.dumps(result, indent=1)
    print(text)
    Path(path).write_text(text)


if __name__ == "__main__":
    main(sys.argv[1])
