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
                             TOKEN_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr):
    # one program: one head of TOKEN_BLOCK tokens of one batch row. The slot's up-projection for that
    # head (hidden [TOKEN_BLOCK, RANK] @ B[head rows].T) is a tl.dot here, so its delta is never written.
    head = tl.program_id(0) % HEADS
    batch = tl.program_id(1).to(tl.int64)
    token = (tl.program_id(0) // HEADS) * TOKEN_BLOCK + tl.arange(0, TOKEN_BLOCK)[:, None]
    valid = token < tokens
    dims = tl.arange(0, HEAD_DIM)[None, :]
    cols = head * HEAD_DIM + dims
    x = tl.load(y_ptr + (batch * tokens + token) * (HEADS * HEAD_DIM) + cols, mask=valid, other=0.0)
    x = x.to(tl.float32)
    if HAS_BIAS:
        x = (x + tl.load(bias_ptr + cols).to(tl.float32)).to(out_ptr.dtype.element_ty).to(tl.float32)
    ranks = tl.arange(0, RANK)
    hidden = tl.load(hidden_ptr + batch * hidden_batch_stride + token * hidden_token_stride + ranks[None, :],
                     mask=valid, other=0.0)
    up = tl.load(up_ptr + (head * HEAD_DIM + tl.arange(0, HEAD_DIM))[None, :] * up_row_stride + ranks[:, None])
    # the delta rounded to the activation dtype (as the bf16 GEMM writes it), then the add, rounded
    delta = tl.dot(hidden, up).to(out_ptr.dtype.element_ty).to(tl.float32)
    x = (x + delta).to(out_ptr.dtype.element_ty).to(tl.float32)
    angle = (first_token + token) * HEAD_DIM + dims
    out = normed_rotated(x, weight_ptr, tl.load(cos_ptr + angle, mask=valid, other=0.0),
                         tl.load(sin_ptr + angle, mask=valid, other=0.0), eps, out_ptr, TOKEN_BLOCK, HEAD_DIM)
    tl.store(out_ptr + ((batch * total_tokens + first_token + token) * HEADS + head) * HEAD_DIM + dims,
             out.to(out_ptr.dtype.element_ty), mask=valid)
