"""The Triton kernels of `merge_by_address` (see that module). A module of their own, imported only on CUDA: the
CPU-only install has no triton, and Inductor finds a kernel's helper functions among its module's globals."""

import triton
import triton.language as tl


@triton.jit
def merged_tile(saved_q_ptr, saved_s_ptr, a_ptr, b_ptr, layer, rows, cols, N, K, R,
                BN: tl.constexpr, BK: tl.constexpr, RC: tl.constexpr):
    """`q * s + round(B @ A)` over one (rows, cols) tile of `layer`, in fp32, and the tile's row and column masks."""
    row_in, col_in = rows < N, cols < K
    q = tl.load(saved_q_ptr + layer * N * K + rows[:, None] * K + cols[None, :],
                mask=row_in[:, None] & col_in[None, :], other=0.0)
    s = tl.load(saved_s_ptr + layer * N + rows, mask=row_in, other=0.0)
    product = tl.zeros((BN, BK), dtype=tl.float32)
    for start in range(0, R, RC):
        rank = start + tl.arange(0, RC)
        b = tl.load(b_ptr + layer * N * R + rows[:, None] * R + rank[None, :], mask=row_in[:, None], other=0.0)
        a = tl.load(a_ptr + layer * R * K + rank[:, None] * K + cols[None, :], mask=col_in[None, :], other=0.0)
        product = tl.dot(b, a, product)
    # the matmul's output rounding (factor dtype), then the fp32 sum `merged_rows` forms
    product = product.to(a_ptr.dtype.element_ty).to(tl.float32)
    return q.to(tl.float32) * s[:, None] + product, row_in, col_in


@triton.jit
def row_amax_kernel(saved_q_ptr, saved_s_ptr, a_ptr, b_ptr, amax_ptr, N16, K16, R16,
                    BN: tl.constexpr, BK: tl.constexpr, RC: tl.constexpr):
    N, K, R = N16 * 16, K16 * 16, R16 * 16  # see quantize_kernel
    layer = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    cols = tl.program_id(0) * BK + tl.arange(0, BK)
    value, row_in, _ = merged_tile(saved_q_ptr, saved_s_ptr, a_ptr, b_ptr, layer, rows, cols, N, K, R, BN, BK, RC)
    tl.atomic_max(amax_ptr + layer * N + rows, tl.max(tl.abs(value), axis=1), mask=row_in)


@triton.jit
def quantize_kernel(saved_q_ptr, saved_s_ptr, a_ptr, b_ptr, amax_ptr, qdata_at_ptr, scale_at_ptr, new_scale_ptr,
                    N16, K16, R16, BN: tl.constexpr, BK: tl.constexpr, RC: tl.constexpr):
    # the sizes come in sixteenths: Triton then knows them as multiples of 16 and vectorizes the loads and stores
    # (AOTInductor passes dynamic sizes without that hint; byte by byte, the merge of r64-all took 84 ms, not 25)
    N, K, R = N16 * 16, K16 * 16, R16 * 16
    layer = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    cols = tl.program_id(0) * BK + tl.arange(0, BK)
    value, row_in, col_in = merged_tile(saved_q_ptr, saved_s_ptr, a_ptr, b_ptr, layer, rows, cols, N, K, R,
                                        BN, BK, RC)
    scale = tl.maximum(tl.load(amax_ptr + layer * N + rows, mask=row_in, other=1.0) / 448.0, 1e-12)
    out = tl.minimum(tl.maximum(value / scale[:, None], -448.0), 448.0)
    # a zero address is skipped: Inductor runs the kernel once while compiling, on zero-filled integer tables
    qdata_at = tl.load(qdata_at_ptr + layer)
    if qdata_at != 0:
        # 16-byte aligned (the runtime checks): without the hint Triton stores byte by byte through a loaded address
        qdata = tl.multiple_of(qdata_at.to(tl.pointer_type(saved_q_ptr.dtype.element_ty)), 16)
        tl.store(qdata + rows[:, None] * K + cols[None, :], out.to(saved_q_ptr.dtype.element_ty),
                 mask=row_in[:, None] & col_in[None, :])
    if tl.program_id(0) == 0:  # the saved scales stay as they were: no tile reads the ones written here
        scale_at = tl.load(scale_at_ptr + layer)
        if scale_at != 0:
            tl.store(tl.multiple_of(scale_at.to(tl.pointer_type(tl.float32)), 16) + rows, scale, mask=row_in)
        # also returned: Inductor sees only this write (the others go through loaded addresses) and would drop a
        # kernel whose output nobody reads (it did: the first compiled program wrote nothing)
        tl.store(new_scale_ptr + layer * N + rows, scale, mask=row_in)
