"""One pass for a Flux attention's q/k epilogue: the recipe lever `fused_qk_norm_rope`.

Between the q (or k) projection's FP8 GEMM and attention, diffusers' `FluxAttnProcessor` adds the bias
(and a slot's LoRA delta), applies the per-head RMSNorm, concatenates text and image tokens and applies
the rotary embedding. Inductor compiles that into two to four kernels per tensor; in a no-slot program
the single block's took ~9 ms per 1024^2 step on the H200 (it re-derives the norm element by element
in a 2-D tiled kernel with masked half loads), the slotted programs' ~6 ms for both block kinds
(kernel breakdown, `benchmarks/results/2026-12-01m-h200-fused-quant/c-speed-1024/speed.json`, random
weights). The minimum is one read of the GEMM output and one write of the result: ~2 ms per step.

- `torch.ops.aotpack.qk_norm_rope(text parts, image parts, cos, sin, eps, head_dim)`: a
  `torch.library.triton_op`. Each part is a projection's (GEMM output, bias, LoRA delta, norm weight),
  empty tensors where absent; the text part may have no tokens (single blocks). It returns
  `[B, S_text + S_image, heads, head_dim]`, what the processor hands to attention. On CUDA the body
  launches one Triton kernel per part through `wrap_triton` (compiled into the programs); elsewhere, and
  as the reference, it runs `qk_norm_rope_reference`, diffusers' own arithmetic in torch ops.
- `torch.ops.aotpack.qk_norm_rope_fp8(..., descale, eps, head_dim)`: the same kernel writing e4m3 at a per-tensor
  scale, for FP8 attention (recipe lever `fp8_qk_in_norm_rope`, off: on an H100 0.2-0.6 ms faster a 1024² step,
  0.1-0.3 ms slower at 512², where its kernels sit in the attention's `torch.cond` branches;
  `benchmarks/results/2026-12-06e-h100-fp8-qk-in-norm-rope/`, random weights).
- `FusedQKNormRopeProcessor` is diffusers' `FluxAttnProcessor` with the q/k path through the op; the
  value path, attention and the output projections are unchanged. `install_fused_qk_norm_rope` sets it
  on every Flux attention (`attn.set_processor`); weight and slot names do not change. Context-parallel
  split programs build q/k themselves and call the same `fused_query_key` (split_regions.py).

Numerics: torch's `rms_norm` (Flux's q/k norms are `torch.nn.RMSNorm`) and diffusers' `apply_rotary_emb`,
step for step (bit for bit on the CPU: the tests check whole models), each add of the linear's epilogue rounded to the activation dtype as
`LoRASlotLinear` rounds it. On the GPU the kernel's fp32 sum of squares runs in its own order.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import fp8_attention
from .examples import relative_error
from .fp8_attention import FP8, quantize_with
from .fused_quant import (
    QuantizedActivation,
    epilogue_sum,
    linear_output,
    no_tokens,
    unsummed_linear,
)
from .kernel_ops import refuse_kernel_errors, register_triton_op


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' `apply_rotary_emb(x, (cos, sin), sequence_dim=1)` (use_real, unbind dim -1), op for op."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def qk_norm_rope_reference(text_y, text_bias, text_delta, text_weight, image_y, image_bias, image_delta,
                           image_weight, cos, sin, eps: float, head_dim: int) -> torch.Tensor:
    """`rope(cat([norm_text(text), norm_image(image)], tokens))` in `[B, S, heads, head_dim]`, where each part is
    `y + bias + delta` ([B, S_part, heads * head_dim]) unflattened to heads."""
    parts = []
    for y, bias, delta, weight in ((text_y, text_bias, text_delta, text_weight),
                                   (image_y, image_bias, image_delta, image_weight)):
        if y.shape[1] == 0:
            continue
        x = epilogue_sum(y, bias, delta).unflatten(-1, (-1, head_dim))
        parts.append(F.rms_norm(x, (head_dim,), weight, eps))  # what Flux's torch.nn.RMSNorm q/k norms run
    x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return _rotary(x, cos, sin)


@functools.cache
def _kernel():
    """The Triton kernel, made on first use: the CPU-only install has no triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def qk_norm_rope_kernel(y_ptr, bias_ptr, delta_ptr, weight_ptr, cos_ptr, sin_ptr, descale_ptr, out_ptr, tokens,
                            first_token, total_tokens, y_row_stride, eps, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                            HEAD_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DELTA: tl.constexpr,
                            OUT_FP8: tl.constexpr):
        # one program: HEAD_BLOCK heads of one token of one batch row; even/odd lanes are RoPE's pairs. Every
        # rounding is to the activation dtype (y's); with OUT_FP8 the rounded result is then quantized to e4m3 at
        # one per-tensor scale, as fp8_attention.quantize_with quantizes the bf16 output
        groups: tl.constexpr = HEADS // HEAD_BLOCK
        program = tl.program_id(0)
        batch = tl.program_id(1).to(tl.int64)
        token = program // groups
        heads = (program % groups) * HEAD_BLOCK + tl.arange(0, HEAD_BLOCK)[:, None]
        cols = heads * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]  # [HEAD_BLOCK, HEAD_DIM] within the token
        # y's rows at their stride: a column slice of one joined q/k/v GEMM output (recipe lever joined_qkv)
        x = tl.load(y_ptr + (batch * tokens + token) * y_row_stride + cols).to(tl.float32)
        # the linear's epilogue, each add rounded to the activation dtype as the eager adds round
        if HAS_BIAS:
            x = (x + tl.load(bias_ptr + cols).to(tl.float32)).to(y_ptr.dtype.element_ty).to(tl.float32)
        if HAS_DELTA:
            x += tl.load(delta_ptr + (batch * tokens + token) * (HEADS * HEAD_DIM) + cols).to(tl.float32)
            x = x.to(y_ptr.dtype.element_ty).to(tl.float32)
        # RMSNorm as torch's rms_norm: x * rsqrt(mean(x^2) + eps) * weight in fp32, rounded once
        variance = tl.sum(x * x, axis=1)[:, None] / HEAD_DIM
        weight = tl.load(weight_ptr + tl.arange(0, HEAD_DIM)[None, :]).to(tl.float32)
        normed = (x * tl.math.rsqrt(variance + eps) * weight).to(y_ptr.dtype.element_ty).to(tl.float32)
        # RoPE on pairs (2i, 2i+1): out = x * cos + [-x_odd, x_even] * sin
        position = first_token + token
        angle = position * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
        cos = tl.load(cos_ptr + angle)
        sin = tl.load(sin_ptr + angle)
        even, odd = tl.split(tl.reshape(normed, (HEAD_BLOCK, HEAD_DIM // 2, 2)))
        rotated = tl.reshape(tl.join(-odd, even), (HEAD_BLOCK, HEAD_DIM))
        out = (normed * cos + rotated * sin).to(y_ptr.dtype.element_ty)
        if OUT_FP8:
            scaled = tl.math.div_rn(out.to(tl.float32), tl.load(descale_ptr))
            out = tl.clamp(scaled, -448.0, 448.0)  # e4m3fn's largest finite value: saturate, as quantize_with
        tl.store(out_ptr + (batch * total_tokens + position) * (HEADS * HEAD_DIM) + cols,
                 out.to(out_ptr.dtype.element_ty))

    return qk_norm_rope_kernel


def _head_block(heads: int) -> int:
    """Heads per program: the largest power of two that divides `heads`, at most 8 (8 x 128 values)."""
    block = 1
    while block < 8 and heads % (block * 2) == 0:
        block *= 2
    return block


# One warp per program: the kernel probe's fastest config (H200, 1024^2 shapes, launches replayed from a CUDA
# graph): 0.0172-0.0176 vs 0.0210 ms per single-block tensor with 4 warps; in the package the kernel's time per
# step with no LoRA went 3.48 -> 2.67 ms (benchmarks/results/2026-12-02-h200-qk-lora-up/).
_WARPS = 1


def _qk_norm_rope_triton(text_y, text_bias, text_delta, text_weight, image_y, image_bias, image_delta,
                         image_weight, cos, sin, eps: float, head_dim: int, head_block: int | None = None,
                         num_warps: int = _WARPS, descale: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel launches; `head_block` and `num_warps` override the launch config (the probe's sweep). With
    `descale` (float32, one element) the output is e4m3 at that scale."""
    from torch.library import wrap_triton

    batch, image_tokens, width = image_y.shape
    text_tokens = text_y.shape[1]
    heads = width // head_dim
    total = text_tokens + image_tokens
    out_fp8 = descale is not None
    out = torch.empty(batch, total, heads, head_dim, dtype=FP8 if out_fp8 else image_y.dtype, device=image_y.device)
    cos, sin = cos.contiguous(), sin.contiguous()
    block = head_block or _head_block(heads)
    for first, (y, bias, delta, weight) in ((0, (text_y, text_bias, text_delta, text_weight)),
                                            (text_tokens, (image_y, image_bias, image_delta, image_weight))):
        tokens = y.shape[1]
        if tokens == 0:
            continue
        # rows may stand apart (a column slice of a joined GEMM's output): read in place, not copied
        y = y if _rows_at_stride(y) else y.contiguous()
        bias, delta, weight = bias.contiguous(), delta.contiguous(), weight.contiguous()
        # an empty input's pointer is never read (its flag is off): `y` stands in for it
        wrap_triton(_kernel())[(tokens * (heads // block), batch)](
            y, bias if bias.numel() else y, delta if delta.numel() else y, weight, cos, sin,
            descale if out_fp8 else cos, out, tokens, first, total, y.stride(1), eps, HEADS=heads, HEAD_DIM=head_dim,
            HEAD_BLOCK=block, HAS_BIAS=bias.numel() > 0, HAS_DELTA=delta.numel() > 0, OUT_FP8=out_fp8,
            num_warps=num_warps)
    return out


def _rows_at_stride(y: torch.Tensor) -> bool:
    """Whether the kernel can read `y` ([B, S, width]) in place: dense rows that do not overlap, each batch's rows
    one stride apart."""
    return y.stride(2) == 1 and y.stride(1) >= y.shape[2] and y.stride(0) == y.shape[1] * y.stride(1)


def _supported_by_kernel(head_dim: int) -> bool:
    return head_dim >= 2 and head_dim & (head_dim - 1) == 0  # tl.arange needs a power of two


def _qk_norm_rope(text_y: torch.Tensor, text_bias: torch.Tensor, text_delta: torch.Tensor, text_weight: torch.Tensor,
                  image_y: torch.Tensor, image_bias: torch.Tensor, image_delta: torch.Tensor,
                  image_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                  head_dim: int) -> torch.Tensor:
    args = (text_y, text_bias, text_delta, text_weight, image_y, image_bias, image_delta, image_weight, cos, sin,
            eps, head_dim)
    if image_y.device.type == "cuda" and _supported_by_kernel(head_dim):
        return _qk_norm_rope_triton(*args)
    return qk_norm_rope_reference(*args)


qk_norm_rope = register_triton_op("aotpack::qk_norm_rope", _qk_norm_rope)


def qk_norm_rope_fp8_reference(*args) -> torch.Tensor:
    """`qk_norm_rope_reference(*parts, cos, sin, eps, head_dim)` quantized to e4m3 at `descale` (the argument
    before eps), exactly as FP8 attention quantizes the bf16 result (`fp8_attention.quantize_with`)."""
    *parts, descale, eps, head_dim = args
    return quantize_with(qk_norm_rope_reference(*parts, eps, head_dim), descale)


def _qk_norm_rope_fp8(text_y: torch.Tensor, text_bias: torch.Tensor, text_delta: torch.Tensor,
                      text_weight: torch.Tensor, image_y: torch.Tensor, image_bias: torch.Tensor,
                      image_delta: torch.Tensor, image_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      descale: torch.Tensor, eps: float, head_dim: int) -> torch.Tensor:
    parts = (text_y, text_bias, text_delta, text_weight, image_y, image_bias, image_delta, image_weight, cos, sin)
    if image_y.device.type == "cuda" and _supported_by_kernel(head_dim):
        return _qk_norm_rope_triton(*parts, eps, head_dim, descale=descale.reshape(1).float().contiguous())
    return qk_norm_rope_fp8_reference(*parts, descale, eps, head_dim)


# recipe lever fp8_qk_in_norm_rope: the same kernel writing q (or k) in e4m3 for FP8 attention, so the bf16 tensor is
# never written and read back by a separate quantization kernel
qk_norm_rope_fp8 = register_triton_op("aotpack::qk_norm_rope_fp8", _qk_norm_rope_fp8)


def _projection_parts(linear, x: torch.Tensor, norm) -> tuple:
    return (*unsummed_linear(linear, x), norm.weight)


def query_key_parts(attn, hidden_states: torch.Tensor | QuantizedActivation,
                    encoder_hidden_states: torch.Tensor | QuantizedActivation | None) -> tuple[tuple, tuple]:
    """The q and k ops' operands before the rotary table: each (text GEMM output, bias, delta, norm weight, image
    GEMM output, bias, delta, norm weight), the text part empty without `encoder_hidden_states`."""
    if encoder_hidden_states is not None:
        text_q = _projection_parts(attn.add_q_proj, encoder_hidden_states, attn.norm_added_q)
        text_k = _projection_parts(attn.add_k_proj, encoder_hidden_states, attn.norm_added_k)
    else:
        empty = no_tokens(hidden_states)
        text_q = text_k = (empty, empty.new_empty(0), empty.new_empty(0), attn.norm_q.weight)
    return ((*text_q, *_projection_parts(attn.to_q, hidden_states, attn.norm_q)),
            (*text_k, *_projection_parts(attn.to_k, hidden_states, attn.norm_k)))


def fused_query_key(attn, hidden_states: torch.Tensor | QuantizedActivation,
                    encoder_hidden_states: torch.Tensor | QuantizedActivation | None, cos: torch.Tensor,
                    sin: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`attn`'s normed, rotated query and key (`[B, S_text + S_image, heads, head_dim]`, text first when
    `encoder_hidden_states` is given) through the op: what diffusers' processor hands to attention. `attn` needs
    only the projections and norms (a context-parallel part holds just those). The inputs may come quantized
    once for all projections (`QuantizedActivation`, recipe lever `fused_norm_quant`)."""
    q_parts, k_parts = query_key_parts(attn, hidden_states, encoder_hidden_states)
    eps = attn.norm_q.eps
    return (torch.ops.aotpack.qk_norm_rope(*q_parts, cos, sin, eps, head_dim),
            torch.ops.aotpack.qk_norm_rope(*k_parts, cos, sin, eps, head_dim))


def fp8_attention_from_parts(attn, hidden_states: torch.Tensor | QuantizedActivation,
                             encoder_hidden_states: torch.Tensor | QuantizedActivation | None, value: torch.Tensor,
                             cos: torch.Tensor, sin: torch.Tensor, head_dim: int, min_tokens: int) -> torch.Tensor:
    """`fp8_attention.fp8_attention` of `attn`'s query, key and `value` ([B, S, heads, head_dim]), with q and k
    written in e4m3 by their norm + RoPE kernel (`qk_norm_rope_fp8`, at the norm-bound scales FP8 attention
    uses), never in bf16: recipe lever `fp8_qk_in_norm_rope`. The same numbers as quantizing the bf16 result.
    With `min_tokens` > 0 the q/k kernels move inside the branches of FP8 attention's `torch.cond`: bf16
    attention (and bf16 q/k) below that joint token count, as `fp8_attention` chooses."""
    q_parts, k_parts = query_key_parts(attn, hidden_states, encoder_hidden_states)
    bounds = (fp8_attention.rms_norm_bound(attn, "q", head_dim), fp8_attention.rms_norm_bound(attn, "k", head_dim))
    if any(bound is None for bound in bounds):  # `_fusable` admits weighted RMSNorms only, which have bounds
        raise ValueError("fp8_qk_in_norm_rope needs RMSNorm q/k norms (their bound is the FP8 scale)")
    eps, parts = attn.norm_q.eps, len(q_parts)

    def split(operands):  # torch.cond passes the operands flat: q's parts, k's parts, then the rest
        return operands[:parts], operands[parts:2 * parts], operands[2 * parts:]

    def fp8_branch(*operands):
        q_in, k_in, (value, cos, sin, q_bound, k_bound) = split(operands)
        descale_q, descale_k = fp8_attention.descale_of(q_bound), fp8_attention.descale_of(k_bound)
        q8 = torch.ops.aotpack.qk_norm_rope_fp8(*q_in, cos, sin, descale_q, eps, head_dim)
        k8 = torch.ops.aotpack.qk_norm_rope_fp8(*k_in, cos, sin, descale_k, eps, head_dim)
        return fp8_attention.attend_quantized(q8, descale_q, k8, descale_k, value, q_in[parts // 2].dtype)

    def bf16_branch(*operands):
        q_in, k_in, (value, cos, sin, _, _) = split(operands)
        return fp8_attention.bf16_attention(torch.ops.aotpack.qk_norm_rope(*q_in, cos, sin, eps, head_dim),
                                            torch.ops.aotpack.qk_norm_rope(*k_in, cos, sin, eps, head_dim), value)

    tokens = q_parts[0].shape[1] + q_parts[parts // 2].shape[1]  # text + image
    return fp8_attention.by_token_count(tokens, min_tokens, fp8_branch, bf16_branch,
                                        (*q_parts, *k_parts, value, cos, sin, *bounds))


def uses_fused_qk_norm_rope(attn) -> bool:
    """Whether `install_fused_qk_norm_rope` gave `attn` the fused processor."""
    return getattr(attn.processor, "fuses_qk_norm_rope", False)


@functools.cache
def _processor_class():
    from diffusers.models.transformers import transformer_flux

    class FusedQKNormRopeProcessor(transformer_flux.FluxAttnProcessor):
        """diffusers' `FluxAttnProcessor` with q and k through `aotpack::qk_norm_rope` (one kernel each on
        CUDA). Calls it cannot take (no rotary table, an attention mask, fused projections) go to the parent."""

        fuses_qk_norm_rope = True
        quantizes_qk = False  # recipe lever fp8_qk_in_norm_rope: q/k written in e4m3 for FP8 attention

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            # hidden_states (and encoder_hidden_states) may be QuantizedActivations: blocks under fused_norm_quant
            # call the processor directly (fused_blocks.py), never with the calls that go to the parent
            if image_rotary_emb is None or attention_mask is not None or attn.fused_projections:
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
            joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
            text = encoder_hidden_states if joint else None
            value = linear_output(attn.to_v, hidden_states)
            if joint:
                value = torch.cat([linear_output(attn.add_v_proj, encoder_hidden_states), value], dim=1)
            value = value.unflatten(-1, (-1, attn.head_dim))
            # FP8 attention (recipe attention = "cudnn_fp8") with the q/k quantization in their kernels
            min_tokens = (fp8_attention.min_tokens_of(transformer_flux.dispatch_attention_fn)
                          if self.quantizes_qk and self._parallel_config is None else None)
            if min_tokens is not None:
                out = fp8_attention_from_parts(attn, hidden_states, text, value, *image_rotary_emb, attn.head_dim,
                                               min_tokens)
            else:
                query, key = fused_query_key(attn, hidden_states, text, *image_rotary_emb, attn.head_dim)
                # the FP8-attention op (recipe attention = "cudnn_fp8") reads its q/k scales from `attn`'s norms
                token = fp8_attention.current_attention_module.set(attn)
                try:
                    out = transformer_flux.dispatch_attention_fn(query, key, value, attn_mask=None,
                                                                 backend=self._attention_backend,
                                                                 parallel_config=self._parallel_config)
                finally:
                    fp8_attention.current_attention_module.reset(token)
            out = out.flatten(2, 3).to(value.dtype)
            if not joint:
                return out
            text_out, image_out = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
            # linear_output: the slot's own forward, or one op with the LoRA in the GEMM (lora_up_in_gemm)
            image_out = attn.to_out[1](linear_output(attn.to_out[0], image_out.contiguous()))
            return image_out, linear_output(attn.to_add_out, text_out.contiguous())

    return FusedQKNormRopeProcessor


def _fusable(attn) -> bool:
    """diffusers' own processor (or the fused one, which an install may set again with another `quantize_qk`),
    and q/k norms the kernel computes: torch.nn.RMSNorm over the head dim with a weight and one eps (Flux in the
    supported diffusers series)."""
    from diffusers.models.transformers import transformer_flux

    norms = [attn.norm_q, attn.norm_k] + ([attn.norm_added_q, attn.norm_added_k] if attn.added_kv_proj_dim else [])
    return (type(attn.processor) in (transformer_flux.FluxAttnProcessor, _processor_class())
            and all(type(n) is torch.nn.RMSNorm and n.weight is not None and n.eps is not None
                    and tuple(n.normalized_shape) == (attn.head_dim,) and n.eps == attn.norm_q.eps for n in norms))


def install_fused_qk_norm_rope(transformer, quantize_qk: bool = False) -> int:
    """Give every Flux attention of `transformer` whose q/k norms are weighted RMSNorms the fused processor, in
    place; returns how many. Weight and slot names do not change. `quantize_qk` (recipe lever
    `fp8_qk_in_norm_rope`): under FP8 attention their kernels write q/k in e4m3."""
    processor_class = _processor_class()
    attentions = [block.attn for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks)]
    fused = 0
    for attn in attentions:
        if _fusable(attn):
            processor = processor_class()
            processor.quantizes_qk = quantize_qk
            attn.set_processor(processor)
            fused += 1
    return fused


def kernel_errors(device, tokens: int = 67) -> dict[str, float]:
    """The op on `device` against `qk_norm_rope_reference` on Flux shapes (24 heads of 128), with random bf16
    inputs: a double block's text + image parts with bias and LoRA delta, and a single block's image part
    with bias only. Relative L2 of the outputs."""
    generator = torch.Generator().manual_seed(0)
    width, errors = 24 * 128, {}
    for name, text_tokens, has_delta in (("double_block", 13, True), ("single_block", 0, False)):
        def part(n):
            y = 3 * torch.randn(2, n, width, generator=generator)
            delta = torch.randn(2, n, width, generator=generator) if has_delta else torch.zeros(0)
            return [y, torch.randn(width, generator=generator), delta, 1 + 0.1 * torch.randn(128, generator=generator)]

        args = part(text_tokens) + part(tokens)
        angles = torch.randn(text_tokens + tokens, 128, generator=generator)
        args = [t.to(device, torch.bfloat16) for t in args] + [t.to(device) for t in (angles.cos(), angles.sin())]
        got = torch.ops.aotpack.qk_norm_rope(*args, 1e-6, 128)
        errors[name] = relative_error(got.float(), qk_norm_rope_reference(*args, 1e-6, 128).float())
        # each y as the middle column slice of a wider output, as joined_qkv hands q and k over (read in place)
        strided = list(args)
        for index in (0, 4):
            wide = args[index].new_zeros(*args[index].shape[:2], 3 * width)
            wide[..., width:2 * width] = args[index]
            strided[index] = wide[..., width:2 * width]
        errors[f"{name}_strided"] = relative_error(torch.ops.aotpack.qk_norm_rope(*strided, 1e-6, 128).float(),
                                                   got.float())
        # the e4m3 form at a bound-like scale (|x| <= sqrt(128) * max|w| after the norm): dequantized values
        descale = (args[3].float().abs().amax() * 128**0.5 / 448).reshape(1, 1, 1, 1)
        got8 = torch.ops.aotpack.qk_norm_rope_fp8(*args, descale, 1e-6, 128)
        expected8 = qk_norm_rope_fp8_reference(*args, descale, 1e-6, 128)
        errors[f"{name}_fp8"] = relative_error(got8.float() * descale, expected8.float() * descale)
    return errors


def check_kernel_against_reference(device) -> None:
    """`refuse_kernel_errors` for the q/k norm + RoPE kernel."""
    refuse_kernel_errors("fused q/k RMSNorm + RoPE", "fused_qk_norm_rope", device, kernel_errors(device))
