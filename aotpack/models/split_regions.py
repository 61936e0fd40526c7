"""Block programs split around attention, for context-parallel (Ulysses) packages.

A Flux block needs the whole joint sequence only inside attention. Each block is cut into a
"pre" program (norms, modulation, q/k/v projections, q/k RMSNorm, RoPE) and a "post" program
(output projections, gates, MLP, residuals); the runtime runs attention between them, after an
all-to-all that trades sequence shards for head shards (runtime/parallel.py). Both parts work on
any token subset of the joint sequence `[text; image]`, so one package serves 1..N ranks.

The math is diffusers' `FluxTransformerBlock` / `FluxSingleTransformerBlock` / `FluxAttnProcessor`
step for step (checked against the unsplit block in tests). q/k/v leave the pre program stacked as
`[heads, 3, batch, tokens, head_dim]`: heads outermost, so the N head groups a rank sends are N
contiguous slices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from .fused_quant import gelu_goes_into_proj_out, linear_after_gelu
from .qk_norm_rope import fused_query_key, uses_fused_qk_norm_rope
from .regions import Region

DOUBLE_PRE, DOUBLE_POST = "double_pre", "double_post"
SINGLE_PRE, SINGLE_POST = "single_pre", "single_post"
SPLIT_KINDS = (DOUBLE_PRE, DOUBLE_POST, SINGLE_PRE, SINGLE_POST)
PARALLEL_MODES = ("none", "ulysses")

# Submodules (relative to the block) each part reads; the region holds only these, so its
# state_dict is exactly the program's constants and its slots exactly the program's LoRA inputs.
PARTS = {
    DOUBLE_PRE: ("norm1", "norm1_context", "attn.to_q", "attn.to_k", "attn.to_v", "attn.norm_q", "attn.norm_k",
                 "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.norm_added_q", "attn.norm_added_k"),
    DOUBLE_POST: ("attn.to_out", "attn.to_add_out", "norm2", "ff", "norm2_context", "ff_context"),
    SINGLE_PRE: ("norm", "proj_mlp", "act_mlp", "attn.to_q", "attn.to_k", "attn.to_v", "attn.norm_q", "attn.norm_k"),
    SINGLE_POST: ("act_mlp", "proj_out"),  # act_mlp (no weights) says whether the GELU is fused into proj_out
}

# Dynamic shape symbols of each input (export.input_layouts reads `Region.input_layouts`).
# "rotary_tokens" is text + image tokens of the shard, derived by export (Dim.AUTO); "joint_tokens" is
# the same count as its own symbol (export.py).
_LAYOUTS = {
    DOUBLE_PRE: {"hidden_states": ("batch", "image_tokens", None), "encoder_hidden_states": ("batch", "text_tokens", None),
                 "temb": ("batch", None), "rotary_cos": ("rotary_tokens", None), "rotary_sin": ("rotary_tokens", None)},
    DOUBLE_POST: {"attention": ("batch", "rotary_tokens", None), "hidden_states": ("batch", "image_tokens", None),
                  "encoder_hidden_states": ("batch", "text_tokens", None), "modulation": ("batch", None, None)},
    # Single blocks work on the joint `[text; image]` shard, one token axis (see regions.JointSingleBlockRegion)
    SINGLE_PRE: {"joint_hidden_states": ("batch", "joint_tokens", None), "temb": ("batch", None),
                 "rotary_cos": ("joint_tokens", None), "rotary_sin": ("joint_tokens", None)},
    SINGLE_POST: {"attention": ("batch", "joint_tokens", None), "mlp": ("batch", "joint_tokens", None),
                  "gate": ("batch", None), "joint_hidden_states": ("batch", "joint_tokens", None)},
}


def _subset(block: nn.Module, paths) -> nn.Module:
    """A module tree holding only `paths` of `block`, under the same dotted names (shared, not copied)."""
    root = nn.Module()
    for path in paths:
        *parents, leaf = path.split(".")
        node, source = root, block
        for name in parents:
            source = getattr(source, name)
            if not hasattr(node, name):
                setattr(node, name, nn.Module())
            node = getattr(node, name)
        setattr(node, leaf, getattr(source, leaf))
    return root


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))


def _stack(query, key, value) -> torch.Tensor:
    """q/k/v ([B, S, H, D] each) as one `[H, 3, B, S, D]` tensor."""
    return torch.stack((query, key, value)).permute(3, 0, 1, 2, 4).contiguous()


def _rope_stack(query, key, value, cos, sin) -> torch.Tensor:
    """RoPE on q/k ([B, S, H, D]), then `_stack`."""
    return _stack(apply_rotary_emb(query, (cos, sin), sequence_dim=1), apply_rotary_emb(key, (cos, sin), sequence_dim=1),
                  value)


class SplitRegion(Region):
    """One part of one block; `kind` in SPLIT_KINDS."""

    def __init__(self, block: nn.Module, kind: str):
        super().__init__()
        self.kind = kind
        self.body = _subset(block, PARTS[kind])
        self.input_layouts = _LAYOUTS[kind]
        self.activation_names = tuple(_LAYOUTS[kind])
        self.head_dim = block.attn.head_dim
        self.fused_qk = uses_fused_qk_norm_rope(block.attn)  # recipe lever fused_qk_norm_rope: norms + RoPE in one op


    # -- double block -----------------------------------------------------------------------------
    def _double_pre(self, hidden_states, encoder_hidden_states, temb, rotary_cos, rotary_sin):
        b, attn, d = self.body, self.body.attn, self.head_dim
        norm_hidden, gate_msa, shift_mlp, scale_mlp, gate_mlp = b.norm1(hidden_states, emb=temb)
        norm_encoder, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = b.norm1_context(encoder_hidden_states,
                                                                                         emb=temb)
        value = torch.cat([_heads(attn.add_v_proj(norm_encoder), d), _heads(attn.to_v(norm_hidden), d)], dim=1)
        if self.fused_qk:
            qkv = _stack(*fused_query_key(attn, norm_hidden, norm_encoder, rotary_cos, rotary_sin, d), value)
        else:
            query = attn.norm_q(_heads(attn.to_q(norm_hidden), d))
            key = attn.norm_k(_heads(attn.to_k(norm_hidden), d))
            encoder_query = attn.norm_added_q(_heads(attn.add_q_proj(norm_encoder), d))
            encoder_key = attn.norm_added_k(_heads(attn.add_k_proj(norm_encoder), d))
            qkv = _rope_stack(torch.cat([encoder_query, query], dim=1), torch.cat([encoder_key, key], dim=1),
                              value, rotary_cos, rotary_sin)
        modulation = torch.stack((gate_msa, shift_mlp, scale_mlp, gate_mlp, c_gate_msa, c_shift_mlp, c_scale_mlp,
                                  c_gate_mlp), dim=1)
        return qkv, modulation

    def _double_post(self, attention, hidden_states, encoder_hidden_states, modulation):
        b = self.body
        gate_msa, shift_mlp, scale_mlp, gate_mlp, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = \
            modulation.unbind(1)
        text = encoder_hidden_states.shape[1]
        context_attn, attn_output = attention.split_with_sizes([text, attention.shape[1] - text], dim=1)
        attn_output = b.attn.to_out[1](b.attn.to_out[0](attn_output.contiguous()))
        context_attn = b.attn.to_add_out(context_attn.contiguous())

        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
        norm_hidden = b.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * b.ff(norm_hidden)

        encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn
        norm_encoder = b.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * b.ff_context(norm_encoder)
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states.contiguous(), hidden_states.contiguous()

    # -- single block -----------------------------------------------------------------------------
    def _single_pre(self, joint, temb, rotary_cos, rotary_sin):
        b, attn, d = self.body, self.body.attn, self.head_dim
        norm_hidden, gate = b.norm(joint, emb=temb)
        mlp = b.proj_mlp(norm_hidden)
        if not gelu_goes_into_proj_out(b):  # fused_gelu_quant: the post program applies the GELU
            mlp = b.act_mlp(mlp)
        value = _heads(attn.to_v(norm_hidden), d)
        if self.fused_qk:
            return _stack(*fused_query_key(attn, norm_hidden, None, rotary_cos, rotary_sin, d), value), mlp, gate
        query = attn.norm_q(_heads(attn.to_q(norm_hidden), d))
        key = attn.norm_k(_heads(attn.to_k(norm_hidden), d))
        return _rope_stack(query, key, value, rotary_cos, rotary_sin), mlp, gate

    def _single_post(self, attention, mlp, gate, joint):
        b = self.body
        if gelu_goes_into_proj_out(b):  # GELU + concat + FP8 quantization in one kernel
            projected = linear_after_gelu(b.proj_out, attention, None, mlp)
        else:
            projected = b.proj_out(torch.cat([attention, mlp], dim=2))
        joint = joint + gate.unsqueeze(1) * projected
        if joint.dtype == torch.float16:
            joint = joint.clip(-65504, 65504)
        return (joint.contiguous(),)


class DoublePre(SplitRegion):
    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_cos, rotary_sin, lora):
        self.bind_lora(lora)
        return self._double_pre(hidden_states, encoder_hidden_states, temb, rotary_cos, rotary_sin)


class DoublePost(SplitRegion):
    def forward(self, attention, hidden_states, encoder_hidden_states, modulation, lora):
        self.bind_lora(lora)
        return self._double_post(attention, hidden_states, encoder_hidden_states, modulation)


class SinglePre(SplitRegion):
    def forward(self, joint_hidden_states, temb, rotary_cos, rotary_sin, lora):
        self.bind_lora(lora)
        return self._single_pre(joint_hidden_states, temb, rotary_cos, rotary_sin)


class SinglePost(SplitRegion):
    def forward(self, attention, mlp, gate, joint_hidden_states, lora):
        self.bind_lora(lora)
        return self._single_post(attention, mlp, gate, joint_hidden_states)


_CLASSES = {DOUBLE_PRE: DoublePre, DOUBLE_POST: DoublePost, SINGLE_PRE: SinglePre, SINGLE_POST: SinglePost}


def split_region(block: nn.Module, kind: str) -> SplitRegion:
    return _CLASSES[kind](block, kind)


def attention_per_head(qkv: torch.Tensor) -> torch.Tensor:
    """Attention over a `[H, 3, B, S, D]` q/k/v stack -> `[B, H, S, D]` (SDPA's own output, not copied).

    Under the caller's `sdpa_kernel` context on CUDA (the recipe's backend)."""
    query, key, value = qkv.permute(1, 2, 0, 3, 4).unbind(0)  # [B, H, S, D] views
    return F.scaled_dot_product_attention(query, key, value).to(qkv.dtype)


def attention(qkv: torch.Tensor) -> torch.Tensor:
    """Attention over a `[H, 3, B, S, D]` q/k/v stack -> `[B, S, H * D]` (FluxAttnProcessor's layout)."""
    return attention_per_head(qkv).transpose(1, 2).flatten(2, 3)


def make_split_region(transformer, kind: str, instance: str) -> SplitRegion:
    return split_region(transformer.get_submodule(instance), kind)


def split_block_eager(block: nn.Module, double: bool, hidden_states, encoder_hidden_states, temb, cos, sin):
    """A block run as pre -> attention -> post in eager (the reference the split programs must match)."""
    pre, post = (split_region(block, DOUBLE_PRE), split_region(block, DOUBLE_POST)) if double else \
        (split_region(block, SINGLE_PRE), split_region(block, SINGLE_POST))
    if double:
        qkv, modulation = pre(hidden_states, encoder_hidden_states, temb, cos, sin, None)
        return post(attention(qkv), hidden_states, encoder_hidden_states, modulation, None)
    joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    qkv, mlp, gate = pre(joint, temb, cos, sin, None)
    (joint,) = post(attention(qkv), mlp, gate, joint, None)
    text = encoder_hidden_states.shape[1]
    return joint[:, :text], joint[:, text:]


def split_example_activations(transformer, kind: str, instance: str, prologue_outputs) -> tuple:
    """Example inputs for tracing a split program: the prologue's outputs through the pre part."""
    hidden, encoder, temb, cos, sin = prologue_outputs
    joint = torch.cat([encoder, hidden], dim=1)
    if kind == DOUBLE_PRE:
        return hidden, encoder, temb, cos, sin
    if kind == SINGLE_PRE:
        return joint, temb, cos, sin
    block = transformer.get_submodule(instance)
    with torch.no_grad():
        if kind == DOUBLE_POST:
            qkv, modulation = split_region(block, DOUBLE_PRE)(hidden, encoder, temb, cos, sin, None)
            return attention(qkv), hidden, encoder, modulation
        qkv, mlp, gate = split_region(block, SINGLE_PRE)(joint, temb, cos, sin, None)
        return attention(qkv), mlp, gate, joint


def valid_world_sizes(heads: int, limit: int = 64) -> list[int]:
    return [n for n in range(1, min(heads, limit) + 1) if heads % n == 0]


def split_program_plan(prefixes: dict[str, list[str]]) -> list[tuple[str, list]]:
    """(kind, instances) of a split package's block programs, in execution order."""
    from .regions import DOUBLE_BLOCK, SINGLE_BLOCK

    plan = []
    for block_kind, (pre, post) in ((DOUBLE_BLOCK, (DOUBLE_PRE, DOUBLE_POST)), (SINGLE_BLOCK, (SINGLE_PRE, SINGLE_POST))):
        if prefixes.get(block_kind):
            plan += [(pre, list(prefixes[block_kind])), (post, list(prefixes[block_kind]))]
    return plan


def check_parallel_build(recipe, config: dict) -> None:
    """A split package needs the regional layout (the runtime runs attention between programs)."""
    from ..errors import RecipeError

    if recipe.layout != "regional":
        raise RecipeError(f"parallel = {recipe.parallel!r} needs layout = 'regional', not {recipe.layout!r}",
                          "build with --layout regional (the runtime runs attention between block programs)")
    heads = int(config.get("num_attention_heads", 0))
    if heads < 1:
        raise RecipeError("the model config has no num_attention_heads", "build context parallel from a Flux model")
