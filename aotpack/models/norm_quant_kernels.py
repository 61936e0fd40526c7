"""The Triton kernel of `fused_norm_quant` (see norm_quant.py). A module of its own, imported only on CUDA: the
CPU-only install has no triton.

bf16 rounding (to nearest even) is written out as integer ops on the fp32 bits, `(b + 0x7FFF + ((b >> 16) & 1)) &
0xFFFF0000`: the compiler folds a `.to(bf16).to(fp32)` pair inside the kernel (on the H200 the product and the sum
were rounded once, as one FMA, so a quarter of the modulated values were one bf16 ulp off torch's and the FP8
output 1.36e-2 off; 3.7e-4 with the integer rounding, 2026-12-03, scripts/gpu/probe_norm_quant_kernel.py).

Written out rather than as a `@triton.jit` helper: two builds with a helper failed in AOTInductor's compile-time
autotune block at the helper's call, with the error message cut off; the written-out form then showed the cause,
`eps` arriving there as fp64 (hence the cast below). Whether a helper works with the cast was not tried (H200,
torch 2.11, 2026-12-03, benchmarks/results/2026-12-03c-h200-norm-quant/c-build-failed/)."""

import triton
import triton.language as tl


@triton.jit
def norm_modulate_quant_kernel(x_ptr, shift_ptr, scale_ptr, q_ptr, row_scale_ptr, h_ptr, tokens, shift_stride,
                               scale_stride, eps, WIDTH: tl.constexpr, BLOCK: tl.constexpr,
                               KEEP_INPUT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    batch = row // tokens
    cols = tl.arange(0, BLOCK)
    inside = cols < WIDTH
    x = tl.load(x_ptr + row * WIDTH + cols, mask=inside, other=0.0).to(tl.float32)
    # bf16 activations. LayerNorm without affine, fp32 statistics, rounded to bf16 as torch's layer_norm rounds
    mean = tl.sum(x, axis=0) / WIDTH
    centered = tl.where(inside, x - mean, 0.0)
    variance = tl.sum(centered * centered, axis=0) / WIDTH
    b = (centered * tl.math.rsqrt((variance + eps).to(tl.float32))).to(tl.uint32, bitcast=True)  # eps may come as fp64
    normed = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    # modulation, each op rounded as eager's bf16 ops round: (1 + scale), the product, the sum
    shift = tl.load(shift_ptr + batch * shift_stride + cols, mask=inside, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + batch * scale_stride + cols, mask=inside, other=0.0).to(tl.float32)
    b = (1.0 + scale).to(tl.uint32, bitcast=True)
    one_plus = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    b = (normed * one_plus).to(tl.uint32, bitcast=True)
    product = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    b = (product + shift).to(tl.uint32, bitcast=True)
    hf = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)  # masked lanes: 0 * 1 + 0
    # amax / 448 rounded to bf16 (torchao's eager scale), floored for all-zero rows
    b = (tl.max(tl.abs(hf), axis=0) / 448.0).to(tl.uint32, bitcast=True)
    row_scale = tl.maximum(((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True), 1e-12)
    q = tl.clamp(hf / row_scale, -448.0, 448.0)
    tl.store(q_ptr + row * WIDTH + cols, q.to(q_ptr.dtype.element_ty), mask=inside)
    tl.store(row_scale_ptr + row, row_scale)
    if KEEP_INPUT:
        tl.store(h_ptr + row * WIDTH + cols, hf.to(tl.bfloat16), mask=inside)  # exact: hf is bf16-valued
