"""LoRA up-projections in one Triton kernel per group of slots: the recipe lever `group_lora_up`.

In slots every block linear adds `u B^T` (K = the rank) to its base output. cuBLAS runs each as its own bf16 GEMM,
418 of them in a FLUX.1-dev step plus a memset before each cooperative one, and its output (13.4 GB a 1024² step)
is the least they must write. The down-projections of slots that share an input already run as one matmul
(`group_lora_down`, builder/lora_grouping.py), which leaves their `u` side by side: `[u_1 | u_2 | ...]`.

`torch.ops.aotpack.lora_up(u, [B_1, ..., B_n])` returns `[u_1 B_1^T | ... | u_n B_n^T]` (one tensor, the outputs
side by side), u's last axis split by the B's ranks: a `torch.library.triton_op`. On CUDA one kernel launch writes
a group of up to four slots: program (m, t) finds its slot by its column tile, loads that slot's `u` rows and B rows,
one `tl.dot` with float32 accumulation, one store. Elsewhere, and as the reference, `lora_up_reference` does the same
in torch ops (what the CPU tests build and run). The build's graph pass
(`builder/lora_grouping.group_lora_up_projections`) puts the op where the programs had one `linear(u_j, B_j)` per slot
and splits its output into the slots' column views.

Why one output tensor: a first form wrote one tensor per slot through a pointer chosen per tile, and padded a group
of fewer than four slots by passing its first output again. Its H100 build on 2026-12-05 failed the build's checks:
every program with such a group (double blocks: 3 + 1 repeated; prologue, modulation: lone slots) gave garbage,
NaN among it, run to run; the single block, whose group has four distinct outputs, validated (1.6e-2). That fits
how Inductor runs a user kernel functionally: it clones each argument the kernel writes apart and keeps, for a
tensor passed twice, the clone the kernel never wrote. Here the kernel writes one tensor through one argument, and
only the read-only B pointers repeat.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .examples import relative_error
from .kernel_ops import dot_takes_rank, refuse_kernel_errors, register_triton_op

MAX_SLOTS_PER_LAUNCH = 4  # the kernel's B pointers; a larger group (none in Flux) runs the reference


def lora_up_reference(u: torch.Tensor, bs: list[torch.Tensor]) -> torch.Tensor:
    """`[u_1 B_1^T | ... | u_n B_n^T]` with `u = [u_1 | ... | u_n]` split by the B's ranks (their second axis)."""
    parts = torch.split(u, [b.shape[1] for b in bs], -1)
    return torch.cat([F.linear(part, b) for part, b in zip(parts, bs)], -1)


