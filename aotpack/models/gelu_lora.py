"""The LoRA projections around each MLP GELU inside the GELU's quantization kernel: the recipe lever `fused_gelu_lora`.

In slots, the GELU quantization kernel (`fused_quant.py`) around a Flux MLP reads and writes two wide bf16 tensors
that only the LoRA branches need: the up-projection `B_in u_in` of the linear before the GELU (`ff.net.0.proj`,
`proj_mlp`: 12288 wide, written by a cuBLAS GEMM, read back by the kernel), and the GELU output itself, written a
second time in bf16 for the down-projection `A_out h` of the linear after it (`ff.net.2`, `proj_out`: 12288-15360
wide, read back by a cuBLAS GEMM). At 1024² the GELU kernel took 8.48 ms a slotted step against ~5.2 with no LoRA
(H200, 2026-12-05, random weights, `benchmarks/results/2026-12-05e-h200-lora-up-shares-512/`).

This op keeps both on chip, in two launches of one Triton kernel over (row block, column slice) programs. The first
forms each tile (pre + bias + `u_in B_in^T` by `tl.dot`, GELU), and writes its rows' maxima and its share of
`u_out = h A_out^T` as float32 partials; torch reduces them (fixed order: deterministic) into the row scales and
`u_out`; the second launch forms the tiles again and stores them in FP8. So the wide input is read twice (the
one-row kernel holds a whole row) and the up-projection computed twice, against two wide bf16 writes, two wide
reads and two GEMM launches saved. The first form, one program walking a row block's whole width twice, was
latency-bound and much slower (below, at the launch configuration).

Numerics: those of the unfused path (`reference`, what the CPU runs and the build compares with): the delta rounded
to the activation dtype before it is added, then the adds, GELU and quantization as `gelu_quant_reference`, and
`u_out` from the bf16 GELU output with float32 accumulation, rounded to the LoRA dtype. Only the summation order of
the two rank-R products differs from cuBLAS's.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .examples import relative_error
from .fp8_attention import FP8, FP8_MAX, MIN_SCALE
from .fused_quant import gelu_quant_reference
from .kernel_ops import dot_takes_rank, refuse_kernel_errors, register_triton_op


def reference(prefix: torch.Tensor, pre: torch.Tensor, bias: torch.Tensor, u_in: torch.Tensor, b_in: torch.Tensor,
              a_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(q, scale, u_out)`: `gelu_quant_reference` of `[prefix, gelu(pre + bias + u_in B_in^T)]` (the delta skipped
    when `u_in` is empty) and `u_out = h A_out^T` in A's dtype (empty when `a_out` is)."""
    delta = F.linear(u_in, b_in).to(pre.dtype) if u_in.numel() else pre.new_empty(0)
    q, scale, h = gelu_quant_reference(prefix, pre, bias, delta, a_out.numel() > 0)
    u_out = F.linear(h.to(a_out.dtype), a_out) if a_out.numel() else pre.new_empty(0)
    return q, scale, u_out


