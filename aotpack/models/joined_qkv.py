"""One FP8 GEMM for each double-block stream's q/k/v projections: the recipe lever `joined_qkv`.

Under `fused_norm_quant` a double block quantizes each stream's norm once, and three GEMMs read that FP8 input:
to_q, to_k and to_v (image), add_q/k/v_proj (text). At 512² (1024 image rows, 512 text rows) each is a small GEMM
whose last wave is nearly empty (288 tiles of 128 x 128 on 132 SMs at N = 3072); one GEMM at N = 9216 fills its
waves. Over the GEMMs alone: -0.60 / -0.62 / -0.80 ms a step at 512² / 1024² / 2048² (H100, 2026-12-06,
scripts/gpu/probe_grouped_gemm.py, benchmarks/results/2026-12-06n-h100-grouped-gemm/, random weights).

How the weights are held: row-wise FP8 quantizes each output row on its own, so the three weights stacked along N
*are* the joined weight, bit for bit. `install_joined_qkv` moves each group's FP8 rows and row scales into one
buffer owned by a `JoinedWeight` on the attention (`attn.joined_qkv`, `attn.joined_added_qkv`) and gives every
member linear a `Float8Tensor` over its rows of that buffer: one storage. The programs read the joined weight only
(AOTInductor drops the members' unused constants; `member_weight_names` tells the runtime which names those are),
while everything that reads or writes a member's weight in place (merges, by address or not, their restore, close)
works on the very bytes the programs read. Build and runtime both install it after quantizing (the runtime from the
manifest's recipe), so the constant names match.

The q/k/v outputs are column slices of one GEMM output: the q/k norm + RoPE kernel reads rows at their stride
(qk_norm_rope.py), V's concatenation reads them as Inductor reads any view.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import RecipeError
from .cond_operands import column_slice
from .fused_quant import QuantizedActivation, float8_over, fp8_linear_prequantized, is_fp8_linear
from .norm_quant import fuses_norm_quant
from .slots import BiasAfterLinear, weight_holder

# (holder name on the attention, the linears that read one quantized input), per double-block stream
GROUPS = (("joined_qkv", ("to_q", "to_k", "to_v")),
          ("joined_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")))
_MEMBER = "_joined_member"  # plain attribute on a member linear: (holder, its index in the group)


class JoinedWeight(nn.Module):
    """The FP8 weight of linears that read one input, joined along N: `weight` [sum of N, K]; `widths` each
    member's N, in order."""

    def __init__(self, weight: torch.Tensor, widths):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.widths = tuple(widths)


def _groups(transformer, check_norms: bool) -> list[tuple[nn.Module, str, list[nn.Module]]]:
    """Every (attention, holder name, member layers) to join; refuses a transformer the lever cannot take."""
    groups = []
    for index, block in enumerate(transformer.transformer_blocks):
        if check_norms and not fuses_norm_quant(block):
            raise RecipeError(f"joined_qkv needs transformer_blocks.{index} to quantize its norms once "
                              "(fused_norm_quant): only then do its q/k/v read one FP8 input",
                              "set fused_norm_quant = true in the recipe, or joined_qkv = false")
        for holder_name, names in GROUPS:
            if hasattr(block.attn, holder_name):
                continue  # installed already (a second call changes nothing)
            layers = [getattr(block.attn, name) for name in names]
            bases = [weight_holder(layer) for layer in layers]
            if not all(is_fp8_linear(base) for base in bases) or len({b.weight.shape[1] for b in bases}) != 1:
                raise RecipeError(f"joined_qkv joins FP8 row-wise linears of one input width, but "
                                  f"transformer_blocks.{index}.attn's {', '.join(names)} are not all such",
                                  "set joined_qkv = false, or keep those linears out of unquantized_linears")
            groups.append((block.attn, holder_name, layers))
    return groups


def install_joined_qkv(transformer, check_norms: bool = True) -> int:
    """Join each double block's q/k/v FP8 weights per stream (after quantization and slotting, before any region
    is made), in place; returns how many groups. Weights and slots keep their names; see the module docstring.
    `check_norms`: refuse a block that does not quantize its norms once (the build, after `fused_norm_quant` marked
    them; a package's runtime does not mark blocks, and its build joined every one)."""
    groups = _groups(transformer, check_norms)  # all checked before any is changed
    for attn, holder_name, layers in groups:
        weights = [weight_holder(layer).weight for layer in layers]
        qdata = torch.cat([w.qdata for w in weights])
        scale = torch.cat([w.scale for w in weights])
        holder = JoinedWeight(float8_over(qdata, scale, weights[0]), [w.shape[0] for w in weights])
        start = 0
        for position, (layer, weight) in enumerate(zip(layers, weights)):
            rows = slice(start, start + weight.shape[0])
            start = rows.stop
            # the member's own storage goes (its rows now live in the joined buffer): no memory held twice
            weight_holder(layer).weight = nn.Parameter(float8_over(qdata[rows], scale[rows], weight),
                                                       requires_grad=False)
            object.__setattr__(layer, _MEMBER, (holder, position))  # not a submodule: names stay the model's
        setattr(attn, holder_name, holder)
    return len(groups)


def with_joined_outputs(x: QuantizedActivation, readers) -> QuantizedActivation:
    """`x` (the FP8 input of `readers`) carrying the readers' GEMM outputs where they make one joined group: one
    GEMM over the joined weight, each reader's output a column slice of it (`unsummed_linear` takes it from there).
    `x` as it is where they are not joined."""
    members = [getattr(layer, _MEMBER, None) for layer in readers]
    if not members or any(member is None for member in members):
        return x
    holder = members[0][0]
    if any(member[0] is not holder for member in members) or len(members) != len(holder.widths):
        return x
    joined = fp8_linear_prequantized(holder, x.q, x.scale, x.dtype)
    starts = [sum(holder.widths[:i]) for i in range(len(holder.widths))]
    # marked slices: FP8 attention's torch.cond takes q's and k's parent once (cond_operands.py)
    return x._replace(outputs={layer: column_slice(joined, starts[position], holder.widths[position])
                               for layer, (_, position) in zip(readers, members)})


def member_weight_names(region: nn.Module, state_names) -> set[str]:
    """Those of `state_names` (`region`'s state-dict names, plain or flattened as `region_constants` flattens them)
    that name member weights: the programs read their joined holder instead, so they are no program's constants."""
    names = set()
    for name, module in region.named_modules():
        if getattr(module, _MEMBER, None) is not None:
            base = f"{name}.base." if isinstance(module, BiasAfterLinear) else f"{name}."
            names |= {key for key in state_names
                      if key == base + "weight" or key.startswith(base + "parametrizations.weight.")}
    return names
