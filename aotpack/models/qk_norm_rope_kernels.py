"""The Triton kernels of `aotpack::qk_norm_rope` (qk_norm_rope.py), imported only where triton is: the
CPU-only install has none. At module level because Triton resolves a kernel's helper `@triton.jit` functions
through the kernel's globals."""

import triton
import triton.language as tl


@triton.jit
def normed_rotated(x, weight_ptr, cos, sin, eps, out_ptr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """RMSNorm of each row of `x` (fp32 [ROWS, HEAD_DIM], one head of one token per row) as torch's rms_norm:
    x * rsqrt(mean(x^2) + eps) * weight in fp32, rounded once; then RoPE on pairs (2i, 2i+1):
    out = x * cos + [-x_odd, x_even] * sin, in fp32."""
    variance = tl.sum(x * x, axis=1)[:, None] / HEAD_DIM
    weight = tl.load(weight_ptr + tl.arange(0, HEAD_DIM)[None, :]).to(tl.float32)
    normed = (x * tl.math.rsqrt(variance + eps) * weight).to(out_ptr.dtype.element_ty).to(tl.float32)
    even, odd = tl.split(tl.reshape(normed, (ROWS, HEAD_DIM // 2, 2)))
    rotated = tl.reshape(tl.join(-odd, even), (ROWS, HEAD_DIM))
    return normed * cos + rotated * sin


@triton.jit
def qk_norm_rope_kernel(y_ptr, bias_ptr, delta_ptr, weight_ptr, cos_ptr, sin_ptr, out_ptr, tokens,
                        first_token, total_tokens, eps, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                        HEAD_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DELTA: tl.constexpr):
    # one program: HEAD_BLOCK heads of one token of one batch row; even/odd lanes are RoPE's pairs
    groups: tl.constexpr = HEADS // HEAD_BLOCK
    program = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    token = program // groups
    heads = (program % groups) * HEAD_BLOCK + tl.arange(0, HEAD_BLOCK)[:, None]
    cols = heads * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]  # [HEAD_BLOCK, HEAD_DIM] within the token
    x = tl.load(y_ptr + (batch * tokens + token) * (HEADS * HEAD_DIM) + cols).to(tl.float32)
    # the linear's epilogue, each add rounded to the activation dtype as the eager adds round
    if HAS_BIAS:
        x = (x + tl.load(bias_ptr + cols).to(tl.float32)).to(out_ptr.dtype.element_ty).to(tl.float32)
    if HAS_DELTA:
        x += tl.load(delta_ptr + (batch * tokens + token) * (HEADS * HEAD_DIM) + cols).to(tl.float32)
        x = x.to(out_ptr.dtype.element_ty).to(tl.float32)
    position = first_token + token
    angle = position * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    out = normed_rotated(x, weight_ptr, tl.load(cos_ptr + angle), tl.load(sin_ptr + angle), eps, out_ptr,
                         HEAD_BLOCK, HEAD_DIM)
    tl.store(out_ptr + (batch * total_tokens + position) * (HEADS * HEAD_DIM) + cols,
             out.to(out_ptr.dtype.element_ty))


@triton.jit
def qk_lora_norm_rope_kernel(y_ptr, bias_ptr, hidden_ptr, up_ptr, weight_ptr, cos_ptr, sin_ptr, out_ptr, tokens,
                             first_token, total_tokens, hidden_batch_stride, hidden_token_stride, up_row_stride,
                             eps, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, RANK: tl.constexpr,
                             TOKEN_BLOCK: tl.constexpr, HEAD_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr):
    # one program: HEAD_GROUP heads of TOKEN_BLOCK tokens of one batch row. The slot's up-projection for each
    # head (A x [TOKEN_BLOCK, RANK] @ B[head rows].T) is a tl.dot here, so its delta is never written; A x is
    # loaded once for the group. RoPE's even and odd lanes are separate tiles, each with its own tl.dot (a
    # reshape + split of the dot's output would convert its layout through shared memory).
    groups: tl.constexpr = HEADS // HEAD_GROUP
    group = tl.program_id(0) % groups
    batch = tl.program_id(1).to(tl.int64)
    token = (tl.program_id(0) // groups) * TOKEN_BLOCK + tl.arange(0, TOKEN_BLOCK)[:, None]
    valid = token < tokens
    even = 2 * tl.arange(0, HEAD_DIM // 2)[None, :]  # lane 2i; its pair is 2i + 1
    ranks = tl.arange(0, RANK)
    hidden = tl.load(hidden_ptr + batch * hidden_batch_stride + token * hidden_token_stride + ranks[None, :],
                     mask=valid, other=0.0)
    angle = (first_token + token) * HEAD_DIM + even
    cos_even = tl.load(cos_ptr + angle, mask=valid, other=0.0)
    cos_odd = tl.load(cos_ptr + angle + 1, mask=valid, other=0.0)
    sin_even = tl.load(sin_ptr + angle, mask=valid, other=0.0)
    sin_odd = tl.load(sin_ptr + angle + 1, mask=valid, other=0.0)
    weight_even = tl.load(weight_ptr + even).to(tl.float32)
    weight_odd = tl.load(weight_ptr + even + 1).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    for i in tl.static_range(HEAD_GROUP):
        head = group * HEAD_GROUP + i
        cols = head * HEAD_DIM + even
        rows = (batch * tokens + token) * (HEADS * HEAD_DIM) + cols
        x_even = tl.load(y_ptr + rows, mask=valid, other=0.0).to(tl.float32)
        x_odd = tl.load(y_ptr + rows + 1, mask=valid, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x_even = (x_even + tl.load(bias_ptr + cols).to(tl.float32)).to(dtype).to(tl.float32)
            x_odd = (x_odd + tl.load(bias_ptr + cols + 1).to(tl.float32)).to(dtype).to(tl.float32)
        up_rows = up_ptr + cols * up_row_stride + ranks[:, None]  # [RANK, HEAD_DIM // 2]: B's even rows, transposed
        # each delta rounded to the activation dtype (as the bf16 GEMM writes it), then the add, rounded
        delta_even = tl.dot(hidden, tl.load(up_rows)).to(dtype).to(tl.float32)
        delta_odd = tl.dot(hidden, tl.load(up_rows + up_row_stride)).to(dtype).to(tl.float32)
        x_even = (x_even + delta_even).to(dtype).to(tl.float32)
        x_odd = (x_odd + delta_odd).to(dtype).to(tl.float32)
        # RMSNorm as torch's rms_norm (fp32, rounded once), then RoPE on the pair
        inverse = tl.math.rsqrt((tl.sum(x_even * x_even, axis=1) + tl.sum(x_odd * x_odd, axis=1))[:, None] / HEAD_DIM
                                + eps)
        normed_even = (x_even * inverse * weight_even).to(dtype).to(tl.float32)
        normed_odd = (x_odd * inverse * weight_odd).to(dtype).to(tl.float32)
        out = out_ptr + ((batch * total_tokens + first_token + token) * HEADS + head) * HEAD_DIM + even
        tl.store(out, (normed_even * cos_even - normed_odd * sin_even).to(dtype), mask=valid)
        tl.store(out + 1, (normed_odd * cos_odd + normed_even * sin_odd).to(dtype), mask=valid)
