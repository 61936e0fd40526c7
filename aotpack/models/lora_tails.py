"""A LoRA as three FP8 tails of its base GEMM's K: the math and the activation-rows op.

In slots a linear runs its FP8 GEMM, a bf16 up GEMM writes `u B^T` (u = A x) as wide as the output, and the next
kernel reads both. With tails the FP8 GEMM computes the whole `x W^T + u B^T` in one accumulator:

    y = (H s_x) s_w [q / H | u_hi | u_lo | u_hi | 0] [W | B_hi | B_hi | B_lo | 0]^T

- `q, s_x`: the input's row-wise FP8 quantization, as the block's quantization kernel writes it; `H` each row's
  power-of-two headroom, the least that keeps that row's tails in FP8's range (`row_headroom`; `q / H` is exact
  above FP8's normal range);
- `t = u / (H s_x)` split into `u_hi = fp8(t)` and `u_lo = fp8(t - u_hi)`; `B c / s_w` likewise into `B_hi`, `B_lo`,
  with a power-of-two factor c_j per rank component folded into A (`column_factors`). The `lo x lo` term is left out
  (~2^-8 of the delta): the whole output's error equals slots' (2026-12-06b, 2026-12-07d);
- K + 3R padded to K + `TAIL_COLUMNS` (= K + 256 for rank 64): at K + 192 the tail GEMMs ran 3-6% slower, and the
  weight stored `[out, in + 256]` lets the no-slot GEMMs read its base columns as a view at no cost, where an
  `[out, in + 192]` view cost them 1.0-1.6 ms a 1024² step (H100, `benchmarks/results/2026-12-07d-h100-tails-block/`).

Measured piece by piece there: -2.0 to -2.2 ms a 512² step and -2.3 to -3.0 at 1024² against slots. This module
holds the weight side (`weight_tail`, `column_factors`) and `aotpack::tailed_rows`, one launch per group of linears
that read one input: every reader's rows `[q / H | tails]` and row scales, written from `q` and the group's
down-projection output, so no quantization kernel changes. On an H100 its first form (one H for every row) wrote the
torch reference's bytes and took 31.5 us for a single block's four readers at 1024² (9.5 at 512²), 6.7 us for a
double block's MLP-in; for the readers of K >= 12288 (MLP-out, `proj_out`) copying q costs 48-64 us, more than their
tails gain, so those would need their GELU kernel to write the rows
(`benchmarks/results/2026-12-07e-h100-tailed-rows-kernel/`). The programs that use it: `tail_groups.py`.

With `paired` (recipe lever `lora_tails_paired`, off: unmeasured; the kernel's `SIDES` 2) readers 2p and 2p + 1
share one buffer `[tail_2p | q / H | tail_2p+1]`, each GEMM reading its view (`reader_rows`, row stride
K + 2 x 256), the first reader's tailed weight stored `[tail | W]` to match (`tail_first`): the kernel writes
`q / H` once a pair.
"""

from __future__ import annotations

import functools
import math

import torch

from .examples import relative_error
from .fp8_attention import FP8, FP8_MAX
from .kernel_ops import refuse_kernel_errors, register_triton_op

TAIL_RANK = 64  # the rank the tails hold; a set of higher rank stays in slots
TAIL_COLUMNS = 256  # 3 x TAIL_RANK = 192, padded to a multiple of 128 (see the module docstring)
# H, each row's headroom: the least power of two >= MIN_HEADROOM that keeps that row's tails in FP8's range for
# every reader, chosen by `tailed_rows` from the row's own `u` (so no LoRA is refused and nothing is clamped).
# As small as it can be: q / H loses bits below FP8's normal range and t = u / (H s_x) loses them likewise. A fixed
# H (16 or 64) needed the worst-case bound ||A_j||_1 amax(x) <= H c at each switch, which refused the benches' r64
# LoRA at factor std 0.4 by ~8x and the tiny demo's attention LoRA at H = 16.
MIN_HEADROOM = 1.0


