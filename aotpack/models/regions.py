"""Program units cut from a slotted `FluxTransformer2DModel`.

Regional layout: one program per distinct block type (double, single) plus a prologue (embedders,
rotary table) and an epilogue (final norm + projection); the runtime loads a block program once
per block and binds that block's weights. Whole layout: one program for the entire forward.

Every region's `forward` takes activations then `lora`, a dict of A/B tensors keyed by slot names
relative to the region. Parameter names inside a region are the program's constant names, so the
runtime rebuilds the same wrapper around its own model to bind weights.
"""

from __future__ import annotations

import torch
from torch import nn

from .fused_blocks import fused_double_block, fused_single_block
from .fused_quant import gelu_goes_into_proj_out
from .norm_quant import fuses_norm_quant
from .slots import LoRASlotLinear, bind_slot_tensors, slot_input_names, slot_modules

PROLOGUE, DOUBLE_BLOCK, SINGLE_BLOCK, EPILOGUE, WHOLE = "prologue", "double_block", "single_block", "epilogue", "whole"
BLOCK_KINDS = (DOUBLE_BLOCK, SINGLE_BLOCK)
JOINT_INPUT = "joint_hidden_states"  # first input of single-block programs that take `[text; image]`


class Region(nn.Module):
    """A module plus its LoRA slots; subclasses define `forward(*activations, lora)`."""

    kind: str
    activation_names: tuple[str, ...]

    def slots(self) -> dict[str, LoRASlotLinear]:
        return slot_modules(self.body)

    def slot_names(self) -> list[str]:
        return list(self.slots())

    def lora_names(self) -> list[str]:
        return [n for name, slot in self.slots().items() for n in slot_input_names(name, slot)]

    def bind_lora(self, lora: dict[str, torch.Tensor] | None) -> None:
        bind_slot_tensors(self.body, lora)


def _time_text_embed(transformer, hidden_states, timestep, guidance, pooled_projections):
    timestep = timestep.to(hidden_states.dtype) * 1000
    if guidance is None:
        return transformer.time_text_embed(timestep, pooled_projections)
    guidance = guidance.to(hidden_states.dtype) * 1000
    return transformer.time_text_embed(timestep, guidance, pooled_projections)


def _prologue(transformer, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
              guidance):
    """`FluxTransformer2DModel.forward` up to the first block, step for step."""
    hidden_states = transformer.x_embedder(hidden_states)
    temb = _time_text_embed(transformer, hidden_states, timestep, guidance, pooled_projections)
    encoder_hidden_states = transformer.context_embedder(encoder_hidden_states)
    rotary_cos, rotary_sin = transformer.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
    return hidden_states, encoder_hidden_states, temb, rotary_cos, rotary_sin


# Positional inputs of the prologue/whole programs; `guidance` is always a parameter, None (no program
# input) for models without guidance embedding.
PROLOGUE_INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
                   "guidance")


def prologue_arguments(inputs: dict) -> tuple:
    """`FluxTransformer2DModel.forward` keyword inputs as the prologue/whole programs take them,
    positionally (guidance None without guidance embedding, position ids in float32)."""
    values = {"guidance": None, **inputs}
    values["img_ids"], values["txt_ids"] = inputs["img_ids"].float(), inputs["txt_ids"].float()
    return tuple(values[name] for name in PROLOGUE_INPUTS)


def _epilogue(transformer, hidden_states, temb):
    return transformer.proj_out(transformer.norm_out(hidden_states, temb))


class _TransformerPart(nn.Module):
    """Holds only the top-level submodules a prologue/epilogue uses, under their own names."""

    def __init__(self, transformer, names):
        super().__init__()
        for name in names:
            setattr(self, name, getattr(transformer, name))


PROLOGUE_MODULES = ("x_embedder", "time_text_embed", "context_embedder", "pos_embed")
EPILOGUE_MODULES = ("norm_out", "proj_out")


class PrologueRegion(Region):
    kind = PROLOGUE

    def __init__(self, transformer):
        super().__init__()
        self.body = _TransformerPart(transformer, PROLOGUE_MODULES)
        self.activation_names = PROLOGUE_INPUTS

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance, lora):
        self.bind_lora(lora)
        return _prologue(self.body, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids,
                         txt_ids, guidance)


