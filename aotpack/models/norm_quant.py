"""One pass for "LayerNorm + modulation + row-wise FP8 quantization": the recipe lever `fused_norm_quant`.

Each Flux block normalizes its input (LayerNorm without affine), modulates it (`x * (1 + scale) + shift`, both
from `temb`) and feeds the result to several FP8 linears: q/k/v in the double blocks (image and text), the
feed-forward's first linear after `norm2`, and q/k/v plus `proj_mlp` in the single blocks. torchao quantizes
the input inside every one of them. Inductor fuses norm, modulation and quantization into one looped
reduction but gives each linear its own copy: in the default package (H200, 1024², 2026-12-03) the single
block's kernel stores the modulated input once in bf16, four float32 copies of `x / scale`, reads them back
and writes four FP8 copies, ~565 MB per call for a 28 MB input; with the double block's three copies it is
`triton_red_..._native_layer_norm_..._1`, 4.80 ms of a 1024² no-LoRA step, the largest kernel after the GEMMs
and attention (`benchmarks/results/2026-12-03b-h200-clean-repeats/c-1024/speed.json`, random weights).

This module quantizes once per norm:
- `torch.ops.aotpack.norm_modulate_quant(x, shift, scale, eps, keep_input)`: a `torch.library.triton_op`
  returning `(q, scale, h)`. On CUDA one Triton program per row loads the row once, normalizes, modulates,
  takes the amax and stores FP8 (and `h`, the modulated input, when a LoRA slot reads it); elsewhere, and as
  the reference, `norm_modulate_quant_reference` runs the same in torch ops (what the CPU tests build and run).
- `modulated_norm_quant` wraps the result as a `QuantizedActivation`, which the block's FP8 linears take as
  they are (`fused_quant.unsummed_linear`); `fused_blocks.py` runs the blocks that way.
- nothing else changes: weights keep their names, diffusers' own block forward (the whole layout, the build's
  end-to-end reference, context-parallel split programs) runs the unfused norms.

Numerics: those of diffusers' `LayerNorm` + modulation followed by torchao's eager quantization, bit for bit on
the CPU (the tests check whole blocks): the norm rounded to the activation dtype, `1 + scale`, the product and
the sum each rounded as eager rounds them, the scale as `fused_quant.quantize_rows` computes it. The GPU
kernel's fp32 mean and variance run in its own order (two passes over the row in registers, not Welford).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .examples import relative_error
from .fused_quant import QuantizedActivation, bound_lora, quantize_rows
from .kernel_ops import refuse_kernel_errors, register_triton_op
from .tail_groups import bound_tails


def norm_modulate_quant_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                                  keep_input: bool):
    """`(q, scale, h)`: h = layer_norm(x) * (1 + scale[:, None]) + shift[:, None] (`x` [B, S, D], `shift` and
    `scale` [B, D]), q its row-wise FP8 quantization, scale [B, S, 1] float32 with h ~ q * scale; h itself only
    if `keep_input` (else an empty tensor)."""
    h = F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale[:, None]) + shift[:, None]
    q, row_scale = quantize_rows(h)
    return q, row_scale, (h if keep_input else x.new_empty(0))


def _norm_modulate_quant_triton(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                                keep_input: bool, num_warps: int | None = None):
    import triton
    from torch.library import wrap_triton

    from .fp8_attention import FP8
    from .norm_quant_kernels import norm_modulate_quant_kernel

    x = x.contiguous()
    # shift and scale are chunks of one modulation output ([B, k * D]): rows are read at their stride
    shift, scale = (t if t.stride(-1) == 1 else t.contiguous() for t in (shift, scale))
    batch, tokens, width = x.shape
    q = torch.empty(batch, tokens, width, dtype=FP8, device=x.device)
    row_scale = torch.empty(batch, tokens, 1, dtype=torch.float32, device=x.device)
    # without keep_input the kernel never writes h; a one-element buffer stands in for its pointer
    h = torch.empty_like(x) if keep_input else x.new_empty(0)
    block = triton.next_power_of_2(width)
    wrap_triton(norm_modulate_quant_kernel)[(batch * tokens,)](
        x, shift, scale, q, row_scale, h if keep_input else x.new_empty(1), tokens, shift.stride(0), scale.stride(0),
        eps, WIDTH=width, BLOCK=block, KEEP_INPUT=keep_input,
        # 2 warps: fastest at the 1024^2 image and joint shapes, 0.0243 vs 0.0365 ms (8 warps) per single-block
        # call; the 512 text rows take ~7 us at any count (H200, 2026-12-03, scripts/gpu/probe_norm_quant_kernel.py,
        # benchmarks/results/2026-12-03c-h200-norm-quant/b-probe-integer-rounding)
        num_warps=num_warps or 2)
    return q, row_scale, h


def _norm_modulate_quant(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                         keep_input: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.device.type == "cuda" and x.dtype == torch.bfloat16:  # the kernel rounds as bf16 (its integer rounding)
        return _norm_modulate_quant_triton(x, shift, scale, eps, keep_input)
    return norm_modulate_quant_reference(x, shift, scale, eps, keep_input)


norm_modulate_quant = register_triton_op("aotpack::norm_modulate_quant", _norm_modulate_quant)


def modulated_norm_quant(norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                         readers) -> QuantizedActivation:
    """`norm(x) * (1 + scale[:, None]) + shift[:, None]`, quantized once for the FP8 linears `readers`; the
    modulated input itself is kept only where one of them is a bound LoRA slot."""
    keep = any(bound_lora(layer) or bound_tails(layer) for layer in readers)  # tails: the down-projection reads it
    return QuantizedActivation(*torch.ops.aotpack.norm_modulate_quant(x, shift, scale, norm.eps, keep))


def modulation(norm: nn.Module, temb: torch.Tensor, chunks: int) -> tuple[torch.Tensor, ...]:
    """An `AdaLayerNormZero(Single)`'s modulation chunks, as its forward computes them."""
    return norm.linear(norm.silu(temb)).chunk(chunks, dim=1)