@functools.cache
def _kernel():
    """The Triton kernel, made on first use: the CPU-only install has no triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def gelu_lora_quant_kernel(prefix_ptr, pre_ptr, bias_ptr, u_in_ptr, b_in_ptr, a_out_ptr, amax_ptr, u_part_ptr,
                               scale_ptr, q_ptr, rows, PREFIX: tl.constexpr, WIDTH: tl.constexpr, R_IN: tl.constexpr,
                               R_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SLICE: tl.constexpr,
                               HAS_BIAS: tl.constexpr, HAS_UP: tl.constexpr, HAS_DOWN: tl.constexpr,
                               QUANTIZE: tl.constexpr, DOT_IN_FP32: tl.constexpr):
        # program (m, s): rows [m * BLOCK_M, +BLOCK_M) over columns [s * SLICE, +SLICE) of h. First launch
        # (QUANTIZE false): the rows' maxima and u_out = h A^T over the slice, as float32 partials [s, row(, R)].
        # Second launch: the same tiles again, stored in FP8 with the rows' scales.
        total: tl.constexpr = PREFIX + WIDTH
        offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        piece = tl.program_id(1)
        row_ok = offs_m < rows
        if HAS_UP:
            u_in = tl.load(u_in_ptr + offs_m[:, None] * R_IN + tl.arange(0, R_IN)[None, :], mask=row_ok[:, None],
                           other=0.0)
        if QUANTIZE:
            scale = tl.load(scale_ptr + offs_m, mask=row_ok, other=1.0)
        else:
            amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
            u_out = tl.zeros((BLOCK_M, R_OUT), dtype=tl.float32)
        for k0 in range(0, SLICE, BLOCK_K):
            # the tile [BLOCK_M, BLOCK_K] of h = [prefix, gelu(pre + bias + delta)]
            cols = piece * SLICE + k0 + tl.arange(0, BLOCK_K)
            in_prefix = cols < PREFIX
            in_pre = (cols >= PREFIX) & (cols < total)
            a = tl.load(prefix_ptr + offs_m[:, None] * PREFIX + cols[None, :],
                        mask=row_ok[:, None] & in_prefix[None, :], other=0.0).to(tl.float32)
            x = tl.load(pre_ptr + offs_m[:, None] * WIDTH + (cols - PREFIX)[None, :],
                        mask=row_ok[:, None] & in_pre[None, :], other=0.0).to(tl.float32)
            if HAS_BIAS:  # each add rounded to the activation dtype as the eager adds round
                x += tl.load(bias_ptr + (cols - PREFIX), mask=in_pre, other=0.0).to(tl.float32)[None, :]
                x = x.to(pre_ptr.dtype.element_ty).to(tl.float32)
            if HAS_UP:
                b = tl.load(b_in_ptr + (cols - PREFIX)[:, None] * R_IN + tl.arange(0, R_IN)[None, :],
                            mask=in_pre[:, None], other=0.0)  # [BLOCK_K, R_IN]
                if DOT_IN_FP32:  # Triton's CPU interpreter multiplies bf16 wrongly
                    delta = tl.dot(u_in.to(tl.float32), tl.trans(b).to(tl.float32))
                else:
                    delta = tl.dot(u_in, tl.trans(b))
                x += delta.to(pre_ptr.dtype.element_ty).to(tl.float32)  # the delta in bf16, as F.linear returns it
                x = x.to(pre_ptr.dtype.element_ty).to(tl.float32)
            g = x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))  # tanh GELU as x * sigmoid(2u)
            h = tl.where(in_prefix[None, :], a, g).to(pre_ptr.dtype.element_ty)
            if QUANTIZE:
                q = tl.clamp(h.to(tl.float32) / scale[:, None], -448.0, 448.0)
                tl.store(q_ptr + offs_m[:, None] * total + cols[None, :], q.to(q_ptr.dtype.element_ty),
                         mask=row_ok[:, None] & (cols < total)[None, :])
            else:
                amax = tl.maximum(amax, tl.max(tl.abs(h.to(tl.float32)), axis=1))
                if HAS_DOWN:
                    w = tl.load(a_out_ptr + tl.arange(0, R_OUT)[:, None] * total + cols[None, :],
                                mask=(cols < total)[None, :], other=0.0)  # [R_OUT, BLOCK_K]
                    if DOT_IN_FP32:
                        u_out = tl.dot(h.to(tl.float32), tl.trans(w).to(tl.float32), u_out)
                    else:
                        u_out = tl.dot(h, tl.trans(w), u_out)
        if not QUANTIZE:
            tl.store(amax_ptr + piece * rows + offs_m, amax, mask=row_ok)
            if HAS_DOWN:
                tl.store(u_part_ptr + (piece * rows + offs_m[:, None]) * R_OUT + tl.arange(0, R_OUT)[None, :], u_out,
                         mask=row_ok[:, None])

    return gelu_lora_quant_kernel


# Launch configuration: a first choice for the width-split form (not yet run on a GPU). 1024 columns a slice give a
# 1024² single block 72 x 15 programs of 64 rows. The first form, one program walking a row block's whole width
# twice, was latency-bound: 37.06 ms a 1024² step against 13.19 for the path it replaces at its best configuration
# (H200, 2026-12-05, 0eae70d; scripts/gpu/probe_gelu_lora.py, benchmarks/results/2026-12-05f-h200-gelu-lora/).
BLOCK_M, BLOCK_K, SLICE, NUM_WARPS = 64, 64, 1024, 4


def kernel_fits(pre: torch.Tensor, u_in: torch.Tensor, b_in: torch.Tensor, a_out: torch.Tensor) -> bool:
    """Whether the kernel takes these inputs: bf16/fp16 throughout (the dots take one dtype), and each present rank a
    power of two of 16 or more (a `tl.dot` dimension). Elsewhere the op runs `reference`."""
    ranks = ([u_in.shape[-1]] if u_in.numel() else []) + ([a_out.shape[0]] if a_out.numel() else [])
    factors = [t for t in (u_in, b_in, a_out) if t.numel()]
    return (pre.dtype in (torch.bfloat16, torch.float16) and all(t.dtype == pre.dtype for t in factors)
            and all(dot_takes_rank(r) for r in ranks))


def _triton(prefix: torch.Tensor, pre: torch.Tensor, bias: torch.Tensor, u_in: torch.Tensor, b_in: torch.Tensor,
            a_out: torch.Tensor, *, block_m: int = BLOCK_M, block_k: int = BLOCK_K, slice_columns: int = SLICE,
            num_warps: int = NUM_WARPS, dot_in_fp32: bool = False):
    from torch.library import wrap_triton

    prefix, pre, bias, u_in, b_in, a_out = (t.contiguous() for t in (prefix, pre, bias, u_in, b_in, a_out))
    lead, width, prefix_width = pre.shape[:-1], pre.shape[-1], prefix.shape[-1]
    total = prefix_width + width
    rows = pre.numel() // width
    has_up, has_down = u_in.numel() > 0, a_out.numel() > 0
    r_in, r_out = (u_in.shape[-1] if has_up else 16), (a_out.shape[0] if has_down else 16)
    slice_columns = -(-min(slice_columns, total) // block_k) * block_k  # whole tiles
    slices = -(-total // slice_columns)
    amax = torch.empty(slices, rows, dtype=torch.float32, device=pre.device)
    u_part = torch.empty(slices, rows, r_out, dtype=torch.float32, device=pre.device) if has_down else amax
    q = torch.empty(*lead, total, dtype=FP8, device=pre.device)
    kernel = wrap_triton(_kernel())[((rows + block_m - 1) // block_m, slices)]  # rows is symbolic in export

    def launch(scale: torch.Tensor, quantize: bool) -> None:
        # an absent input's pointer is never read (its flag is off): `pre` stands in for it
        kernel(prefix if prefix_width else pre, pre, bias if bias.numel() else pre, u_in if has_up else pre,
               b_in if has_up else pre, a_out if has_down else pre, amax, u_part, scale, q, rows, PREFIX=prefix_width,
               WIDTH=width, R_IN=r_in, R_OUT=r_out, BLOCK_M=block_m, BLOCK_K=block_k, SLICE=slice_columns,
               HAS_BIAS=bias.numel() > 0, HAS_UP=has_up, HAS_DOWN=has_down, QUANTIZE=quantize,
               DOT_IN_FP32=dot_in_fp32, num_warps=num_warps)

    launch(amax, False)
    # amax / 448 rounded to the activation dtype (torchao's eager scale, as quantize_rows), floored for all-zero rows
    scale = (amax.amax(0) / FP8_MAX).to(pre.dtype).float().clamp_min(MIN_SCALE)
    launch(scale, True)
    u_out = u_part.sum(0).to(a_out.dtype).reshape(*lead, r_out) if has_down else pre.new_empty(0)
    return q, scale.reshape(*lead, 1), u_out


def _gelu_lora_quant_fp8(prefix: torch.Tensor, pre: torch.Tensor, bias: torch.Tensor, u_in: torch.Tensor,
                         b_in: torch.Tensor, a_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if pre.device.type == "cuda" and kernel_fits(pre, u_in, b_in, a_out):
        return _triton(prefix, pre, bias, u_in, b_in, a_out)
    return reference(prefix, pre, bias, u_in, b_in, a_out)


gelu_lora_quant_fp8 = register_triton_op("aotpack::gelu_lora_quant_fp8", _gelu_lora_quant_fp8)


def example_inputs(rows: int, prefix_width: int, width: int, rank: int, *, has_up: bool = True,
                   has_down: bool = True, device="cpu", seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random bf16 inputs of the op at one shape, scaled as a block's activations and an r-`rank` LoRA's factors."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return (std * torch.randn(*shape, generator=generator)).to(device, torch.bfloat16)

    return (rand(rows, prefix_width, std=3.0), rand(rows, width, std=3.0), rand(width),
            rand(rows, rank if has_up else 0), rand(width if has_up else 0, rank, std=0.05),
            rand(rank if has_down else 0, prefix_width + width, std=(prefix_width + width) ** -0.5))


def kernel_errors(device, rows: int = 257) -> dict[str, float]:
    """The op on `device` against `reference` at a single block's shapes (prefix 3072, width 12288) and a double
    block's (no prefix), with both projections, only the up or only the down one; rank 64: the worst relative L2 of
    the dequantized output and of `u_out`."""
    errors = {}
    for name, prefix_width, has_up, has_down in (("single_block", 3072, True, True), ("double_block", 0, True, True),
                                                 ("up_only", 0, True, False), ("down_only", 3072, False, True)):
        inputs = example_inputs(rows, prefix_width, 12288, 64, has_up=has_up, has_down=has_down, device=device)
        q, scale, u_out = torch.ops.aotpack.gelu_lora_quant_fp8(*inputs)
        q_ref, scale_ref, u_ref = reference(*inputs)
        error = relative_error(q.float() * scale, q_ref.float() * scale_ref)
        errors[name] = max(error, relative_error(u_out.float(), u_ref.float())) if has_down else error
    return errors


def check_kernel_against_reference(device) -> None:
    """`refuse_kernel_errors` for the GELU + LoRA quantization kernel (once per build, on the GPU)."""
    refuse_kernel_errors("GELU + LoRA quantization", "fused_gelu_lora", device, kernel_errors(device))