def column_factors(weight_scale: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """One factor per rank component, [..., R], each the largest power of two (at most 2^64: an all-zero column
    stays finite) that keeps its column of `B c_j / s_w` within FP8's range (`weight_scale` [..., out, 1],
    `lora_b` [..., out, R]). A LoRA is the same LoRA with A_j multiplied and B's column j divided by any c_j, so the
    runtime passes `A_j / c_j` and the tail holds `B_j c_j / s_w`: the programs need no factor, and each
    component's `t_j` is as small as its own column allows (one c for the layer, set by its largest column, made
    the other components' `t_j` larger and so each row's headroom). A power of two keeps `A_j / c_j` exact in
    bf16."""
    b_abs = lora_b.abs().float().clamp_min(torch.finfo(torch.float32).tiny)
    largest = (weight_scale.float() * FP8_MAX / b_abs).amin(dim=-2)
    return torch.exp2(torch.floor(torch.log2(largest.clamp(max=2.0 ** 64))))


def _hi_lo(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`value` (float32, in FP8's range) as an FP8 high part and the FP8 rounding of the rest."""
    hi = value.to(FP8)
    return hi, (value - hi.float()).to(FP8)


def weight_tail(lora_b: torch.Tensor, weight_scale: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """`[B_hi | B_hi | B_lo | 0]`, [..., out, TAIL_COLUMNS] FP8: the columns a tailed weight stores after its base
    (`lora_b` [..., out, R <= TAIL_RANK], zero-padded to TAIL_RANK; `factor` broadcast against it:
    `column_factors(...)[..., None, :]`)."""
    *lead, out_features, rank = lora_b.shape
    if rank > TAIL_RANK:
        raise ValueError(f"a rank-{rank} LoRA does not fit the tails (rank {TAIL_RANK} at most)")
    scaled = torch.zeros(*lead, out_features, TAIL_RANK, dtype=torch.float32, device=lora_b.device)
    scaled[..., :rank] = lora_b.float() * factor.float() / weight_scale.float()
    hi, lo = _hi_lo(scaled)
    pad = torch.zeros(*lead, out_features, TAIL_COLUMNS - 3 * TAIL_RANK, dtype=FP8, device=lora_b.device)
    return torch.cat([hi, hi, lo, pad], dim=-1)


def row_headroom(u: torch.Tensor, scale: torch.Tensor, factors: torch.Tensor,
                 min_headroom: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, 1 / H), [T, 1] float32 powers of two: for each row the least H >= `min_headroom` with
    `max_j |u_ij| / (H s_x c_i) <= 448` for every reader i (`u` [T, n * TAIL_RANK] the group's, `scale` [T, 1] the
    input's row scales, `factors` [n]), at most 2^126. One H a row for all readers: they share one row-scale tensor,
    as the base GEMM's (per-reader row scales, slices of one buffer, failed in cuBLASLt at 530 rows on an H100,
    2026-12-07: CUBLAS_STATUS_NOT_SUPPORTED 16 bytes aligned, "Invalid scaling configuration" 256 bytes aligned).
    The kernel computes the same exponent from the bits of the same float32 quotients."""
    need = torch.stack([u[:, TAIL_RANK * i:TAIL_RANK * (i + 1)].float().abs().amax(dim=-1, keepdim=True)
                        / (scale * factors[i] * FP8_MAX) for i in range(factors.numel())]).amax(dim=0)
    mantissa, exponent = torch.frexp(need)
    ceil_log2 = torch.where(mantissa == 0.5, exponent - 1, exponent)  # need == 0: mantissa 0, exponent 0
    k = ceil_log2.clamp(int(math.log2(min_headroom)), 126)
    one = torch.ones_like(need)
    return torch.ldexp(one, k), torch.ldexp(one, -k)


def reader_factors(u: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """`factors`, or for an empty one (the programs' "every c is 1": the runtime folds them into A, and an empty
    tensor costs no fill kernel a call) one 1.0 a reader of `u` [T, n * TAIL_RANK]."""
    if factors.numel():
        return factors
    return torch.ones(u.shape[-1] // TAIL_RANK, dtype=torch.float32, device=u.device)


def check_pairs(readers: int, paired: bool) -> None:
    """Refuse `paired` rows for an odd number of readers (a pair shares one copy of `q / H`)."""
    if paired and readers % 2:
        raise ValueError(f"paired tailed rows need an even number of readers, not {readers}")


def tail_first(position: int, paired: bool) -> bool:
    """Whether reader `position`'s rows and tailed weight hold the tail before the base columns, `[tail | W]`: the
    first of each pair (`paired`), which shares its `q / H` columns with the second's `[W | tail]`."""
    return paired and position % 2 == 0


def tail_columns(tailed: torch.Tensor, position: int, paired: bool) -> torch.Tensor:
    """The tail columns of reader `position`'s tailed weight or rows (`[..., in + TAIL_COLUMNS]`), a view."""
    return tailed[..., :TAIL_COLUMNS] if tail_first(position, paired) else tailed[..., -TAIL_COLUMNS:]


def base_columns(tailed: torch.Tensor, position: int, paired: bool) -> torch.Tensor:
    """The base columns of reader `position`'s tailed weight or rows, a view."""
    return tailed[..., TAIL_COLUMNS:] if tail_first(position, paired) else tailed[..., :-TAIL_COLUMNS]


def reader_rows(rows: torch.Tensor, position: int, paired: bool) -> torch.Tensor:
    """Reader `position`'s GEMM rows [T, K + TAIL_COLUMNS] out of `tailed_rows`' output: its own buffer, or with
    `paired` a view of its pair's `[tail_a | q / H | tail_b]` (row stride K + 2 TAIL_COLUMNS)."""
    if not paired:
        return rows[position]
    start = 0 if tail_first(position, paired) else TAIL_COLUMNS
    return rows[position // 2][:, start:start + rows.shape[-1] - TAIL_COLUMNS]


def tailed_rows_reference(q: torch.Tensor, scale: torch.Tensor, u: torch.Tensor, factors: torch.Tensor,
                          min_headroom: float, paired: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Every reader's GEMM rows and their row scale: `q` [T, K] FP8 and `scale` [T, 1] float32 (the input's
    row-wise quantization), `u` [T, n * TAIL_RANK] (the group's down-projection, reader i's in columns
    i * TAIL_RANK ..), `factors` [n] float32 (each reader's c; empty: all 1, `reader_factors`). Returns rows
    [n, T, K + TAIL_COLUMNS] FP8 (`[q / H | tail_i]`; with `paired` [n / 2, T, K + 2 TAIL_COLUMNS], one
    `[tail_2p | q / H | tail_2p+1]` a pair: `reader_rows` takes each reader's view) and the row scale [T, 1],
    `scale * H` with each row's headroom H (`row_headroom`)."""
    pad = torch.zeros(q.shape[0], TAIL_COLUMNS - 3 * TAIL_RANK, dtype=FP8, device=q.device)
    factors = reader_factors(u, factors)
    check_pairs(factors.numel(), paired)
    headroom, inverse = row_headroom(u, scale, factors, min_headroom)
    row_scale = scale * headroom
    x_part = (q.float() * inverse).to(FP8)
    tails = []
    for i in range(factors.numel()):
        t = u[:, TAIL_RANK * i:TAIL_RANK * (i + 1)].float() / (row_scale * factors[i])
        hi, lo = _hi_lo(t.clamp(-FP8_MAX, FP8_MAX))
        tails.append(torch.cat([hi, lo, hi, pad], dim=-1))
    if paired:
        rows = [torch.cat([tails[i], x_part, tails[i + 1]], dim=-1) for i in range(0, len(tails), 2)]
    else:
        rows = [torch.cat([x_part, tail], dim=-1) for tail in tails]
    return torch.stack(rows), row_scale


@functools.cache
def _kernel():
    """The Triton kernel, made on first use: the CPU-only install has no triton."""
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def tailed_rows_kernel(q_ptr, scale_ptr, u_ptr, factor_ptr, rows_ptr, row_scale_ptr, tokens, K: tl.constexpr,
                           R: tl.constexpr, TAIL: tl.constexpr, U_STRIDE: tl.constexpr, READERS: tl.constexpr,
                           HAS_FACTORS: tl.constexpr, SIDES: tl.constexpr, MIN_LOG2: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
        # program (t, b): rows [t * BLOCK_T, +BLOCK_T) of buffer b: the rows' headroom H from every reader's u, q / H
        # and the buffer's tails: reader b's after q / H (SIDES 1), or readers 2b's before it and 2b + 1's after
        # (SIDES 2: paired)
        row_block, buffer = tl.program_id(0), tl.program_id(1)
        offs_t = row_block * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = offs_t < tokens
        q_column = TAIL * (SIDES - 1)  # q / H after the first reader's tail when paired
        width = K + SIDES * TAIL
        out = rows_ptr + buffer * tokens * width + offs_t[:, None] * width
        offs_r = tl.arange(0, R)
        mask = row_ok[:, None]
        scale = tl.load(scale_ptr + offs_t, mask=row_ok, other=1.0)
        # H = 2^k, k = ceil(log2(need)) from need's float32 bits (row_headroom's frexp), at least MIN_LOG2
        need = tl.zeros([BLOCK_T], dtype=tl.float32)
        for j in tl.static_range(READERS):
            u_j = tl.load(u_ptr + offs_t[:, None] * U_STRIDE + j * R + offs_r[None, :], mask=mask).to(tl.float32)
            factor_j = 1.0  # no factors given: every c is 1 (`reader_factors`)
            if HAS_FACTORS:
                factor_j = tl.load(factor_ptr + j)
            need = tl.maximum(need, tl.math.div_rn(tl.max(tl.abs(u_j), axis=1), scale * factor_j * 448.0))
        need_bits = need.to(tl.int32, bitcast=True)
        biased = (need_bits >> 23) & 0xFF
        k = tl.where((need_bits & 0x7FFFFF) == 0, biased - 127, biased - 126)
        k = tl.minimum(tl.maximum(k, MIN_LOG2), 126)
        headroom = ((k + 127) << 23).to(tl.float32, bitcast=True)
        inverse = ((127 - k) << 23).to(tl.float32, bitcast=True)
        row_scale = scale * headroom
        if buffer == 0:
            tl.store(row_scale_ptr + offs_t, row_scale, mask=row_ok)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kmask = row_ok[:, None] & (offs_k[None, :] < K)
            q = tl.load(q_ptr + offs_t[:, None] * K + offs_k[None, :], mask=kmask).to(tl.float32)
            # times 1 / H, exact for a power of two (div_rn here made the kernel 2.3x slower, H100)
            tl.store(out + q_column + offs_k[None, :], (q * inverse[:, None]).to(tl.float8e4nv), mask=kmask)
        for side in tl.static_range(SIDES):
            reader = buffer * SIDES + side
            u = tl.load(u_ptr + offs_t[:, None] * U_STRIDE + reader * R + offs_r[None, :], mask=mask).to(tl.float32)
            factor = 1.0
            if HAS_FACTORS:
                factor = tl.load(factor_ptr + reader)
            # div_rn: IEEE division as torch's (Triton's `/` may round its last bit otherwise)
            t = tl.clamp(tl.math.div_rn(u, row_scale[:, None] * factor), -448.0, 448.0)
            # fp8(t) as float32 by arithmetic: with `t.to(fp8).to(float32)` Triton 3.6 wrote `lo` equal to `hi` wherever
            # |t| >= 32 on an H100 (2026-12-07), as if the value read back as 0. Normal numbers: round-to-nearest-even
            # to 3 mantissa bits; below 2^-6 (FP8's subnormals) a fixed step of 2^-9. Same bits as torch's conversion.
            bits = t.to(tl.int32, bitcast=True)
            normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
            hi_value = tl.where(tl.abs(t) < 0.015625, libdevice.rint(t * 512.0) / 512.0, normal)
            hi = hi_value.to(tl.float8e4nv)  # exact: hi_value is on FP8's grid
            lo = (t - hi_value).to(tl.float8e4nv)
            if SIDES == 2:  # the pair's first reader's tail before q / H, the second's after it
                tail = out + side * (TAIL + K) + offs_r[None, :]
            else:
                tail = out + K + offs_r[None, :]
            tl.store(tail, hi, mask=mask)
            tl.store(tail + R, lo, mask=mask)
            tl.store(tail + 2 * R, hi, mask=mask)
            for p0 in range(3 * R, TAIL, R):  # the pad columns, zeroed each call (the rows are a fresh buffer)
                tl.store(tail + p0, tl.zeros([BLOCK_T, R], dtype=tl.float8e4nv), mask=mask)

    return tailed_rows_kernel


def _tailed_rows_triton(q, scale, u, factors, min_headroom, paired=False):
    from torch.library import wrap_triton

    tokens, k = q.shape
    readers = u.shape[1] // TAIL_RANK
    check_pairs(readers, paired)
    buffers = readers // 2 if paired else readers
    rows = torch.empty(buffers, tokens, k + (2 if paired else 1) * TAIL_COLUMNS, dtype=FP8, device=q.device)
    row_scale = torch.empty(tokens, 1, dtype=torch.float32, device=q.device)
    block_t = 16
    grid = ((tokens + block_t - 1) // block_t, buffers)
    # the headroom's exponent a constexpr: compiled by AOTInductor, float arguments came in as fp64 ("Expected dtype
    # ['fp32'] but got fp64" from div_rn, H100 2026-12-07)
    wrap_triton(_kernel())[grid](q, scale, u, factors, rows, row_scale, tokens, K=k, R=TAIL_RANK, TAIL=TAIL_COLUMNS,
                                 U_STRIDE=u.stride(0), READERS=readers, HAS_FACTORS=factors.numel() > 0,
                                 SIDES=2 if paired else 1, MIN_LOG2=int(math.log2(min_headroom)), BLOCK_T=block_t,
                                 BLOCK_K=512)
    return rows, row_scale


def _tailed_rows(q: torch.Tensor, scale: torch.Tensor, u: torch.Tensor, factors: torch.Tensor,
                 min_headroom: float, paired: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    mantissa, _ = math.frexp(min_headroom)
    if mantissa != 0.5 or min_headroom < 1:  # H must be exact: the kernel multiplies by 1 / H, the reference too
        raise ValueError(f"the tails' least headroom {min_headroom} is not a power of two >= 1; use e.g. "
                         f"{MIN_HEADROOM}")
    if (q.device.type == "cuda" and q.is_contiguous() and scale.is_contiguous() and u.stride(-1) == 1
            and scale.dtype == factors.dtype == torch.float32 and factors.is_contiguous()):
        return _tailed_rows_triton(q, scale, u, factors, min_headroom, paired)
    return tailed_rows_reference(q, scale, u, factors, min_headroom, paired)


tailed_rows = register_triton_op("aotpack::tailed_rows", _tailed_rows)


def tailed_linear(rows: torch.Tensor, row_scale: torch.Tensor, weight_rows: torch.Tensor,
                  weight_scale: torch.Tensor, out_dtype=torch.bfloat16, fast_accum: bool = True) -> torch.Tensor:
    """One reader's `x W^T + u B^T`: its rows [T, K + TAIL_COLUMNS] against its tailed weight [out, K +
    TAIL_COLUMNS] (row-wise scales `row_scale` [T, 1], `weight_scale` [out, 1])."""
    return torch._scaled_mm(rows, weight_rows.t(), scale_a=row_scale, scale_b=weight_scale.reshape(1, -1),
                            out_dtype=out_dtype, use_fast_accum=fast_accum)


def kernel_errors(device, tokens: int = 157, paired: bool = False) -> dict[str, float]:
    """The op on `device` against `tailed_rows_reference` for a single block's four readers (K 3072) and a double
    block's one (with `paired`, the four in pairs too; random inputs, rows over 12 decades of headroom): relative L2
    of the rows as values, and of the row scales (the kernel writes the reference's bits on an H100: 0)."""
    generator = torch.Generator().manual_seed(0)
    errors = {}
    cases = [("single_block", 4, False), ("double_block", 1, False)] + ([("single_block_paired", 4, True)] if paired
                                                                         else [])
    for name, readers, in_pairs in cases:
        x = torch.randn(tokens, 3072, generator=generator)
        scale = (x.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
        q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        spread = torch.logspace(-6, 6, tokens)[torch.randperm(tokens, generator=generator)]
        u = (torch.randn(tokens, readers * TAIL_RANK, generator=generator) * spread[:, None]).to(torch.bfloat16)
        q, scale, u = q.to(device), scale.to(device), u.to(device)
        no_factors = torch.empty(0, device=device)
        rows, row_scale = torch.ops.aotpack.tailed_rows(q, scale, u, no_factors, MIN_HEADROOM, in_pairs)
        expected, expected_scale = tailed_rows_reference(q, scale, u, no_factors, MIN_HEADROOM, in_pairs)
        errors[name] = max(relative_error(rows.float(), expected.float()), relative_error(row_scale, expected_scale))
    return errors


def check_kernel_against_reference(device, paired: bool = False) -> None:
    """`refuse_kernel_errors` for the tailed rows kernel (once per build, on the GPU), paired too with `paired`."""
    refuse_kernel_errors("LoRA tails' rows", "lora_tails_paired" if paired else "lora_tails", device,
                         kernel_errors(device, paired=paired))
