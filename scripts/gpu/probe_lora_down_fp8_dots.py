"""Why `lora_down_fp8` is slow, and a form with native FP8 dots: A split into two FP8 halves.

`lora_down_from_fp8`'s kernel (models/lora_down_fp8.py) reads the FP8 GELU output, half cuBLAS's bytes, yet took
2.75 ms a 1024² step against ~2.3 for cuBLAS's bf16 down GEMMs (H200, 2026-12-04f): ~1.4 TB/s, where the bytes it
must read (3.8 GB a 1024² step) allow ~0.8 ms. It converts every FP8 tile to bf16 for a bf16 `tl.dot`. This probe
times, at the FLUX.1-dev shapes of a 1024² and a 512² step (rank 64):
- `cublas_bf16`: today's down-projection from the bf16 copy (`F.linear(h, A)`);
- `current`: the lever's kernel at its configuration;
- `hilo`: A = s_hi * hi + s_lo * lo (each FP8 e4m3 with one scale per rank row, computed in torch per call), two
  FP8 x FP8 `tl.dot`s per tile (Hopper's FP8 wgmma, no conversion), split K, float32 partials summed in torch;
  a sweep of launch configurations;
- `hi`: the same with A's first half only (one dot), for its error;
- `scaled_mm_hi` / `scaled_mm_hilo`: cuBLAS's row-wise FP8 GEMM (`torch._scaled_mm`) with A's halves;
and u's relative error of each against a float64 product of the bf16 GELU output (the FP8 rounding of x is in
every FP8 form: that is the lever's accuracy price, 2.7% at 2026-12-04f). Per-step totals weight each shape by its
calls in a step. Random inputs.

On the GPU machine: `python3 scripts/gpu/probe_lora_down_fp8_dots.py $OUT/probe_lora_down_fp8_dots.json`
"""

import functools
import json
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
from aotpack.models import lora_down_fp8 as lever  # noqa: E402
from aotpack.models.examples import relative_error  # noqa: E402
from aotpack.models.fused_quant import _gelu_quant_triton  # noqa: E402
from kernel_probe import graph_ms, record_size, shapes_from_env, sweep_from_env, timed_sweep  # noqa: E402  same folder
from probe_lora_down_fp8 import RANK, SHAPES, gelu_inputs  # noqa: E402  same folder

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SWEEP = sweep_from_env({"block_m": (128, 256), "block_k": (64, 128), "per_slice": (1024, 2048), "num_warps": (4, 8),
                        "num_stages": (2, 3)})  # PROBE_SWEEP replaces it (kernel_probe.py)
SHAPES = shapes_from_env(SHAPES)  # the GELU shapes of probe_lora_down_fp8; PROBE_SHAPES keeps some of them
DEFAULT = dict(block_m=128, block_k=128, per_slice=2048, num_warps=4, num_stages=4)


