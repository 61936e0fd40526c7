"""The LoRA up-projection in the epilogue of the FP8 base GEMM: the recipe lever `lora_up_in_gemm`.

In slots each block linear runs cuBLAS's row-wise FP8 GEMM, which writes its output, then a bf16 GEMM
`delta = u B^T` (K = the rank) which writes a second tensor as wide, and the next kernel (the q/k kernel, the GELU
kernel, Inductor's residual add) reads both: 13.4 GB of deltas written and read again a 1024² step of FLUX.1-dev.

`torch.ops.aotpack.fp8_linear_lora(q, q_scale, weight, weight_scale, bias, u, b, fast_accum)` returns the whole
`q W^T * scales + bias + u B^T` in one tensor: on CUDA one persistent Triton kernel (a program per SM walking the
output tiles; tiles moved by TMA descriptors made on the device), whose epilogue scales the FP8 accumulator, adds
the bias and `u B^T` (one more `tl.dot` over the rank) before the one store. Elsewhere, and as the reference, the
torch ops the unfused path runs (`reference`, what the CPU tests build and compare bit for bit).

Why a hand-written GEMM: cuBLASLt's epilogues take no second GEMM. Where it pays (`MIN_IN_FEATURES`, below): against
cuBLAS with fast accumulation, as the package runs it, only at K >= 12288; over all 304 large linears of a 1024² step
it lost (H200, 2026-12-05: 53.19 against cuBLAS + the bf16 up GEMM's 51.03 ms; `scripts/gpu/probe_fp8_tma_epilogue.py`,
`benchmarks/results/2026-12-05g-h100-h200-gemm-lora/`). Inductor's own persistent TMA templates lost to cuBLAS at
every shape; a pointer-based Triton GEMM (2026-12-02) was 9% behind cuBLAS without fast accumulation.

Numerics: float32 accumulation, one rounding to the output dtype after the scales, the bias and `u B^T` are added
(the unfused path rounds the GEMM output, the bias add and the delta each). `fast_accum` follows the weight's torchao
`mm_config` (on by default, as the package's cuBLAS GEMMs run): the FP8 products accumulate in the tensor core's
accumulator; off, each K tile's product is added to a float32 accumulator.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from .examples import relative_error
from .fp8_attention import FP8
from .kernel_ops import dot_takes_rank, refuse_kernel_errors, register_triton_op

# Where the op replaces cuBLAS: the linears of K >= 12288 (after the MLP GELUs: ff.net.2, proj_out). On the H200
# (2026-12-05, `scripts/gpu/probe_fp8_tma_epilogue.py`, one process, fast accumulation as the package runs) it beat
# cuBLAS + the bf16 up GEMM there (4608 x 15360 -> 3072: 0.376 vs 0.394 ms; 4096 x 12288 -> 3072: 0.252 vs 0.262)
# and lost at K = 3072 (4608 x 3072 -> 12288: 0.353 vs 0.315; -> 3072: 0.085 vs 0.078), where cuBLAS's fast-accum
# GEMM is 15-29% ahead of this kernel's.
MIN_IN_FEATURES = 12288

# One tile shape for every Flux shape: the fastest of six with the LoRA epilogue at five of the six large 1024² shapes
# (H100, 2026-12-05, the probe's first version; BLOCK_N 256 won without the LoRA).
BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, NUM_WARPS, NUM_STAGES = 128, 128, 128, 8, 8, 4
# The LoRA tiles load after the K loop (their latency not hidden: the epilogue cost 3.8 ms over the 304 linears on the
# H200, 2026-12-05). Loading them before it is an option the probe times (`prefetch_lora`), not yet measured.
PREFETCH_LORA = False


def reference(q: torch.Tensor, q_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
              bias: torch.Tensor, u: torch.Tensor, b: torch.Tensor, fast_accum: bool) -> torch.Tensor:
    """What the unfused path computes: torchao's row-wise `_scaled_mm` (output in u's dtype), then the bias and the
    delta `u B^T` rounded to the output dtype, added in that order (`fused_quant.epilogue_sum`); each skipped when
    empty."""
    y = torch._scaled_mm(q.reshape(-1, q.shape[-1]), weight.t(), scale_a=q_scale.reshape(-1, 1),
                         scale_b=weight_scale.reshape(1, -1), out_dtype=u.dtype, use_fast_accum=fast_accum)
    y = y.reshape(*q.shape[:-1], weight.shape[0])
    if bias.numel():
        y = y + bias
    if b.numel():
        y = y + F.linear(u, b).to(y.dtype)
    return y


@functools.cache
def _kernel():
    """The Triton kernel, made on first use: the CPU-only install has no triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def fp8_linear_lora_kernel(q_ptr, q_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, u_ptr, stride_u, b_ptr, y_ptr, M,
                               N: tl.constexpr, K: tl.constexpr, R: tl.constexpr, PROGRAMS: tl.constexpr,
                               HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, FAST_ACCUM: tl.constexpr,
                               PREFETCH_LORA: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                               GROUP: tl.constexpr):
        # y[M, N] = q_scale[m] w_scale[n] (q[M, K] W[N, K]^T) (+ bias[n]) (+ u[M, R] B[N, R]^T). The TMA descriptors
        # are made here, on the device, in scratch memory one slot a program (builder/aoti_scratch.py); host-made
        # ones do not compile inside a torch 2.11 program.
        q_desc = tl.make_tensor_descriptor(q_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
        y_desc = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
        if HAS_LORA:
            u_desc = tl.make_tensor_descriptor(u_ptr, shape=[M, R], strides=[stride_u, 1], block_shape=[BM, R])
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, R], strides=[R, 1], block_shape=[BN, R])
        num_pid_m = tl.cdiv(M, BM)
        num_pid_n: tl.constexpr = (N + BN - 1) // BN
        start = tl.program_id(0)
        tile_out = start - PROGRAMS  # the epilogue's own tile counter, as Triton's persistent matmul tutorial keeps
        in_group = GROUP * num_pid_n  # tiles in grouped order: GROUP row tiles share their weight tiles in L2
        for tile in tl.range(start, num_pid_m * num_pid_n, PROGRAMS, flatten=True):
            first_m = (tile // in_group) * GROUP
            pid_m = first_m + (tile % in_group) % min(num_pid_m - first_m, GROUP)
            pid_n = (tile % in_group) // min(num_pid_m - first_m, GROUP)
            if HAS_LORA and PREFETCH_LORA:  # the LoRA tiles requested before the K loop, held until the epilogue
                u_tile = u_desc.load([pid_m * BM, 0])
                b_tile = b_desc.load([pid_n * BN, 0])
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k in range(0, K, BK):
                a = q_desc.load([pid_m * BM, k])
                w = w_desc.load([pid_n * BN, k])
                if FAST_ACCUM:
                    acc = tl.dot(a, w.T, acc)
                else:
                    acc += tl.dot(a, w.T)
            tile_out += PROGRAMS
            first_m = (tile_out // in_group) * GROUP
            pid_m = first_m + (tile_out % in_group) % min(num_pid_m - first_m, GROUP)
            pid_n = (tile_out % in_group) // min(num_pid_m - first_m, GROUP)
            offs_m = pid_m * BM + tl.arange(0, BM)
            offs_n = pid_n * BN + tl.arange(0, BN)
            acc = acc * tl.load(q_scale_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
            acc = acc * tl.load(w_scale_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            if HAS_LORA:
                if not PREFETCH_LORA:
                    u_tile = u_desc.load([pid_m * BM, 0])
                    b_tile = b_desc.load([pid_n * BN, 0])
                acc = tl.dot(u_tile, b_tile.T, acc)
            y_desc.store([pid_m * BM, pid_n * BN], acc.to(y_ptr.dtype.element_ty))

    return fp8_linear_lora_kernel


def kernel_fits(q: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the kernel takes these inputs: FP8 e4m3 operands, a bf16/fp16 output and LoRA, a rank that is a
    `tl.dot` dimension (256 at most: a TMA box's side), and every row 16-byte aligned for the TMA (K and N multiples
    of 16). Elsewhere the op runs `reference`."""
    k, n = q.shape[-1], weight.shape[0]
    lora_ok = not b.numel() or (dot_takes_rank(b.shape[1]) and b.shape[1] <= 256 and b.dtype == u.dtype)
    return (q.dtype == FP8 and weight.dtype == FP8 and u.dtype in (torch.bfloat16, torch.float16) and lora_ok
            and k % 16 == 0 and n % 16 == 0)


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, device="cuda", dtype=torch.int8)


@contextlib.contextmanager
def _descriptor_scratch():
    """Triton's allocator for device-made TMA descriptors, set only around an eager launch (a package's launches get
    their scratch from AOTInductor): a library leaves the caller's triton settings as it found them."""
    from triton.runtime import _allocation

    token = _allocation._allocator.set(_scratch)
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


def _triton(q: torch.Tensor, q_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
            bias: torch.Tensor, u: torch.Tensor, b: torch.Tensor, fast_accum: bool,
            prefetch_lora: bool = PREFETCH_LORA) -> torch.Tensor:
    from torch.library import wrap_triton

    k, n = q.shape[-1], weight.shape[0]
    q2 = q.reshape(-1, k).contiguous()
    rows = q2.shape[0]
    q_scale = q_scale.reshape(-1).contiguous()
    has_lora = b.numel() > 0
    u2 = u.reshape(-1, u.shape[-1]) if has_lora else q2
    if has_lora and (u2.stride(-1) != 1 or (u2.stride(0) * u2.element_size()) % 16
                     or (u2.storage_offset() * u2.element_size()) % 16):
        u2 = u2.contiguous()  # a TMA descriptor needs a unit last stride, 16-byte rows and a 16-byte aligned start
    y = torch.empty(rows, n, dtype=u.dtype, device=q.device)
    programs = torch.cuda.get_device_properties(q.device).multi_processor_count  # persistent: one per SM
    # placeholders for absent inputs (their flags are off, never read) are inputs, never the output: Inductor
    # handles a tensor the kernel writes passed once (lora_up.py)
    with _descriptor_scratch():
        wrap_triton(_kernel())[(programs,)](
            q2, q_scale, weight.contiguous(), weight_scale.reshape(-1).contiguous(),
            bias if bias.numel() else q_scale, u2, u2.stride(0), b.contiguous() if has_lora else q2, y, rows,
            N=n, K=k, R=b.shape[1] if has_lora else 16, PROGRAMS=programs, HAS_BIAS=bias.numel() > 0,
            HAS_LORA=has_lora, FAST_ACCUM=fast_accum, PREFETCH_LORA=prefetch_lora, BM=BLOCK_M, BN=BLOCK_N,
            BK=BLOCK_K, GROUP=GROUP_M, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return y.reshape(*q.shape[:-1], n)


def _fp8_linear_lora(q: torch.Tensor, q_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor, u: torch.Tensor, b: torch.Tensor, fast_accum: bool) -> torch.Tensor:
    if q.device.type == "cuda" and kernel_fits(q, weight, u, b):
        return _triton(q, q_scale, weight, weight_scale, bias, u, b, fast_accum)
    return reference(q, q_scale, weight, weight_scale, bias, u, b, fast_accum)


fp8_linear_lora = register_triton_op("aotpack::fp8_linear_lora", _fp8_linear_lora)


def example_inputs(rows: int, k: int, n: int, rank: int, device="cpu", seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs of the op at one shape: row-wise FP8 activation and weight with their float32 scales, a bf16
    bias, an r-`rank` LoRA's `u` and B scaled as a LoRA moving the output by a few percent."""
    generator = torch.Generator().manual_seed(seed)

    def rowwise(x):
        scale = x.abs().amax(-1, keepdim=True) / 448.0
        return (x / scale).to(FP8).to(device), scale.to(device)

    q, q_scale = rowwise(torch.randn(rows, k, generator=generator))
    weight, weight_scale = rowwise(torch.randn(n, k, generator=generator) * k ** -0.5)
    bias = (0.1 * torch.randn(n, generator=generator)).to(device, torch.bfloat16)
    u = torch.randn(rows, rank, generator=generator).to(device, torch.bfloat16)
    b = (0.02 * torch.randn(n, rank, generator=generator)).to(device, torch.bfloat16)
    return q, q_scale, weight, weight_scale, bias, u, b


def kernel_errors(device, rows: int = 300) -> dict[str, float]:
    """The op on `device` against `reference` at a double block's q/k/v shape, the single block's MLP up-projection
    and its proj_out (K = 15360), with a LoRA of rank 64, and without LoRA or bias: relative L2 of each output."""
    errors = {}
    for name, k, n, lora in (("qkv", 3072, 3072, True), ("mlp_up", 3072, 12288, True),
                             ("proj_out", 15360, 3072, True), ("no_lora", 3072, 3072, False)):
        q, q_scale, weight, weight_scale, bias, u, b = example_inputs(rows, k, n, 64, device=device)
        if not lora:
            bias, u, b = bias[:0], u[:, :0], b[:0]
        for fast_accum in (True, False):
            args = (q, q_scale, weight, weight_scale, bias, u, b, fast_accum)
            errors[f"{name}{'' if fast_accum else '_precise'}"] = relative_error(
                torch.ops.aotpack.fp8_linear_lora(*args).float(), reference(*args).float())
    return errors


def check_kernel_against_reference(device) -> None:
    """`refuse_kernel_errors` for the FP8 GEMM + LoRA kernel (once per build, on the GPU)."""
    refuse_kernel_errors("FP8 GEMM + LoRA up-projection", "lora_up_in_gemm", device, kernel_errors(device))
