"""Flux block forwards as the block programs run them with aotpack's kernel levers.

diffusers' `FluxTransformerBlock` / `FluxSingleTransformerBlock.forward`, step for step, except where a lever
routes work through aotpack's ops: the single block's `proj_out(cat([attention, gelu(mlp)]))` as one
`linear_after_gelu` (`fused_gelu_quant`), with `fused_norm_quant` each norm + modulation quantized once
for the FP8 linears that read it (`norm_quant.py`), and with `joined_qkv` each stream's q/k/v as one GEMM
(`joined_qkv.py`). The attention processor (diffusers' or `fused_qk_norm_rope`'s) is called directly, so it
receives those quantized inputs as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from .fused_quant import linear_after_gelu
from .joined_qkv import with_joined_outputs
from .norm_quant import fuses_norm_quant, modulated_norm_quant, modulation
from .tail_groups import with_tailed_outputs


def _clip_half(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


def fused_single_block(block: nn.Module, joint: torch.Tensor, temb: torch.Tensor, rotary) -> torch.Tensor:
    """`FluxSingleTransformerBlock.forward` on the joint sequence, with `proj_out(cat([attention, gelu(mlp)]))`
    as one `linear_after_gelu` (the concat is never written out)."""
    attn = block.attn
    if fuses_norm_quant(block):
        shift, scale, gate = modulation(block.norm, temb, 3)
        readers = (attn.to_q, attn.to_k, attn.to_v, block.proj_mlp)
        # with lora_tails (a tailed program) the readers' outputs, LoRA included, are computed here
        normed = with_tailed_outputs(modulated_norm_quant(block.norm.norm, joint, shift, scale, readers), readers)
        attention = attn.processor(attn, normed, None, None, rotary)
    else:
        normed, gate = block.norm(joint, emb=temb)
        attention = attn(hidden_states=normed, image_rotary_emb=rotary)
    projected = linear_after_gelu(block.proj_out, attention, block.proj_mlp, normed)
    return _clip_half(joint + gate.unsqueeze(1) * projected)


def fused_double_block(block: nn.Module, hidden: torch.Tensor, encoder: torch.Tensor, temb: torch.Tensor,
                       rotary) -> tuple[torch.Tensor, torch.Tensor]:
    """`FluxTransformerBlock.forward` (no IP-adapter outputs) with its four norms through
    `modulated_norm_quant`; returns `(encoder, hidden)` as diffusers does."""
    attn = block.attn
    shift, scale, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation(block.norm1, temb, 6)
    c_shift, c_scale, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = modulation(block.norm1_context, temb, 6)
    readers, c_readers = (attn.to_q, attn.to_k, attn.to_v), (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
    # with joined_qkv each stream's q/k/v run as one GEMM here; the processor takes their outputs from `normed`
    normed = with_joined_outputs(modulated_norm_quant(block.norm1.norm, hidden, shift, scale, readers), readers)
    c_normed = with_joined_outputs(modulated_norm_quant(block.norm1_context.norm, encoder, c_shift, c_scale,
                                                        c_readers), c_readers)
    attention, c_attention = attn.processor(attn, normed, c_normed, None, rotary)

    # with lora_tails_mlp_in (a tailed program) each stream's MLP-in output, LoRA included, is computed here
    hidden = hidden + gate_msa.unsqueeze(1) * attention
    mlp_in = (block.ff.net[0].proj,)
    ff_input = with_tailed_outputs(modulated_norm_quant(block.norm2, hidden, shift_mlp, scale_mlp, mlp_in), mlp_in)
    hidden = hidden + gate_mlp.unsqueeze(1) * block.ff(ff_input)

    encoder = encoder + c_gate_msa.unsqueeze(1) * c_attention
    c_mlp_in = (block.ff_context.net[0].proj,)
    c_ff_input = with_tailed_outputs(modulated_norm_quant(block.norm2_context, encoder, c_shift_mlp, c_scale_mlp,
                                                          c_mlp_in), c_mlp_in)
    encoder = encoder + c_gate_mlp.unsqueeze(1) * block.ff_context(c_ff_input)
    return _clip_half(encoder), hidden