def split_a(a):
    """A [R, K] bf16 -> (hi, s_hi, lo, s_lo): FP8 halves with one float32 scale per rank row, A ~ s_hi hi + s_lo lo
    (`lora_down_fp8.fp8_hi_lo_rows`, as [R, 1] scales)."""
    halves, scales = lever.fp8_hi_lo_rows(a)
    rank = a.shape[0]
    return halves[:rank], scales[0, :rank, None], halves[rank:], scales[0, rank:, None].contiguous()


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def down_fp8_dots(q_ptr, hi_ptr, s_hi_ptr, lo_ptr, s_lo_ptr, partial_ptr, rows, K: tl.constexpr,
                      R: tl.constexpr, K_PER_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                      USE_LO: tl.constexpr):
        row_block, split = tl.program_id(0), tl.program_id(1)
        offs_m = (row_block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_r = tl.arange(0, R)
        acc_hi = tl.zeros((BLOCK_M, R), dtype=tl.float32)
        acc_lo = tl.zeros((BLOCK_M, R), dtype=tl.float32)
        for k0 in range(0, K_PER_SPLIT, BLOCK_K):
            offs_k = split * K_PER_SPLIT + k0 + tl.arange(0, BLOCK_K)
            in_k = offs_k < K
            x = tl.load(q_ptr + offs_m[:, None] * K + offs_k[None, :], mask=(offs_m[:, None] < rows) & in_k[None, :],
                        other=0.0)
            hi = tl.load(hi_ptr + offs_r[:, None] * K + offs_k[None, :], mask=in_k[None, :], other=0.0)
            acc_hi = tl.dot(x, tl.trans(hi), acc_hi)
            if USE_LO:
                lo = tl.load(lo_ptr + offs_r[:, None] * K + offs_k[None, :], mask=in_k[None, :], other=0.0)
                acc_lo = tl.dot(x, tl.trans(lo), acc_lo)
        out = acc_hi * tl.load(s_hi_ptr + offs_r)[None, :]
        if USE_LO:
            out += acc_lo * tl.load(s_lo_ptr + offs_r)[None, :]
        tl.store(partial_ptr + (split * rows + offs_m[:, None]) * R + offs_r[None, :], out,
                 mask=offs_m[:, None] < rows)

    return down_fp8_dots


@functools.cache
def _tma_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def down_fp8_tma(q_ptr, a_ptr, partial_ptr, rows, K: tl.constexpr, R: tl.constexpr, K_PER_SPLIT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        # x tiles and A tiles by device-made TMA descriptors; x converted to A's dtype for the dot
        q_desc = tl.make_tensor_descriptor(q_ptr, shape=[rows, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[R, K], strides=[K, 1], block_shape=[R, BLOCK_K])
        row_block, split = tl.program_id(0), tl.program_id(1)
        acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
        for k0 in range(0, K_PER_SPLIT, BLOCK_K):
            k = split * K_PER_SPLIT + k0
            x = q_desc.load([row_block * BLOCK_M, k])
            a = a_desc.load([0, k])
            acc = tl.dot(x.to(a.dtype), a.T, acc)
        offs_m = (row_block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_r = tl.arange(0, R)
        tl.store(partial_ptr + (split * rows + offs_m[:, None]) * R + offs_r[None, :], acc,
                 mask=offs_m[:, None] < rows)

    return down_fp8_tma


def down_fp8_tma(q, scale, a, *, block_m, block_k, per_slice, num_warps, num_stages, kernel_only=False):
    from aotpack.models.gemm_lora import _descriptor_scratch

    rows, k = q.shape
    rank = a.shape[0]
    columns, slices = lever._split(k, block_k, per_slice)
    partial = torch.empty(slices, rows, rank, dtype=torch.float32, device=q.device)
    with _descriptor_scratch():
        _tma_kernel()[((rows + block_m - 1) // block_m, slices)](
            q, a, partial, rows, K=k, R=rank, K_PER_SPLIT=columns, BLOCK_M=block_m, BLOCK_K=block_k,
            num_warps=num_warps, num_stages=num_stages)
    if kernel_only:
        return partial
    return (partial.sum(0) * scale).to(torch.bfloat16)


def down_fp8_dots(q, scale, halves, *, use_lo=True, block_m, block_k, per_slice, num_warps, num_stages):
    hi, s_hi, lo, s_lo = halves
    rows, k = q.shape
    rank = hi.shape[0]
    columns, slices = lever._split(k, block_k, per_slice)
    partial = torch.empty(slices, rows, rank, dtype=torch.float32, device=q.device)
    _kernel()[((rows + block_m - 1) // block_m, slices)](
        q, hi, s_hi, lo, s_lo, partial, rows, K=k, R=rank, K_PER_SPLIT=columns, BLOCK_M=block_m, BLOCK_K=block_k,
        USE_LO=use_lo, num_warps=num_warps, num_stages=num_stages)
    return (partial.sum(0) * scale).to(torch.bfloat16)


def scaled_mm(q, scale, halves, use_lo):
    hi, s_hi, lo, s_lo = halves
    u = torch._scaled_mm(q, hi.t(), scale_a=scale, scale_b=s_hi.t(), out_dtype=torch.float32)
    if use_lo:
        u = u + torch._scaled_mm(q, lo.t(), scale_a=scale, scale_b=s_lo.t(), out_dtype=torch.float32)
    return u.to(torch.bfloat16)


def main(out_path):
    g = torch.Generator(device="cuda").manual_seed(0)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rank": RANK, "sizes": {}}
    for size, shapes in SHAPES.items():
        if not shapes:
            continue
        totals = {key: 0.0 for key in ("cublas_bf16_ms", "current_ms", "hilo_ms", "hilo_best_ms", "hi_ms",
                                       "current_best_ms", "tma_best_ms", "tma_kernel_only_ms",
                                       "partial_reduce_compiled_ms", "split_a_ms", "split_a_compiled_ms",
                                       "scaled_mm_hi_ms", "scaled_mm_hilo_ms",
                                       "gelu_keep_ms", "gelu_no_keep_ms")}
        rows_out = []
        for name, (rows, prefix_width, width, calls) in shapes.items():
            prefix, pre, bias, delta, a = gelu_inputs(rows, prefix_width, width, g)
            k = prefix_width + width
            q, scale, h = _gelu_quant_triton(prefix, pre, bias, delta, True)
            q, scale = q.reshape(rows, k), scale.reshape(rows, 1).float()
            exact = F.linear(h.double(), a.double())
            halves = split_a(a)
            row = {"shape": name, "rows": rows, "k": k, "calls_per_step": calls,
                   "a_split_error": relative_error((halves[0].double() * halves[1] + halves[2].double() * halves[3]),
                                                   a.double()),
                   "u_error_cublas_bf16": relative_error(F.linear(h, a).double(), exact),
                   "u_error_current": relative_error(lever._lora_down_fp8_triton(q, scale, a).double(), exact),
                   "u_error_hilo": relative_error(down_fp8_dots(q, scale, halves, **DEFAULT).double(), exact),
                   "u_error_hi": relative_error(down_fp8_dots(q, scale, halves, use_lo=False, **DEFAULT).double(),
                                                exact),
                   "cublas_bf16_ms": graph_ms(lambda: F.linear(h, a)),
                   "current_ms": graph_ms(lambda: lever._lora_down_fp8_triton(q, scale, a)),
                   "hilo_ms": graph_ms(lambda: down_fp8_dots(q, scale, halves, **DEFAULT)),
                   "hi_ms": graph_ms(lambda: down_fp8_dots(q, scale, halves, use_lo=False, **DEFAULT)),
                   "split_a_ms": graph_ms(lambda: split_a(a)),
                   "gelu_keep_ms": graph_ms(lambda: _gelu_quant_triton(prefix, pre, bias, delta, True)),
                   "gelu_no_keep_ms": graph_ms(lambda: _gelu_quant_triton(prefix, pre, bias, delta, False))}
            for use_lo in (False, True):
                key = "scaled_mm_hilo" if use_lo else "scaled_mm_hi"
                try:
                    row[f"u_error_{key}"] = relative_error(scaled_mm(q, scale, halves, use_lo).double(), exact)
                    row[f"{key}_ms"] = graph_ms(lambda: scaled_mm(q, scale, halves, use_lo))
                except Exception as err:
                    row[f"{key}_failed"] = f"{type(err).__name__}: {err}"[:300]
                    row[f"{key}_ms"] = float("nan")
            compiled_split = torch.compile(split_a, dynamic=False)
            row["split_a_compiled_ms"] = graph_ms(lambda: compiled_split(a))
            reduce_only = torch.compile(lambda p: (p.sum(0) * scale).to(torch.bfloat16), dynamic=False)
            partial = down_fp8_tma(q, scale, a, **DEFAULT, kernel_only=True)
            row["partial_reduce_compiled_ms"] = graph_ms(lambda: reduce_only(partial))
            row["tma_kernel_only_ms"] = graph_ms(lambda: down_fp8_tma(q, scale, a, **DEFAULT, kernel_only=True))
            kernels = {"tma": lambda **config: down_fp8_tma(q, scale, a, **config),
                       "hilo": lambda **config: down_fp8_dots(q, scale, halves, **config),
                       "current": lambda **config: lever._lora_down_fp8_triton(q, scale, a, **config)}
            for kernel, call in kernels.items():
                sweep, timed = timed_sweep(SWEEP, call)
                row[f"{kernel}_sweep_best"] = timed[:5]
                row[f"{kernel}_best_ms"] = timed[0]["ms"] if timed else float("nan")
                row[f"{kernel}_sweep"] = sweep
                if timed:
                    best = {key: timed[0][key] for key in SWEEP}
                    row[f"u_error_{kernel}_best"] = relative_error(call(**best).double(), exact)
            for key in totals:
                totals[key] += calls * row[key]
            rows_out.append(row)
            print(json.dumps({key: value for key, value in row.items() if not key.endswith("_sweep")}), flush=True)
        record_size(report, size, totals, rows_out, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
