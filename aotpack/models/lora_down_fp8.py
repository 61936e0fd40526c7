"""A LoRA down-projection that reads the FP8 activation its base GEMM reads: the recipe lever `lora_down_from_fp8`.

With `fused_gelu_quant`, the linear after each MLP GELU (a double block's `ff.net.2` / `ff_context.net.2`, a single
block's `proj_out`) takes the GELU output quantized row-wise to FP8. A bound LoRA slot there also needs that input
in bf16, so the GELU kernel writes it a second time (`keep_input`) and the down-projection reads it back: at 1024²
the widest activations of the step (4608 x 15360 in a single block), 3.5 ms of the GELU kernel's 8.7 ms a slotted
step against 5.2 ms with no LoRA (H200, 2026-12-04, `benchmarks/results/2026-12-04e-h200-row-amax/`, random
weights; part of the difference is reading the LoRA delta of the linear before the GELU). The lever marks all but
`ff_context.net.2` (`fused_quant.install_fused_gelu_quant`): a text stream's 512 rows (batch 1) are too few for this
kernel (36 against 24 us a call, H200 probe 2026-12-04f; in a package 1024² 96.89 -> 96.57 ms, H100,
`benchmarks/results/2026-12-06k-h100-fp8down-image-stream/`).

This module computes `u = A x` from the FP8 copy instead, `u[m] = scale[m] * sum_k q[m, k] A[:, k]`:
- `torch.ops.aotpack.lora_down_fp8(q, scale, a)`: a `torch.library.triton_op`. On CUDA a split-K Triton kernel
  converts each FP8 tile to the LoRA dtype (exact: e4m3 values are bf16 and fp16 values), multiplies by A's tile
  with float32 accumulation, and writes float32 partial sums per K slice; their sum (fixed order: deterministic),
  times the row scale, is rounded to the LoRA dtype. Elsewhere, and as the reference, `lora_down_fp8_reference`
  does the same in float32 torch ops (what the CPU tests build and run).
- the GELU kernel then never writes the bf16 copy (`fused_quant.linear_after_gelu`).

The price is accuracy: u now carries the activation's FP8 rounding, as the base GEMM's output does (2.7% of u,
against 0.17% through bf16), on those linears only. Measured beside the default package in one process (H200,
2026-12-04, random weights, `benchmarks/results/2026-12-04f-h200-lora-down-fp8/`): r64 in slots from CUDA graphs
1024² 98.95 -> 98.01 ms, 512² 36.38 -> 36.32 ms, LoRA fidelity error in slots 0.0953 -> 0.0972. The kernel reads half
cuBLAS's bytes and is still slower than cuBLAS's bf16 GEMM (2.75 vs ~2.3 ms a 1024² step), so the GELU kernel's
saving (-1.8 ms) mostly goes to it alone. Together with `fp8_qk_in_norm_rope` it paid more (1024² 99.64 -> 97.35 ms,
H100, `benchmarks/results/2026-12-06i-h100-fp8qk-fp8down/`): on in `h100`/`h200` since 2026-12-06.

The recipe lever `lora_down_fp8_gemm` (off) computes the same `u` as one cuBLASLt FP8 GEMM instead of the Triton
kernel (`lora_down_fp8_gemm`): A split in the program into an FP8 high part and the FP8 rounding of the rest, one
float32 scale a rank row (`fp8_hi_lo_rows`, ~2^-8 of A), `torch._scaled_mm(q, [A_hi; A_lo]^T)` with q's row scales
and A's as the epilogue's, the two halves summed. Measured in a package beside the default (H100, 2026-12-08, random
weights, `benchmarks/results/2026-12-08a-h100-lora-down-fp8-gemm/`): 512² 32.29 -> 33.49 ms a step from CUDA
graphs. cuBLASLt's GEMM at N = 128 is slower than the Triton kernel with 1536 rows (a 512² single block: 37.0 vs
24.5 us), faster with 4608 (39.7 vs 58.8), and the split in the program costs ~8 us a call. A Triton kernel with FP8
tensor-core dots against A's halves took 14.9 / 47.8 us there (0.83 against 1.42 ms a 512² step, probe).

That form is the recipe lever `lora_down_fp8_dots` (on in h100/h200 since 2026-12-08b: 512² -0.26 to -0.58 ms a
step from CUDA graphs, 1024² 91.97 -> 91.06 ms, H100, random weights,
`benchmarks/results/2026-12-08b-h100-lora-down-fp8-dots/`): `lora_down_fp8_dots(q, scale,
a8, a_scale, dtype)` runs the kernel above with `A_HALVES`, FP8 x FP8 dots against A's high and low rows, whose
row scales combine the two accumulators before the partial store. The halves are two more program inputs of the
slot (`slots.a_halves_input_names`), split by the runtime after each switch (runtime/a_halves_bank.py), not in every
call; an eager run given A alone splits it itself (`lora_delta_from_fp8`), the same bits.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .examples import relative_error
from .fp8_attention import FP8, FP8_MAX
from .kernel_ops import dot_takes_rank, refuse_kernel_errors, register_triton_op
from .slots import LoRASlotLinear, a_halves_input_names, lora_input_names, reads_a_halves


def lora_down_fp8_reference(q: torch.Tensor, scale: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """`u = (q * scale) A^T` in float32, rounded to A's dtype: `q` [..., K] FP8, `scale` [..., 1] float32 (the row
    scales with `x ~ q * scale`), `a` [R, K]; returns [..., R]."""
    return (F.linear(q.float(), a.float()) * scale).to(a.dtype)


@functools.cache
def _kernel():
    """The Triton kernel, made on first use: the CPU-only install has no triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def lora_down_fp8_kernel(q_ptr, a_ptr, a_scale_ptr, partial_ptr, rows, K: tl.constexpr, R: tl.constexpr,
                             K_PER_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                             DOT_IN_FP32: tl.constexpr, A_HALVES: tl.constexpr):
        # program (m, s): rows [m * BLOCK_M, +BLOCK_M) over K slice s; writes partial[s, rows, :R] in float32.
        # A_HALVES: `a` is [2R, K] FP8 (high rows, then low rows; row scales `a_scale` [2R]) and the dots are FP8 x FP8
        # (no conversion of q's tile); else `a` is [R, K] in the LoRA dtype and q's tile is converted to it.
        row_block, split = tl.program_id(0), tl.program_id(1)
        offs_m = (row_block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_r = tl.arange(0, R)
        acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
        acc_lo = tl.zeros((BLOCK_M, R), dtype=tl.float32)
        for k0 in range(0, K_PER_SPLIT, BLOCK_K):
            offs_k = split * K_PER_SPLIT + k0 + tl.arange(0, BLOCK_K)
            in_k = offs_k < K
            x = tl.load(q_ptr + offs_m[:, None] * K + offs_k[None, :], mask=(offs_m[:, None] < rows) & in_k[None, :],
                        other=0.0)
            a = tl.load(a_ptr + offs_r[:, None] * K + offs_k[None, :], mask=in_k[None, :], other=0.0)  # [R, BLOCK_K]
            if A_HALVES:
                lo = tl.load(a_ptr + (R + offs_r[:, None]) * K + offs_k[None, :], mask=in_k[None, :], other=0.0)
                if DOT_IN_FP32:  # Triton's CPU interpreter (scripts/check_lora_down_fp8_kernel.py)
                    acc = tl.dot(x.to(tl.float32), tl.trans(a).to(tl.float32), acc)
                    acc_lo = tl.dot(x.to(tl.float32), tl.trans(lo).to(tl.float32), acc_lo)
                else:
                    acc = tl.dot(x, tl.trans(a), acc)
                    acc_lo = tl.dot(x, tl.trans(lo), acc_lo)
            else:
                x = x.to(a_ptr.dtype.element_ty)  # e4m3 -> bf16/fp16 is exact
                if DOT_IN_FP32:  # Triton's CPU interpreter multiplies bf16 wrongly (check_lora_down_fp8_kernel.py)
                    acc = tl.dot(x.to(tl.float32), tl.trans(a).to(tl.float32), acc)
                else:
                    acc = tl.dot(x, tl.trans(a), acc)
        if A_HALVES:
            acc = acc * tl.load(a_scale_ptr + offs_r)[None, :] + acc_lo * tl.load(a_scale_ptr + R + offs_r)[None, :]
        tl.store(partial_ptr + (split * rows + offs_m[:, None]) * R + offs_r[None, :], acc,
                 mask=offs_m[:, None] < rows)

    return lora_down_fp8_kernel


# Launch configuration: programs of 64 rows over K slices of ~1024 columns (15 for a single block's K = 15360, 12 for
# 12288), 4 warps. A 512² step has too few rows for 128-row programs over ~2048-column slices (a single block's 1536
# rows: 96 programs for 132 SMs): in the sweep of 2026-12-04f (H200, scripts/gpu/probe_lora_down_fp8.py,
# benchmarks/results/2026-12-04f-h200-lora-down-fp8/probe/probe_lora_down_fp8.json, the partial sum included) this
# config against that one (128, 128, 2048, 8 warps, 3 stages) took 21.9 vs 25.3 us a 512² single-block call and
# 17.6 vs 25.9 a double block's image one (-0.29 ms a step), 52.7 vs 55.2 and 39.5 vs 41.6 at 1024² (-0.14 ms).
# Kernel figures; in a package unmeasured (`LEVERS=rebuilt` beside a package built before 2026-12-08 measures it).
BLOCK_M, BLOCK_K, K_PER_SLICE, NUM_WARPS, NUM_STAGES = 64, 128, 1024, 4, 3


def kernel_fits(rank: int) -> bool:
    """Whether the kernel takes rank `rank` (a `tl.dot` dimension: a power of two, 16 or more); else the op runs
    the reference, which reads q in float32 (correct, not fast)."""
    return dot_takes_rank(rank)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _split(k: int, block_k: int, per_slice: int) -> tuple[int, int]:
    """(columns per slice, a multiple of `block_k`; number of slices) for a K of `k`, slices of ~`per_slice`."""
    slices = max(1, round(k / per_slice))
    columns = _cdiv(_cdiv(k, slices), block_k) * block_k
    return columns, _cdiv(k, columns)


def _lora_down_fp8_triton(q: torch.Tensor, scale: torch.Tensor, a: torch.Tensor, a_scale: torch.Tensor | None = None,
                          dtype: torch.dtype | None = None, *, block_m: int = BLOCK_M, block_k: int = BLOCK_K,
                          per_slice: int = K_PER_SLICE, num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES,
                          dot_in_fp32: bool = False) -> torch.Tensor:
    """The kernel's `u` [..., R] in `dtype` (A's by default): `a` [R, K] in the LoRA dtype, or with `a_scale` A's FP8
    halves [2R, K] and their row scales (`fp8_hi_lo_rows`)."""
    from torch.library import wrap_triton

    halves = a_scale is not None
    q, a = q.contiguous(), a.contiguous()
    lead, k = q.shape[:-1], q.shape[-1]
    rank = a.shape[0] // 2 if halves else a.shape[0]
    rows = q.numel() // k
    columns, slices = _split(k, block_k, per_slice)
    partial = torch.empty(slices, rows, rank, dtype=torch.float32, device=q.device)
    wrap_triton(_kernel())[((rows + block_m - 1) // block_m, slices)](  # rows is symbolic in export
        q, a, a_scale.contiguous() if halves else a, partial, rows, K=k, R=rank, K_PER_SPLIT=columns, BLOCK_M=block_m,
        BLOCK_K=block_k, DOT_IN_FP32=dot_in_fp32, A_HALVES=halves, num_warps=num_warps, num_stages=num_stages)
    return (partial.sum(0) * scale.reshape(rows, 1)).to(dtype or a.dtype).reshape(*lead, rank)


def _lora_down_fp8(q: torch.Tensor, scale: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    if q.device.type == "cuda" and kernel_fits(a.shape[0]):
        return _lora_down_fp8_triton(q, scale, a)
    return lora_down_fp8_reference(q, scale, a)


lora_down_fp8 = register_triton_op("aotpack::lora_down_fp8", _lora_down_fp8)


def fp8_hi_lo_rows(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`a` [..., R, K] as `[A_hi; A_lo]` [..., 2R, K] FP8 and their float32 row scales [..., 1, 2R]: each row of A is
    `A_hi s_hi + A_lo s_lo` to FP8's rounding of the high part's rounding error (~2^-8 of the row's largest
    element). A zero row (a slot's unused rank) has scale `tiny` and zero codes. Row by row, so a batch of A's (the
    runtime's, one batch a weight shape) splits as each alone."""
    tiny = torch.finfo(torch.float32).tiny

    def rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = (x.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(tiny)
        return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale

    hi, hi_scale = rows(a.float())
    lo, lo_scale = rows(a.float() - hi.float() * hi_scale)
    return torch.cat([hi, lo], -2), torch.cat([hi_scale, lo_scale], -2).transpose(-1, -2)


def lora_down_fp8_dots_reference(q: torch.Tensor, scale: torch.Tensor, a8: torch.Tensor, a_scale: torch.Tensor,
                                 dtype: torch.dtype) -> torch.Tensor:
    """`u = (q * scale) (A_hi s_hi + A_lo s_lo)^T` in float32, rounded to `dtype`: `q` [..., K] FP8, `scale`
    [..., 1], `a8` [2R, K] and `a_scale` [1, 2R] as `fp8_hi_lo_rows` makes them; returns [..., R]."""
    u = F.linear(q.float(), a8.float()) * a_scale.reshape(-1)
    rank = a8.shape[0] // 2
    return ((u[..., :rank] + u[..., rank:]) * scale).to(dtype)


def _lora_down_fp8_dots(q: torch.Tensor, scale: torch.Tensor, a8: torch.Tensor, a_scale: torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor:
    if q.device.type == "cuda" and kernel_fits(a8.shape[0] // 2):
        return _lora_down_fp8_triton(q, scale, a8, a_scale, dtype)
    return lora_down_fp8_dots_reference(q, scale, a8, a_scale, dtype)


# recipe lever `lora_down_fp8_dots`: FP8 x FP8 tensor-core dots against A's halves, which the runtime writes at each
# switch (runtime/a_halves_bank.py); the program reads them as two more LoRA inputs of the slot
lora_down_fp8_dots = register_triton_op("aotpack::lora_down_fp8_dots", _lora_down_fp8_dots)


def program_lora_inputs(lora: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """`lora` (A and B by input name) as a program's LoRA inputs `names` (a region's `lora_names()`, in order):
    A's FP8 halves and scales, for the slots that read them, split from A as the runtime splits them."""
    made, suffix = {}, a_halves_input_names("")[0]
    for name in names:
        if name not in lora and name.endswith(suffix):
            slot = name.removesuffix(suffix)
            made.update(zip(a_halves_input_names(slot), fp8_hi_lo_rows(lora[lora_input_names(slot)[0]])))
    return {name: lora[name] if name in lora else made[name] for name in names}


def gemm_fits(rank: int) -> bool:
    """Whether the FP8 GEMM takes rank `rank`: cuBLASLt's FP8 GEMMs want N (2 x rank here) a multiple of 16."""
    return rank % 8 == 0


def lora_down_fp8_gemm(q: torch.Tensor, scale: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """`lora_down_fp8_reference`'s `u` as one FP8 GEMM (recipe lever `lora_down_fp8_gemm`): `q` [..., K] FP8 against
    `fp8_hi_lo_rows(a)`, q's row scales and A's applied by the GEMM, its two halves summed in float32 and rounded
    to A's dtype. A rank the GEMM does not take (`gemm_fits`) runs the op (`lora_down_fp8`)."""
    rank, k = a.shape
    if not gemm_fits(rank):
        return torch.ops.aotpack.lora_down_fp8(q, scale, a)
    a8, a_scale = fp8_hi_lo_rows(a)
    u = torch._scaled_mm(q.reshape(-1, k), a8.t(), scale_a=scale.reshape(-1, 1).float(), scale_b=a_scale,
                         out_dtype=torch.bfloat16).float()
    return (u[:, :rank] + u[:, rank:]).to(a.dtype).reshape(*q.shape[:-1], rank)


def lora_delta_from_fp8(layer: nn.Module, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A bound slot's `B (A x)` with `A x` taken from x's FP8 copy `q, scale` (`lora_down_fp8`; under the lever
    `lora_down_fp8_gemm` the FP8 GEMM of that name; under `lora_down_fp8_dots` `lora_down_fp8_dots` against A's FP8
    halves)."""
    if reads_a_halves(layer):  # recipe lever lora_down_fp8_dots
        a8, a_scale = layer.lora_A_fp8, layer.lora_A_fp8_scale
        if a8 is None:  # an eager run, given A alone: split here, as the runtime splits it after each switch
            a8, a_scale = fp8_hi_lo_rows(layer.lora_A)
        return F.linear(torch.ops.aotpack.lora_down_fp8_dots(q, scale, a8, a_scale, layer.lora_B.dtype), layer.lora_B)
    down = lora_down_fp8_gemm if getattr(layer, "lora_down_fp8_gemm", False) else torch.ops.aotpack.lora_down_fp8
    return F.linear(down(q, scale, layer.lora_A), layer.lora_B)


def reads_fp8_input(layer: nn.Module) -> bool:
    """Whether `mark_reads_fp8_input` marked `layer`'s LoRA down-projection to read the FP8 activation."""
    return getattr(layer, "lora_down_from_fp8", False)


def mark_reads_fp8_input(layer: nn.Module, gemm: bool = False, dots: bool = False) -> bool:
    """Mark a LoRA slot (the linear after a GELU that `fused_gelu_quant` routes) to take its down-projection from
    the FP8 input, by the FP8 GEMM if `gemm` (`lora_down_fp8_gemm`), by FP8 dots against A's halves as two more
    program inputs if `dots` (`lora_down_fp8_dots`); False (nothing marked) for a layer without a slot."""
    if not isinstance(layer, LoRASlotLinear):
        return False
    layer.lora_down_from_fp8 = True
    layer.lora_down_fp8_gemm = gemm
    layer.lora_down_fp8_dots = dots
    return True


def kernel_errors(device, rows: int = 300, dots: bool = False) -> dict[str, float]:
    """The op on `device` against `lora_down_fp8_reference` at a single block's K (15360) and a double block's
    (12288), rank 64, random FP8 codes and scales: relative L2 of u; with `dots` the FP8-dot op against its own
    reference too (`<case>_dots`). Without it that kernel is not compiled: a build without the lever never needs it."""
    generator = torch.Generator().manual_seed(0)
    errors = {}
    for name, k in (("single_block", 15360), ("double_block", 12288)):
        x = torch.randn(rows, k, generator=generator)
        scale = (x.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
        q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        a = (torch.randn(64, k, generator=generator) * k**-0.5).to(torch.bfloat16)
        q, scale, a = q.to(device), scale.to(device), a.to(device)
        errors[name] = relative_error(torch.ops.aotpack.lora_down_fp8(q, scale, a).float(),
                                      lora_down_fp8_reference(q, scale, a).float())
        if not dots:
            continue
        a8, a_scale = fp8_hi_lo_rows(a)  # the FP8-dot form (lever lora_down_fp8_dots)
        errors[f"{name}_dots"] = relative_error(
            torch.ops.aotpack.lora_down_fp8_dots(q, scale, a8, a_scale, a.dtype).float(),
            lora_down_fp8_dots_reference(q, scale, a8, a_scale, a.dtype).float())
    return errors


def check_kernel_against_reference(device, dots: bool = False) -> None:
    """`refuse_kernel_errors` for the FP8 LoRA down-projection kernel (once per build, on the GPU); with `dots` its
    FP8-dot form too (recipe lever `lora_down_fp8_dots`)."""
    refuse_kernel_errors("FP8 LoRA down-projection", "lora_down_fp8_dots" if dots else "lora_down_from_fp8", device,
                         kernel_errors(device, dots=dots))