def fuses_norm_quant(block: nn.Module) -> bool:
    """Whether `install_fused_norm_quant` marked `block` (its regions run it through `fused_blocks.py`)."""
    return getattr(block, "fuses_norm_quant", False)


def _plain_layer_norm(norm: nn.Module) -> bool:
    return type(norm) is nn.LayerNorm and not norm.elementwise_affine and len(norm.normalized_shape) == 1


def _fusable(block: nn.Module, double: bool) -> bool:
    """diffusers' Flux blocks as the supported series builds them: AdaLN-Zero with plain LayerNorms."""
    from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle

    if double:
        return (all(type(n) is AdaLayerNormZero and n.emb is None and _plain_layer_norm(n.norm)
                    for n in (block.norm1, block.norm1_context))
                and _plain_layer_norm(block.norm2) and _plain_layer_norm(block.norm2_context))
    return type(block.norm) is AdaLayerNormZeroSingle and _plain_layer_norm(block.norm.norm)


def install_fused_norm_quant(transformer: nn.Module) -> int:
    """Mark every Flux block of `transformer` (FP8, with `fused_gelu_quant` and `fused_qk_norm_rope` installed)
    whose norms the op computes; returns how many. A plain attribute: weight and slot names do not change."""
    from ..errors import RecipeError
    from .fused_quant import FusedFeedForward, gelu_goes_into_proj_out
    from .qk_norm_rope import uses_fused_qk_norm_rope

    blocks = [(block, True) for block in transformer.transformer_blocks]
    blocks += [(block, False) for block in transformer.single_transformer_blocks]
    for block, double in blocks:  # all checked before any is marked
        routed = (isinstance(block.ff, FusedFeedForward) and isinstance(block.ff_context, FusedFeedForward)
                  if double else gelu_goes_into_proj_out(block))
        if not (routed and uses_fused_qk_norm_rope(block.attn)):
            raise RecipeError("fused_norm_quant needs the blocks' MLPs and attentions fused first",
                              "set fused_gelu_quant = true and fused_qk_norm_rope = true in the recipe")
    fusable = [block for block, double in blocks if _fusable(block, double)]
    for block in fusable:
        block.fuses_norm_quant = True
    return len(fusable)


def kernel_errors(device, rows: int = 131) -> dict[str, float]:
    """The op on `device` against `norm_modulate_quant_reference` on Flux's width (3072), batch 2, random bf16
    inputs with and without the kept input: relative L2 of the dequantized outputs and of the kept input."""
    generator = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(2, rows, 3072, generator=generator) + 0.5).to(device, torch.bfloat16)
    modulation_out = torch.randn(2, 2 * 3072, generator=generator).to(device, torch.bfloat16)
    shift, scale = modulation_out.chunk(2, dim=1)  # strided views, as the blocks pass them
    errors = {}
    for keep in (True, False):
        q, row_scale, h = torch.ops.aotpack.norm_modulate_quant(x, shift, scale, 1e-6, keep)
        q_ref, scale_ref, h_ref = norm_modulate_quant_reference(x, shift, scale, 1e-6, True)
        error = relative_error(q.float() * row_scale, q_ref.float() * scale_ref)
        errors["kept_input" if keep else "quantized_only"] = (
            max(error, relative_error(h, h_ref)) if keep else (error if h.numel() == 0 else float("inf")))
    return errors


def check_kernel_against_reference(device) -> None:
    """`refuse_kernel_errors` for the norm + modulation + quantization kernel."""
    refuse_kernel_errors("fused LayerNorm + modulation + FP8 quantization", "fused_norm_quant", device,
                         kernel_errors(device))
