"""One pass for a Flux attention's q/k epilogue: the recipe lever `fused_qk_norm_rope`.

Between the q (or k) projection's FP8 GEMM and attention, diffusers' `FluxAttnProcessor` adds the bias
(and a slot's LoRA delta), applies the per-head RMSNorm, concatenates text and image tokens and applies
the rotary embedding. Inductor compiles that into two to four kernels per tensor; in a no-slot program
the single block's took ~9 ms per 1024^2 step on the H200 (it re-derives the norm element by element
in a 2-D tiled kernel with masked half loads), the slotted programs' ~6 ms for both block kinds
(kernel breakdown, `benchmarks/results/2026-12-01m-h200-fused-quant/c-speed-1024/speed.json`, random
weights). The minimum is one read of the GEMM output and one write of the result: ~2 ms per step.

- `torch.ops.aotpack.qk_norm_rope(text parts, image parts, cos, sin, eps, head_dim)`: a
  `torch.library.triton_op`. Each part is a projection's (GEMM output, bias, A x, B, norm weight): a bound
  slot's LoRA comes as its two factors, so the kernel runs the up-projection itself (below); empty
  tensors where absent; the text part may have no tokens (single blocks). It returns
  `[B, S_text + S_image, heads, head_dim]`, what the processor hands to attention. On CUDA the body
  launches one Triton kernel per part through `wrap_triton` (compiled into the programs;
  qk_norm_rope_kernels.py); elsewhere, and as the reference, it runs `qk_norm_rope_reference`, diffusers'
  own arithmetic in torch ops.
- Parts with a LoRA take the token-tile kernel: 32 tokens x one head per program, the head's slice of the
  up-projection as a `tl.dot` ([32, rank] x [rank, 128]), so the delta (a [tokens, 3072] bf16 tensor per q
  and k) is neither written by a GEMM nor read back: ~6.5 GB per 1024^2 step, ~1.4 ms of H200 bandwidth.
  Ranks below 16 (tl.dot's least) or not a power of two get the delta from torch first, then the per-token
  kernel.
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
from .fused_quant import epilogue_sum, register_triton_op, unsummed_linear


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' `apply_rotary_emb(x, (cos, sin), sequence_dim=1)` (use_real, unbind dim -1), op for op."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def lora_delta(y: torch.Tensor, hidden: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """A slot's LoRA delta from its factors (`hidden` = A x, `up` = B), as `LoRASlotLinear.lora_delta` finishes it
    and rounded to `y`'s dtype; empty when the part has no LoRA."""
    return F.linear(hidden, up).to(y.dtype) if hidden.numel() else y.new_empty(0)


def qk_norm_rope_reference(text_y, text_bias, text_hidden, text_up, text_weight, image_y, image_bias, image_hidden,
                           image_up, image_weight, cos, sin, eps: float, head_dim: int) -> torch.Tensor:
    """`rope(cat([norm_text(text), norm_image(image)], tokens))` in `[B, S, heads, head_dim]`, where each part is
    `y + bias + up @ hidden` ([B, S_part, heads * head_dim]) unflattened to heads."""
    parts = []
    for y, bias, hidden, up, weight in ((text_y, text_bias, text_hidden, text_up, text_weight),
                                        (image_y, image_bias, image_hidden, image_up, image_weight)):
        if y.shape[1] == 0:
            continue
        x = epilogue_sum(y, bias, lora_delta(y, hidden, up)).unflatten(-1, (-1, head_dim))
        parts.append(F.rms_norm(x, (head_dim,), weight, eps))  # what Flux's torch.nn.RMSNorm q/k norms run
    x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return _rotary(x, cos, sin)


@functools.cache
def _kernels():
    """The Triton kernels (per token; per token tile with the LoRA up-projection), imported on first use: the
    CPU-only install has no triton."""
    from . import qk_norm_rope_kernels

    return qk_norm_rope_kernels.qk_norm_rope_kernel, qk_norm_rope_kernels.qk_lora_norm_rope_kernel


def _head_block(heads: int) -> int:
    """Heads per program: the largest power of two that divides `heads`, at most 8 (8 x 128 values)."""
    block = 1
    while block < 8 and heads % (block * 2) == 0:
        block *= 2
    return block


