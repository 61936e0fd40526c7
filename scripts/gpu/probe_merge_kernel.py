"""Could a merge of r64 into all 494 block linears take ~20 ms of kernels instead of ~63? (issue 11: a 28-step
1024² image under the merge policy is 43 ms short of 0.80x of the recipe, and its merge costs 92 ms.)

Today's merge program (`models/merge_rows.py`, compiled by Inductor) materializes the bf16 product `B @ A` of each
stacked group, then a looped reduction reads the FP8 weight and that product twice (34 ms of the ~63), after
stacking (6 ms) and before the copy back into the bound storages. This probe times two Triton kernels per layer
that form the product tile by tile in registers (rank <= 64) and write the merged FP8 rows in place:

    amax pass:     per (row block, column block) tile, v = q * s + bf16(B A), atomic max of |v| per row
    quantize pass: the same v again, scale = max(amax / 448, 1e-12), q = fp8(v / scale) into the same tile

(the FP8 weight read twice and written once: ~36 GB for FLUX.1-dev's 11.8 GB, no product in memory, no stacking).
It reports the kernels' time over the 494 layers (CUDA events, host launch time beside; and replayed from a CUDA
graph, the kernels alone), and per weight shape the
result against `merged_rows` (the program's math, eager): scales' max relative difference, the dequantized
weights' relative error and the share of FP8 bytes that are equal. Random FP8 weights, random r64 factors.

On the GPU machine: `python3 scripts/gpu/probe_merge_kernel.py $OUT/merge_kernel.json`

Built since into packages as `merge_by_address.pt2` (aotpack/models/merge_by_address.py; timed by
scripts/gpu/probe_merge_by_address.py): 25 ms of fold for these layers, 31.5 ms with the save.
"""

import json
import sys
import time

import torch
import triton
import triton.language as tl

from aotpack.models.merge_rows import merged_rows

RANK = 64
FP8 = torch.float8_e4m3fn
# (out, in) of FLUX.1-dev's block linears with their counts (19 double blocks, 38 single): 494 layers, 11.8 GB FP8
SHAPES = {(3072, 3072): 19 * 8 + 38 * 3, (12288, 3072): 19 * 2 + 38, (3072, 12288): 19 * 2, (3072, 15360): 38,
          (18432, 3072): 19 * 2, (9216, 3072): 38}
BLOCK_N, BLOCK_K = 64, 128


