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

from .examples import relative_error
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
        # RMSNorm as torch's rms_norm: x * rsqrt(mean(x^2) + eps) * weight in fp32, rounded once
        variance = tl.sum(x * x, axis=1)[:, None] / HEAD_DIM
        weight = tl.load(weight_ptr + tl.arange(0, HEAD_DIM)[None, :]).to(tl.float32)
        normed = (x * tl.math.rsqrt(variance + eps) * weight).to(out_ptr.dtype.element_ty).to(tl.float32)
        # RoPE on pairs (2i, 2i+1): out = x * cos + [-x_odd, x_even] * sin
        position = first_token + token
        angle = position * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
        cos = tl.load(cos_ptr + angle)
        sin = tl.load(sin_ptr + angle)
        even, odd = tl.split(tl.reshape(normed, (HEAD_BLOCK, HEAD_DIM // 2, 2)))
        rotated = tl.reshape(tl.join(-odd, even), (HEAD_BLOCK, HEAD_DIM))
        out = normed * cos + rotated * sin
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
                         num_warps: int = _WARPS) -> torch.Tensor:
    """The kernel launches; `head_block` and `num_warps` override the launch config (the probe's sweep)."""
    from torch.library import wrap_triton

    batch, image_tokens, width = image_y.shape
    text_tokens = text_y.shape[1]
    heads = width // head_dim
    total = text_tokens + image_tokens
    out = torch.empty(batch, total, heads, head_dim, dtype=image_y.dtype, device=image_y.device)
    cos, sin = cos.contiguous(), sin.contiguous()
    block = head_block or _head_block(heads)
    for first, (y, bias, delta, weight) in ((0, (text_y, text_bias, text_delta, text_weight)),
                                            (text_tokens, (image_y, image_bias, image_delta, image_weight))):
        tokens = y.shape[1]
        if tokens == 0:
            continue
        y, bias, delta, weight = y.contiguous(), bias.contiguous(), delta.contiguous(), weight.contiguous()
        # an empty input's pointer is never read (its flag is off): `y` stands in for it
        wrap_triton(_kernel())[(tokens * (heads // block), batch)](
            y, bias if bias.numel() else y, delta if delta.numel() else y, weight, cos, sin, out, tokens, first,
            total, eps, HEADS=heads, HEAD_DIM=head_dim, HEAD_BLOCK=block, HAS_BIAS=bias.numel() > 0,
            HAS_DELTA=delta.numel() > 0, num_warps=num_warps)
    return out


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


def _projection_parts(linear, x: torch.Tensor, norm) -> tuple:
    return (*unsummed_linear(linear, x), norm.weight)


def fused_query_key(attn, hidden_states: torch.Tensor | QuantizedActivation,
                    encoder_hidden_states: torch.Tensor | QuantizedActivation | None, cos: torch.Tensor,
                    sin: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`attn`'s normed, rotated query and key (`[B, S_text + S_image, heads, head_dim]`, text first when
    `encoder_hidden_states` is given) through the op: what diffusers' processor hands to attention. `attn` needs
    only the projections and norms (a context-parallel part holds just those). The inputs may come quantized
    once for all projections (`QuantizedActivation`, recipe lever `fused_norm_quant`)."""
    if encoder_hidden_states is not None:
        text_q = _projection_parts(attn.add_q_proj, encoder_hidden_states, attn.norm_added_q)
        text_k = _projection_parts(attn.add_k_proj, encoder_hidden_states, attn.norm_added_k)
    else:
        empty = no_tokens(hidden_states)
        text_q = text_k = (empty, empty.new_empty(0), empty.new_empty(0), attn.norm_q.weight)
    eps = attn.norm_q.eps
    query = torch.ops.aotpack.qk_norm_rope(*text_q, *_projection_parts(attn.to_q, hidden_states, attn.norm_q),
                                           cos, sin, eps, head_dim)
    key = torch.ops.aotpack.qk_norm_rope(*text_k, *_projection_parts(attn.to_k, hidden_states, attn.norm_k),
                                         cos, sin, eps, head_dim)
    return query, key


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

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            # hidden_states (and encoder_hidden_states) may be QuantizedActivations: blocks under fused_norm_quant
            # call the processor directly (fused_blocks.py), never with the calls that go to the parent
            if image_rotary_emb is None or attention_mask is not None or attn.fused_projections:
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
            from . import fp8_attention

            joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
            query, key = fused_query_key(attn, hidden_states, encoder_hidden_states if joint else None,
                                         *image_rotary_emb, attn.head_dim)
            value = linear_output(attn.to_v, hidden_states)
            if joint:
                value = torch.cat([linear_output(attn.add_v_proj, encoder_hidden_states), value], dim=1)
            value = value.unflatten(-1, (-1, attn.head_dim))
            # the FP8-attention op (recipe attention = "cudnn_fp8") reads its q/k scales from `attn`'s norms
            token = fp8_attention.current_attention_module.set(attn)
            try:
                out = transformer_flux.dispatch_attention_fn(query, key, value, attn_mask=None,
                                                             backend=self._attention_backend,
                                                             parallel_config=self._parallel_config)
            finally:
                fp8_attention.current_attention_module.reset(token)
            out = out.flatten(2, 3).to(query.dtype)
            if not joint:
                return out
            text_out, image_out = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
            # linear_output: the slot's own forward, or one op with the LoRA in the GEMM (lora_up_in_gemm)
            image_out = attn.to_out[1](linear_output(attn.to_out[0], image_out.contiguous()))
            return image_out, linear_output(attn.to_add_out, text_out.contiguous())

    return FusedQKNormRopeProcessor


def _fusable(attn) -> bool:
    """diffusers' own processor, and q/k norms the kernel computes: torch.nn.RMSNorm over the head dim with a
    weight and one eps (Flux in the supported diffusers series)."""
    from diffusers.models.transformers import transformer_flux

    norms = [attn.norm_q, attn.norm_k] + ([attn.norm_added_q, attn.norm_added_k] if attn.added_kv_proj_dim else [])
    return (type(attn.processor) is transformer_flux.FluxAttnProcessor
            and all(type(n) is torch.nn.RMSNorm and n.weight is not None and n.eps is not None
                    and tuple(n.normalized_shape) == (attn.head_dim,) and n.eps == attn.norm_q.eps for n in norms))


def install_fused_qk_norm_rope(transformer) -> int:
    """Give every Flux attention of `transformer` whose q/k norms are weighted RMSNorms the fused processor, in
    place; returns how many. Weight and slot names do not change."""
    processor_class = _processor_class()
    attentions = [block.attn for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks)]
    fused = 0
    for attn in attentions:
        if _fusable(attn):
            attn.set_processor(processor_class())
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
    return errors


def check_kernel_against_reference(device) -> None:
    """`refuse_kernel_errors` for the q/k norm + RoPE kernel."""
    refuse_kernel_errors("fused q/k RMSNorm + RoPE", "fused_qk_norm_rope", device, kernel_errors(device))