class BlockRegion(Region):
    """One transformer block: `(hidden, encoder, temb, cos, sin) -> (encoder, hidden)`. Double blocks;
    also single blocks of packages built before they took the joint sequence (JointSingleBlockRegion)."""

    activation_names = ("hidden_states", "encoder_hidden_states", "temb", "rotary_cos", "rotary_sin")

    def __init__(self, block, kind: str):
        super().__init__()
        self.body = block
        self.kind = kind

    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_cos, rotary_sin, lora):
        self.bind_lora(lora)
        if fuses_norm_quant(self.body):  # recipe lever fused_norm_quant
            encoder_hidden_states, hidden_states = fused_double_block(
                self.body, hidden_states, encoder_hidden_states, temb, (rotary_cos, rotary_sin))
        else:
            encoder_hidden_states, hidden_states = self.body(
                hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb,
                image_rotary_emb=(rotary_cos, rotary_sin))
        # Programs assume contiguous inputs (AOTInductor does not check strides), and a single
        # block returns slices of one buffer: hand the next program dense tensors.
        return encoder_hidden_states.contiguous(), hidden_states.contiguous()


class JointSingleBlockRegion(Region):
    """A single block on the joint sequence `[text; image]`: `(joint, temb, cos, sin) -> (joint,)`.

    diffusers' single block takes text and image apart, concatenates them, and slices them apart
    again. Compiled with two dynamic token counts, the concatenated length is a sum of symbols and
    Inductor cannot fuse activation quantization into the norm: each of the four input projections
    got its own fp32 copy and an extra pass. One token axis lets it fuse, and the runtime
    concatenates once before the first single block instead of in every block. Measured on the H200
    (1024², r64 in slots): norm/elementwise kernels 12.9 -> 4.6 ms per step, step 117.6 -> 112.1 ms.
    """

    kind = SINGLE_BLOCK
    activation_names = (JOINT_INPUT, "temb", "rotary_cos", "rotary_sin")

    def __init__(self, block):
        super().__init__()
        self.body = block

    def forward(self, joint_hidden_states, temb, rotary_cos, rotary_sin, lora):
        self.bind_lora(lora)
        if gelu_goes_into_proj_out(self.body):  # recipe lever fused_gelu_quant
            return (fused_single_block(self.body, joint_hidden_states, temb, (rotary_cos, rotary_sin)).contiguous(),)
        # diffusers' block, unchanged, with an empty text part: its concatenation and split are no-ops
        _, joint = self.body(hidden_states=joint_hidden_states, encoder_hidden_states=joint_hidden_states[:, :0],
                             temb=temb, image_rotary_emb=(rotary_cos, rotary_sin))
        return (joint.contiguous(),)  # a 1-tuple, like the other blocks' outputs


class EpilogueRegion(Region):
    kind = EPILOGUE
    activation_names = ("hidden_states", "temb")

    def __init__(self, transformer):
        super().__init__()
        self.body = _TransformerPart(transformer, EPILOGUE_MODULES)

    def forward(self, hidden_states, temb, lora):
        self.bind_lora(lora)
        return _epilogue(self.body, hidden_states, temb)


class WholeRegion(Region):
    """The entire transformer forward as one program (slot names are the full layer names)."""

    kind = WHOLE

    def __init__(self, transformer):
        super().__init__()
        self.body = transformer
        self.activation_names = PROLOGUE_INPUTS

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance, lora):
        self.bind_lora(lora)
        t = self.body
        hidden_states, encoder_hidden_states, temb, cos, sin = _prologue(
            t, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance)
        for block in list(t.transformer_blocks) + list(t.single_transformer_blocks):
            encoder_hidden_states, hidden_states = block(
                hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb,
                image_rotary_emb=(cos, sin))
        return _epilogue(t, hidden_states, temb)


def run_joint(blocks, hidden, encoder, *rest) -> torch.Tensor:
    """Single blocks on the joint sequence: concatenate `[text; image]` once, run each block
    (`block(joint, *rest) -> (joint,)`), return the image tokens, dense."""
    joint = torch.cat([encoder, hidden], dim=1)
    for block in blocks:
        (joint,) = block(joint, *rest)
    return joint[:, encoder.shape[1]:].contiguous()


def block_prefixes(transformer) -> dict[str, list[str]]:
    """Module paths of the blocks of each kind, in execution order."""
    return {
        DOUBLE_BLOCK: [f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))],
        SINGLE_BLOCK: [f"single_transformer_blocks.{i}" for i in range(len(transformer.single_transformer_blocks))],
    }


def make_region(transformer, kind: str, instance: str | None = None) -> Region:
    """The region wrapper for `kind`; `instance` is the block's module path for block kinds."""
    if kind == PROLOGUE:
        return PrologueRegion(transformer)
    if kind == EPILOGUE:
        return EpilogueRegion(transformer)
    if kind == WHOLE:
        return WholeRegion(transformer)
    if kind == SINGLE_BLOCK:
        return JointSingleBlockRegion(transformer.get_submodule(instance))
    return BlockRegion(transformer.get_submodule(instance), kind)


def instance_slot_prefix(kind: str, instance: str | None) -> str:
    """Prefix that turns a region-relative slot name into the transformer's layer name."""
    if kind in BLOCK_KINDS or instance is not None:  # block programs, split ones included
        return f"{instance}."
    return ""