@triton.jit
def _merged_tile(q_ptr, s_ptr, a_ptr, b_ptr, rows, cols, N, K, R: tl.constexpr):
    rmask, cmask = rows < N, cols < K
    rank = tl.arange(0, R)
    b = tl.load(b_ptr + rows[:, None] * R + rank[None, :], mask=rmask[:, None], other=0.0)
    a = tl.load(a_ptr + rank[:, None] * K + cols[None, :], mask=cmask[None, :], other=0.0)
    q = tl.load(q_ptr + rows[:, None] * K + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    s = tl.load(s_ptr + rows, mask=rmask, other=0.0)
    product = tl.dot(b, a).to(tl.bfloat16).to(tl.float32)  # the program's bf16 matmul output
    return q.to(tl.float32) * s[:, None] + product, rmask, cmask


@triton.jit
def amax_kernel(q_ptr, s_ptr, a_ptr, b_ptr, amax_ptr, N, K, R: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    value, rmask, _ = _merged_tile(q_ptr, s_ptr, a_ptr, b_ptr, rows, cols, N, K, R)
    tl.atomic_max(amax_ptr + rows, tl.max(tl.abs(value), axis=1), mask=rmask)


@triton.jit
def quantize_kernel(q_ptr, s_ptr, a_ptr, b_ptr, amax_ptr, out_q_ptr, out_s_ptr, N, K, R: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    value, rmask, cmask = _merged_tile(q_ptr, s_ptr, a_ptr, b_ptr, rows, cols, N, K, R)
    scale = tl.maximum(tl.load(amax_ptr + rows, mask=rmask, other=1.0) / 448.0, 1e-12)
    out = tl.minimum(tl.maximum(value / scale[:, None], -448.0), 448.0)
    tl.store(out_q_ptr + rows[:, None] * K + cols[None, :], out.to(tl.float8e4nv), mask=rmask[:, None] & cmask[None, :])
    if tl.program_id(1) == 0:
        tl.store(out_s_ptr + rows, scale, mask=rmask)


def merge_layer(q, s, a, b, amax, out_q, out_s):
    """q [N, K] fp8, s [N] fp32, a [R, K] bf16, b [N, R] bf16 (scale folded in); amax [N] zeros; out_q may be q."""
    n, k = q.shape
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(k, BLOCK_K))
    amax_kernel[grid](q, s, a, b, amax, n, k, R=RANK, BN=BLOCK_N, BK=BLOCK_K, num_warps=4)
    quantize_kernel[grid](q, s, a, b, amax, out_q, out_s, n, k, R=RANK, BN=BLOCK_N, BK=BLOCK_K, num_warps=4)


def layers(device):
    g = torch.Generator(device).manual_seed(0)
    out = []
    for (n, k), count in SHAPES.items():
        for _ in range(count):
            q = (torch.randn(n, k, device=device, generator=g) * 100).clamp(-448, 448).to(FP8)
            s = torch.rand(n, device=device, generator=g) * 1e-4 + 1e-5
            a = (torch.randn(RANK, k, device=device, generator=g) * 0.02).to(torch.bfloat16)
            b = (torch.randn(n, RANK, device=device, generator=g) * 0.02).to(torch.bfloat16)
            out.append((q, s, a, b))
    return out


def timed(fn, repeats=3):
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        host = time.perf_counter()
        start.record()
        fn()
        end.record()
        host = time.perf_counter() - host
        torch.cuda.synchronize()
        times.append({"device_ms": start.elapsed_time(end), "host_launch_ms": host * 1000})
    return times


def main(path):
    device = "cuda"
    stack = layers(device)
    total_n = sum(q.shape[0] for q, *_ in stack)
    amax = torch.zeros(total_n, device=device)
    offsets, at = [], 0
    for q, *_ in stack:
        offsets.append(at)
        at += q.shape[0]
    outs = [(torch.empty_like(q), torch.empty_like(s)) for q, s, *_ in stack]
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "layers": len(stack), "fp8_gb": sum(q.numel() for q, *_ in stack) / 1e9, "block": [BLOCK_N, BLOCK_K]}

    def run_all(in_place=False):
        amax.zero_()
        for (q, s, a, b), (oq, os_), off in zip(stack, outs, offsets):
            merge_layer(q, s, a, b, amax[off:off + q.shape[0]], q if in_place else oq, os_)

    started = time.perf_counter()
    run_all()  # compiles the two kernels
    torch.cuda.synchronize()
    result["first_call_s"] = time.perf_counter() - started
    result["out_of_place"] = timed(run_all)
    # the same launches replayed from a CUDA graph: the kernels' time without Python's ~988 launches (in a package
    # they would be an AOTInductor program's C++ launches)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_all()
    result["out_of_place_graph"] = timed(graph.replay)

    checks = {}
    seen = set()
    for (q, s, a, b), (oq, os_) in zip(stack, outs):
        if q.shape in seen:
            continue
        seen.add(q.shape)
        ref_q, ref_s = merged_rows(q, s.view(-1, 1), a, b)
        ref_value = ref_q.float() * ref_s
        value = oq.float() * os_.view(-1, 1)
        checks[str(tuple(q.shape))] = {
            "scale_max_rel_diff": float(((os_.view(-1, 1) - ref_s).abs() / ref_s).max()),
            "value_rel_error": float((value - ref_value).norm() / ref_value.norm()),
            "fp8_bytes_equal": float((oq.view(torch.uint8) == ref_q.view(torch.uint8)).float().mean()),
        }
    result["vs_merged_rows"] = checks

    # eager `merged_rows` over stacks of one shape, the math the program compiles (not its speed: a sanity line)
    groups = {}
    for q, s, a, b in stack:
        groups.setdefault(q.shape, []).append((q, s, a, b))

    def eager_all():
        for members in groups.values():
            merged_rows(torch.stack([m[0] for m in members]), torch.stack([m[1] for m in members]).unsqueeze(-1),
                        torch.stack([m[2] for m in members]), torch.stack([m[3] for m in members]))

    try:
        result["eager_merged_rows_stacked"] = timed(eager_all, repeats=1)
    except torch.OutOfMemoryError as err:
        result["eager_merged_rows_stacked"] = f"out of memory: {err}"[:200]
    torch.cuda.empty_cache()
    result["in_place"] = timed(lambda: run_all(in_place=True))  # writes the weights themselves (values change)
    text = json.dumps(result, indent=1)
    print(text)
    with open(path, "w") as handle:
        handle.write(text)


if __name__ == "__main__":
    main(sys.argv[1])