@functools.cache
def _kernel():
    """The Triton kernel, made on first use: the CPU-only install has no triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def lora_up_kernel(u_ptr, stride_u, rows, b0, b1, b2, b3, out_ptr, R: tl.constexpr,
                       N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, N3: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_IN_FP32: tl.constexpr):
        # program (m, t): column tile t of out = [u_0 B_0^T | u_1 B_1^T | ...] (widths N0..N3, unused ones 0);
        # slot j, the one whose columns hold tile t, reads u's columns [j R, (j + 1) R) and B_j. One output
        # tensor, stored through one pointer: Inductor sees which argument the kernel writes.
        pid_m, tile = tl.program_id(0), tl.program_id(1)
        t1: tl.constexpr = N0 // BLOCK_N
        t2: tl.constexpr = t1 + N1 // BLOCK_N
        t3: tl.constexpr = t2 + N2 // BLOCK_N
        j = (tile >= t1).to(tl.int32) + (tile >= t2).to(tl.int32) + (tile >= t3).to(tl.int32)
        first = tl.where(j == 0, 0, tl.where(j == 1, t1, tl.where(j == 2, t2, t3)))
        b_ptr = tl.where(j == 0, b0, tl.where(j == 1, b1, tl.where(j == 2, b2, b3)))  # read only
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # out's columns
        offs_r = tl.arange(0, R)
        in_rows = offs_m[:, None] < rows
        u = tl.load(u_ptr + offs_m[:, None] * stride_u + j * R + offs_r[None, :], mask=in_rows, other=0.0)
        b = tl.load(b_ptr + (offs_n - first * BLOCK_N)[:, None] * R + offs_r[None, :])  # [BLOCK_N, R]
        if DOT_IN_FP32:  # Triton's CPU interpreter multiplies bf16 wrongly (scripts/check_lora_down_fp8_kernel.py)
            acc = tl.dot(u.to(tl.float32), tl.trans(b).to(tl.float32))
        else:
            acc = tl.dot(u, tl.trans(b))
        tl.store(out_ptr + offs_m[:, None] * (N0 + N1 + N2 + N3) + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=in_rows)

    return lora_up_kernel


# Launch configuration: one K step (K = R), so tiles and warps matter, pipeline stages do not. 64 x 128 tiles with
# 4 warps were the fastest of 12 configurations for 12 of the 14 group shapes of a FLUX.1-dev step at 1024² and
# 512² (H100, 2026-12-05, scripts/gpu/probe_lora_up.py, benchmarks/results/2026-12-05d-h100-merge-share-lora-up/).
BLOCK_M, BLOCK_N, NUM_WARPS = 64, 128, 4


def kernel_fits(u: torch.Tensor, bs: list[torch.Tensor], block_n: int = BLOCK_N) -> bool:
    """Whether the kernel takes this group: at most `MAX_SLOTS_PER_LAUNCH` slots of one rank, a power of two of
    16 or more (a `tl.dot` dimension), every width a multiple of the column tile, u's columns contiguous, one
    dtype; else the op runs the reference."""
    rank = bs[0].shape[1]
    return (len(bs) <= MAX_SLOTS_PER_LAUNCH and dot_takes_rank(rank)
            and all(b.shape[1] == rank for b in bs) and all(b.shape[0] % block_n == 0 for b in bs)
            and u.shape[-1] == rank * len(bs) and u.stride(-1) == 1 and all(b.dtype == u.dtype for b in bs))


def _lora_up_triton(u: torch.Tensor, bs: list[torch.Tensor], *, block_m: int = BLOCK_M, block_n: int = BLOCK_N,
                    num_warps: int = NUM_WARPS, dot_in_fp32: bool = False) -> torch.Tensor:
    from torch.library import wrap_triton

    u2 = u.reshape(-1, u.shape[-1])
    rows = u2.shape[0]
    bs = [b.contiguous() for b in bs]
    widths = [b.shape[0] for b in bs] + [0] * (MAX_SLOTS_PER_LAUNCH - len(bs))
    out = torch.empty(rows, sum(widths), dtype=u.dtype, device=u.device)
    padded = bs + [bs[0]] * (MAX_SLOTS_PER_LAUNCH - len(bs))  # never read: their widths are 0
    wrap_triton(_kernel())[((rows + block_m - 1) // block_m, sum(widths) // block_n)](  # rows is symbolic in export
        u2, u2.stride(0), rows, *padded, out, R=bs[0].shape[1], N0=widths[0], N1=widths[1], N2=widths[2],
        N3=widths[3], BLOCK_M=block_m, BLOCK_N=block_n, DOT_IN_FP32=dot_in_fp32, num_warps=num_warps)
    return out.reshape(*u.shape[:-1], out.shape[-1])


def _lora_up(u: torch.Tensor, bs: list[torch.Tensor]) -> torch.Tensor:
    if u.device.type == "cuda" and kernel_fits(u, bs):
        return _lora_up_triton(u, bs)
    return lora_up_reference(u, bs)


lora_up = register_triton_op("aotpack::lora_up", _lora_up)


def kernel_errors(device, rows: int = 300) -> dict[str, float]:
    """The op on `device` against `lora_up_reference` for a single block's q/k/v/mlp group, a lone slot and a
    group of three (the kernel's unused B pointers), rank 64, random u and B: relative L2 of each output."""
    generator = torch.Generator().manual_seed(0)
    errors = {}
    for name, widths in (("single_block_group", (3072, 3072, 3072, 12288)), ("lone_slot", (3072,)),
                         ("three_slots", (256, 512, 768))):
        u = torch.randn(rows, 64 * len(widths), generator=generator).to(torch.bfloat16).to(device)
        bs = [(torch.randn(w, 64, generator=generator) * 0.1).to(torch.bfloat16).to(device) for w in widths]
        errors[name] = relative_error(torch.ops.aotpack.lora_up(u, bs).float(), lora_up_reference(u, bs).float())
    return errors


def check_kernel_against_reference(device) -> None:
    """`refuse_kernel_errors` for the LoRA up-projection kernel (once per build, on the GPU)."""
    refuse_kernel_errors("LoRA up-projection", "group_lora_up", device, kernel_errors(device))
