"""Recipe levers `lora_tails` and `lora_tails_mlp_in`: a block's input linears' LoRA in their FP8 GEMM's K, as a third
program set.

In slots each of a single block's four input linears (to_q, to_k, to_v, proj_mlp: one quantized input) runs its FP8
GEMM, a bf16 up GEMM writes `u B^T` as wide as its output, and the next kernel reads both. With tails
(`lora_tails.py`) the FP8 GEMM computes `x W^T + u B^T` in one accumulator over rows `[q / H | u_hi | u_lo | u_hi]`
against the weight `[W | B_hi | B_hi | B_lo]`. This module puts that into programs:

- `install_lora_tails` gives each single block a `TailGroup` (`block.lora_tails`) and, with `mlp_in`, each double
  block two, one a stream (`block.lora_tails` over `ff.net.0.proj`, `block.lora_tails_context` over
  `ff_context.net.0.proj`), each holding one `[out, in + 256]` FP8 weight per reader: its base rows in the first `in`
  columns, the tails after them (written by the runtime's `runtime/tail_bank.py` at each switch). The reader's base
  weight becomes a view of those first columns (row stride `in + 256`), so the slotted and no-slot programs, the
  tailed ones and merges all read or write one storage: the lever adds only the tails (~0.2 GB for FLUX.1-dev; its
  first form copied the readers' weights, ~2.7 GB). The view costs the GEMMs that read it nothing at `in + 256` (the
  2026-12-07d probe; at `in + 192` it cost 1.0-1.6 ms a 1024² step); the merge by address takes contiguous weights
  only, so these readers merge through `merge_layers`;
- `with_tails(region)` is a block region whose readers take one LoRA input a group, `<holder>.lora_A` `[readers x
  64, in]` (each row of a reader's A divided by its power-of-two factor, so the program needs no factor), and whose
  other slots (proj_out; a double block's q/k/v, out and MLP-out) stay slots;
- in such a program `with_tailed_outputs` runs the group's down-projection (one GEMM), `aotpack::tailed_rows` (one
  launch) and each reader's tailed GEMM, and hands the outputs (LoRA included) to the readers as joined_qkv hands its
  column slices.

The single blocks' group is where the probe measured most of the tails' gain (0.8-1.3 ms of a 512² step on an H100,
`benchmarks/results/2026-12-07d-h100-tails-block/`), the double blocks' MLP-in next by the probe (0.40 / 0.71 ms at
512² / 1024²); as a package (`lora_tails_mlp_in`, off) it stepped 0.26 / 0.52 ms slower (H100, 2026-12-07i), but that
build's tailed double program ran its q/k/v down-projections ungrouped, fixed since and not measured again. The
double blocks' other linears gained nothing in the probe and stay in slots.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RecipeError
from .fp8_attention import FP8
from .fused_quant import QuantizedActivation, float8_over, is_fp8_linear
from .lora_tails import MIN_HEADROOM, TAIL_COLUMNS, TAIL_RANK, base_columns, reader_rows, tailed_linear
from .slots import LoRASlotLinear, bind_slot, slot_input_names, slot_modules

READERS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")  # a single block's linears of one quantized input
HOLDER = "lora_tails"  # a TailGroup's attribute on the block (a double block's image stream too)
# each block kind's groups: (the TailGroup's attribute on the block, its readers, linears of one quantized input)
SINGLE_GROUPS = ((HOLDER, READERS),)
DOUBLE_GROUPS = ((HOLDER, ("ff.net.0.proj",)), (f"{HOLDER}_context", ("ff_context.net.0.proj",)))
HOLDERS = tuple(dict.fromkeys(holder for holder, _ in SINGLE_GROUPS + DOUBLE_GROUPS))
TAILS_SUFFIX = ".tails"  # the tailed programs' names: `single_block.tails`
_MEMBER = "_tail_member"  # plain attribute on a reader: (its TailGroup, its position)


class TailGroup(nn.Module):
    """The tailed FP8 weights of one block's readers (`weights[i]` [out_i, in + TAIL_COLUMNS]; `readers` their names
    in the block) and, while a tailed program is traced, the group's LoRA input `lora_A` (not a module state: a
    program input)."""

    def __init__(self, weights, readers: tuple[str, ...], paired: bool = False):
        super().__init__()
        self.weights = nn.ParameterList([nn.Parameter(w, requires_grad=False) for w in weights])
        self.readers = readers
        # recipe lever lora_tails_paired: readers 2p and 2p + 1 read one buffer `[tail | q / H | tail]`, so the first's
        # weight is `[tail | W]` (`lora_tails.tail_first`)
        self.paired = paired
        self.lora_A: torch.Tensor | None = None


def block_tail_groups(transformer, mlp_in: bool = False):
    """(block list name, index, block, holder attribute, reader names) of every tail group `lora_tails` gives
    `transformer` (with `mlp_in`, `lora_tails_mlp_in`'s double-block groups too), single blocks first."""
    kinds = [("single_transformer_blocks", SINGLE_GROUPS)]
    kinds += [("transformer_blocks", DOUBLE_GROUPS)] if mlp_in else []
    return [(blocks, index, block, holder, readers) for blocks, groups in kinds
            for index, block in enumerate(getattr(transformer, blocks)) for holder, readers in groups]


def install_lora_tails(transformer, mlp_in: bool = False, paired: bool = False) -> int:
    """Give every single block a `TailGroup` over its readers' FP8 weights (after quantization and slotting), with
    `mlp_in` every double block one a stream over its MLP-in, in place; returns how many groups. With `paired`
    (recipe lever `lora_tails_paired`) the groups of an even number of readers (the single blocks') lay out each
    pair's weights `[tail | W]`, `[W | tail]` for rows that hold `q / H` once a pair. Refuses a transformer whose
    readers are not FP8 LoRA slots; a second call changes nothing."""
    groups = []
    for blocks, index, block, holder, readers in block_tail_groups(transformer, mlp_in):
        if hasattr(block, holder):
            continue
        layers = [block.get_submodule(name) for name in readers]
        if not all(isinstance(layer, LoRASlotLinear) and is_fp8_linear(layer.base) for layer in layers):
            lever = "lora_tails_mlp_in" if blocks == "transformer_blocks" else "lora_tails"
            raise RecipeError(f"{lever} needs {blocks}.{index}'s {', '.join(readers)} to be FP8 row-wise LoRA slots",
                              f"set {lever} = false, or slot and quantize those linears")
        groups.append((block, holder, readers, layers))
    for block, name, readers, layers in groups:
        weights = []
        pairs = paired and len(readers) % 2 == 0
        for position, layer in enumerate(layers):
            weight = layer.base.weight
            rows, columns = weight.qdata.shape
            tailed = torch.zeros(rows, columns + TAIL_COLUMNS, dtype=FP8, device=weight.qdata.device)
            base = base_columns(tailed, position, pairs)
            base.copy_(weight.qdata)
            # one storage: the base weight becomes a view of the tailed weight's base columns, so the slotted and
            # no-slot programs (and merges) read and write the very bytes the tailed programs read
            layer.base.weight = nn.Parameter(float8_over(base, weight.scale, weight), requires_grad=False)
            weights.append(tailed)
        holder = TailGroup(weights, readers, pairs)
        for position, layer in enumerate(layers):
            object.__setattr__(layer, _MEMBER, (holder, position))  # not a submodule: names stay the model's
        setattr(block, name, holder)
    return len(groups)


def bound_tails(layer: nn.Module) -> bool:
    """Whether `layer` is a reader whose group's LoRA input is bound (a tailed program is being traced)."""
    member = getattr(layer, _MEMBER, None)
    return member is not None and member[0].lora_A is not None


def with_tailed_outputs(x: QuantizedActivation, readers) -> QuantizedActivation:
    """`x` carrying `readers`' outputs, LoRA included, where they are one bound tail group: the group's
    down-projection, `aotpack::tailed_rows` and one tailed GEMM per reader. `x` as it is otherwise."""
    members = [getattr(layer, _MEMBER, None) for layer in readers]
    if not isinstance(x, QuantizedActivation) or not members or any(m is None for m in members):
        return x
    holder = members[0][0]
    if holder.lora_A is None or any(m[0] is not holder for m in members) or len(members) != len(holder.weights):
        return x
    lead, width = x.q.shape[:-1], x.q.shape[-1]
    u = F.linear(x.hidden.to(holder.lora_A.dtype), holder.lora_A)  # [..., n * TAIL_RANK]
    # the factors are folded into lora_A: none given, so no fill kernel a call (`lora_tails.reader_factors`)
    all_ones = torch.empty(0, dtype=torch.float32, device=x.q.device)
    rows, row_scale = torch.ops.aotpack.tailed_rows(x.q.reshape(-1, width), x.scale.reshape(-1, 1),
                                                    u.reshape(-1, u.shape[-1]), all_ones, MIN_HEADROOM, holder.paired)
    outputs = {}
    for layer, (_, position) in zip(readers, members):
        weight = layer.base.weight
        fast = bool(getattr(weight.mm_config, "use_fast_accum", False))
        y = tailed_linear(reader_rows(rows, position, holder.paired), row_scale, holder.weights[position],
                          weight.scale, x.dtype, fast)
        outputs[layer] = y.reshape(*lead, y.shape[-1])
    # the readers' own slots are unbound in a tailed program (`with_tails`), so `unsummed_linear` adds no delta to these
    return x._replace(outputs=outputs)


def tail_groups(body: nn.Module) -> dict[str, TailGroup]:
    """The tail groups inside `body`, by name relative to it."""
    return {name: m for name, m in body.named_modules() if isinstance(m, TailGroup)}


def with_tails(region):
    """`region` (a block's) traced as the tailed program: each tail group takes one input (`<holder>.lora_A`), its
    readers no slot inputs; other slots as before. Same weights, same names."""
    groups = tail_groups(region.body)
    members = {name for name, slot in slot_modules(region.body).items() if getattr(slot, _MEMBER, None)}
    tailed = copy.copy(region)

    def lora_names():
        names = [n for name, slot in region.slots().items() if name not in members
                 for n in slot_input_names(name, slot)]
        return names + [f"{name}.lora_A" for name in groups]

    def bind_lora(lora):
        for name, slot in slot_modules(region.body).items():
            bind_slot(slot, name, None if name in members else lora)
        for name, group in groups.items():
            group.lora_A = None if lora is None else lora[f"{name}.lora_A"]

    tailed.lora_names = lora_names
    tailed.bind_lora = bind_lora
    return tailed


def example_tail_inputs(region, lora_dtype, device, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random group inputs for tracing `with_tails(region)`: each group's `[n * TAIL_RANK, in]`."""
    inputs = {}
    for name, group in tail_groups(region.body).items():
        rows, in_features = len(group.weights) * TAIL_RANK, group.weights[0].shape[1] - TAIL_COLUMNS
        a = torch.randn(rows, in_features, generator=generator) * in_features ** -0.5
        inputs[f"{name}.lora_A"] = a.to(device=device, dtype=lora_dtype)
    return inputs


def is_tail_weight(constant_name: str) -> bool:
    """Whether a program constant is a tailed weight (read by the tailed programs only)."""
    return any(f"{holder}.weights." in constant_name for holder in HOLDERS)