# Launch configs from the kernel probe (H200, 1024^2 shapes, launches replayed from a CUDA graph;
# benchmarks/results/2026-12-01n-h200-qk-norm-rope/d-kernel-configs): one warp per program was fastest,
# 0.0176 vs 0.0210 ms per single-block tensor with 8 heads per program.
_WARPS_PER_TOKEN = 1
# The token-tile kernel: (tokens, heads, warps) per program.
_TILE = (32, 1, 4)


def _dot_takes(hidden: torch.Tensor, up: torch.Tensor, head_dim: int) -> bool:
    """Whether the token-tile kernel can run this slot's up-projection: tl.dot on 16-bit factors of one dtype
    (fp32 ones would go through TF32), a power-of-two rank of at least 16 (tl.dot's least), half a head of at
    least 16 lanes, unit stride along the rank."""
    rank = hidden.shape[-1]
    return (hidden.dtype == up.dtype and hidden.dtype in (torch.bfloat16, torch.float16) and rank >= 16
            and rank & (rank - 1) == 0 and head_dim >= 32 and hidden.stride(-1) == 1 and up.stride(-1) == 1)


def _qk_norm_rope_triton(text_y, text_bias, text_hidden, text_up, text_weight, image_y, image_bias, image_hidden,
                         image_up, image_weight, cos, sin, eps: float, head_dim: int, head_block: int | None = None,
                         num_warps: int = _WARPS_PER_TOKEN, tile: tuple[int, int, int] = _TILE,
                         up_in_kernel: bool = True) -> torch.Tensor:
    """The kernel launches. The per-token kernel's `head_block` and `num_warps`, the token-tile kernel's `tile`
    (tokens, heads, warps per program) and `up_in_kernel` (False: the delta from torch, then the per-token
    kernel) are for the probe's sweep."""
    from torch.library import wrap_triton

    per_token, per_tile = _kernels()
    batch, image_tokens, width = image_y.shape
    text_tokens = text_y.shape[1]
    heads = width // head_dim
    total = text_tokens + image_tokens
    out = torch.empty(batch, total, heads, head_dim, dtype=image_y.dtype, device=image_y.device)
    cos, sin = cos.contiguous(), sin.contiguous()
    block = head_block or _head_block(heads)
    tile_tokens, tile_heads, tile_warps = tile
    for first, (y, bias, hidden, up, weight) in (
            (0, (text_y, text_bias, text_hidden, text_up, text_weight)),
            (text_tokens, (image_y, image_bias, image_hidden, image_up, image_weight))):
        tokens = y.shape[1]
        if tokens == 0:
            continue
        y, bias, weight = y.contiguous(), bias.contiguous(), weight.contiguous()
        # an empty input's pointer is never read (its flag is off): `y` stands in for it
        if up_in_kernel and hidden.numel() and _dot_takes(hidden, up, head_dim) and heads % tile_heads == 0:
            wrap_triton(per_tile)[((tokens + tile_tokens - 1) // tile_tokens * (heads // tile_heads), batch)](
                y, bias if bias.numel() else y, hidden, up, weight, cos, sin, out, tokens, first, total,
                hidden.stride(0), hidden.stride(1), up.stride(0), eps, HEADS=heads, HEAD_DIM=head_dim,
                RANK=hidden.shape[-1], TOKEN_BLOCK=tile_tokens, HEAD_GROUP=tile_heads, HAS_BIAS=bias.numel() > 0,
                num_warps=tile_warps)
            continue
        delta = lora_delta(y, hidden, up).contiguous()
        wrap_triton(per_token)[(tokens * (heads // block), batch)](
            y, bias if bias.numel() else y, delta if delta.numel() else y, weight, cos, sin, out, tokens, first,
            total, eps, HEADS=heads, HEAD_DIM=head_dim, HEAD_BLOCK=block, HAS_BIAS=bias.numel() > 0,
            HAS_DELTA=delta.numel() > 0, num_warps=num_warps)
    return out


def _supported_by_kernel(head_dim: int) -> bool:
    return head_dim >= 2 and head_dim & (head_dim - 1) == 0  # tl.arange needs a power of two


def _qk_norm_rope(text_y: torch.Tensor, text_bias: torch.Tensor, text_hidden: torch.Tensor, text_up: torch.Tensor,
                  text_weight: torch.Tensor, image_y: torch.Tensor, image_bias: torch.Tensor,
                  image_hidden: torch.Tensor, image_up: torch.Tensor, image_weight: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, eps: float, head_dim: int) -> torch.Tensor:
    args = (text_y, text_bias, text_hidden, text_up, text_weight, image_y, image_bias, image_hidden, image_up,
            image_weight, cos, sin, eps, head_dim)
    if image_y.device.type == "cuda" and _supported_by_kernel(head_dim):
        return _qk_norm_rope_triton(*args)
    return qk_norm_rope_reference(*args)


qk_norm_rope = register_triton_op("aotpack::qk_norm_rope", _qk_norm_rope)


def _projection_parts(linear, x: torch.Tensor, norm) -> tuple:
    return (*unsummed_linear(linear, x, factored=True), norm.weight)


def fused_query_key(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None, cos: torch.Tensor,
                    sin: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`attn`'s normed, rotated query and key (`[B, S_text + S_image, heads, head_dim]`, text first when
    `encoder_hidden_states` is given) through the op: what diffusers' processor hands to attention. `attn` needs
    only the projections and norms (a context-parallel part holds just those)."""
    if encoder_hidden_states is not None:
        text_q = _projection_parts(attn.add_q_proj, encoder_hidden_states, attn.norm_added_q)
        text_k = _projection_parts(attn.add_k_proj, encoder_hidden_states, attn.norm_added_k)
    else:
        empty = hidden_states[:, :0]
        none = empty.new_empty(0)
        text_q = text_k = (empty, none, none, none, attn.norm_q.weight)
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
            if image_rotary_emb is None or attention_mask is not None or attn.fused_projections:
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
            from . import fp8_attention

            joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
            query, key = fused_query_key(attn, hidden_states, encoder_hidden_states if joint else None,
                                         *image_rotary_emb, attn.head_dim)
            value = attn.to_v(hidden_states)
            if joint:
                value = torch.cat([attn.add_v_proj(encoder_hidden_states), value], dim=1)
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
            image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
            return image_out, attn.to_add_out(text_out.contiguous())

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
    inputs: a double block's text + image parts with bias and a rank-64 LoRA whose `A x` is a strided view (as
    the grouped down-projection hands it over), a single block's image part with bias only, and a rank-8 LoRA
    (below tl.dot's smallest rank: the delta is formed before the kernel). Relative L2 of the outputs."""
    generator = torch.Generator().manual_seed(0)
    width, errors = 24 * 128, {}
    for name, text_tokens, rank in (("double_block", 13, 64), ("single_block", 0, 0), ("small_rank", 5, 8)):
        def part(n):
            y = 3 * torch.randn(2, n, width, generator=generator)
            grouped = torch.randn(2, n, 3 * rank, generator=generator)  # [A_q x, A_k x, A_v x]
            up = 0.1 * torch.randn(width, rank, generator=generator) if rank else torch.zeros(0)
            return [y, torch.randn(width, generator=generator), grouped, up,
                    1 + 0.1 * torch.randn(128, generator=generator)]

        args = [t.to(device, torch.bfloat16) for t in part(text_tokens) + part(tokens)]
        for at in (2, 7):  # hidden: the middle third of the grouped product, a view with token stride 3 x rank
            args[at] = args[at][..., rank:2 * rank] if rank else args[at].new_empty(0)
        angles = torch.randn(text_tokens + tokens, 128, generator=generator)
        args += [t.to(device) for t in (angles.cos(), angles.sin())]
        got = torch.ops.aotpack.qk_norm_rope(*args, 1e-6, 128)
        errors[name] = relative_error(got.float(), qk_norm_rope_reference(*args, 1e-6, 128).float())
    return errors


def check_kernel_against_reference(device, tolerance: float = 1e-2) -> None:
    """Refuse a build whose GPU kernel parts from the reference (as fused_quant's check does for its kernel)."""
    from ..errors import ValidationFailedError

    errors = kernel_errors(device)
    if max(errors.values()) > tolerance:
        raise ValidationFailedError(
            "the fused q/k RMSNorm + RoPE kernel disagrees with its reference on "
            f"{device}: " + ", ".join(f"{k} {v:.3g}" for k, v in errors.items()) + f" (relative L2; limit {tolerance})",
            "set fused_qk_norm_rope = false in the recipe and report it with `aotpack doctor` output")

