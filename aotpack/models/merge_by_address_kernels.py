"""The Triton kernels of `merge_by_address` (see that module). A module of their own, imported only on CUDA: the
CPU-only install has no triton, and Inductor finds a kernel's helper functions among its module's globals.

Both passes read the bound originals through the address tables; the amax pass saves the original scales, the
quantize pass saves each original tile just before it overwrites it (a tile is read and written by one program
only, so no program reads a tile another one has written). Tiles of 128 rows x 128 columns, the whole rank step
(64) in one dot, 4 warps, 2 stages: on the H200 the fastest of 30 forms tried for FLUX.1-dev's 494 block linears,
r64 (scripts/gpu/probe_merge_tiles.py, benchmarks/results/2026-12-02h-h200-merge-tiles): 23.0 ms with the save,
against 22.3 ms for the earlier 64 x 128 tiles with a rank step of 16 after a 6.5-7.4 ms stack of the originals."""

import triton
import triton.language as tl


@triton.jit
def merged_tile(q, s, a_ptr, b_ptr, layer, rows, cols, row_in, col_in, N, K, R,
                BN: tl.constexpr, BK: tl.constexpr, RC: tl.constexpr):
    """`q * s + round(B @ A)` over one (rows, cols) tile of `layer`, in fp32."""
    product = tl.zeros((BN, BK), dtype=tl.float32)
    for start in range(0, R, RC):
        rank = start + tl.arange(0, RC)
        b = tl.load(b_ptr + layer * N * R + rows[:, None] * R + rank[None, :], mask=row_in[:, None], other=0.0)
        a = tl.load(a_ptr + layer * R * K + rank[:, None] * K + cols[None, :], mask=col_in[None, :], other=0.0)
        product = tl.dot(b, a, product)
    # the matmul's output rounding (factor dtype), then the fp32 sum `merged_rows` forms
    product = product.to(a_ptr.dtype.element_ty).to(tl.float32)
    return q.to(tl.float32) * s[:, None] + product


@triton.jit
def bound_pointer(table_ptr, layer, element: tl.constexpr):
    """The layer's bound storage from its table: 16-byte aligned (the runtime checks), which Triton must be told or
    it moves the bytes one by one through a loaded address."""
    return tl.multiple_of(tl.load(table_ptr + layer).to(tl.pointer_type(element)), 16)


@triton.jit
def row_amax_kernel(qdata_at_ptr, scale_at_ptr, a_ptr, b_ptr, amax_ptr, saved_s_ptr, N16, K16, R16,
                    BN: tl.constexpr, BK: tl.constexpr, RC: tl.constexpr):
    N, K, R = N16 * 16, K16 * 16, R16 * 16  # see quantize_kernel
    layer = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    cols = tl.program_id(0) * BK + tl.arange(0, BK)
    row_in, col_in = rows < N, cols < K
    # a zero address is masked off: Inductor runs the kernels once while compiling, on zero-filled integer tables.
    # Masks, not branches: with the loads inside an `if` the package's quantize pass took 15.7 ms, against 12.5 for
    # the probe's branch-free kernel (benchmarks/results/2026-12-02h-h200-merge-tiles, b and d)
    live = (tl.load(qdata_at_ptr + layer) != 0) & (tl.load(scale_at_ptr + layer) != 0)
    s = tl.load(bound_pointer(scale_at_ptr, layer, tl.float32) + rows, mask=row_in & live, other=0.0)
    if tl.program_id(0) == 0:
        tl.store(saved_s_ptr + layer * N + rows, s, mask=row_in)
    q = tl.load(bound_pointer(qdata_at_ptr, layer, tl.float8e4nv) + rows[:, None] * K + cols[None, :],
                mask=row_in[:, None] & col_in[None, :] & live, other=0.0)
    value = merged_tile(q, s, a_ptr, b_ptr, layer, rows, cols, row_in, col_in, N, K, R, BN, BK, RC)
    tl.atomic_max(amax_ptr + layer * N + rows, tl.max(tl.abs(value), axis=1), mask=row_in)


@triton.jit
def quantize_kernel(qdata_at_ptr, scale_at_ptr, a_ptr, b_ptr, amax_ptr, saved_q_ptr, saved_s_ptr, new_scale_ptr,
                    N16, K16, R16, BN: tl.constexpr, BK: tl.constexpr, RC: tl.constexpr):
    # the sizes come in sixteenths: Triton then knows them as multiples of 16 and vectorizes the loads and stores
    # (AOTInductor passes dynamic sizes without that hint; byte by byte, the merge of r64-all took 84 ms, not 25)
    N, K, R = N16 * 16, K16 * 16, R16 * 16
    layer = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    cols = tl.program_id(0) * BK + tl.arange(0, BK)
    row_in, col_in = rows < N, cols < K
    mask = row_in[:, None] & col_in[None, :]
    scale = tl.maximum(tl.load(amax_ptr + layer * N + rows, mask=row_in, other=1.0) / 448.0, 1e-12)
    live = tl.load(qdata_at_ptr + layer) != 0  # see row_amax_kernel
    qdata = bound_pointer(qdata_at_ptr, layer, tl.float8e4nv) + rows[:, None] * K + cols[None, :]
    q = tl.load(qdata, mask=mask & live, other=0.0)
    tl.store(saved_q_ptr + layer * N * K + rows[:, None] * K + cols[None, :], q, mask=mask)
    s = tl.load(saved_s_ptr + layer * N + rows, mask=row_in, other=0.0)  # the originals: the amax pass saved them
    value = merged_tile(q, s, a_ptr, b_ptr, layer, rows, cols, row_in, col_in, N, K, R, BN, BK, RC)
    out = tl.minimum(tl.maximum(value / scale[:, None], -448.0), 448.0)
    tl.store(qdata, out.to(tl.float8e4nv), mask=mask & live)
    if tl.program_id(0) == 0:  # every column tile reads the saved scales, none the bound ones written here
        scale_live = tl.load(scale_at_ptr + layer) != 0
        tl.store(bound_pointer(scale_at_ptr, layer, tl.float32) + rows, scale, mask=row_in & scale_live)
        tl.store(new_scale_ptr + layer * N + rows, scale, mask=row_in)
