"""Recipe lever `batched_modulation`: the blocks' AdaLN modulation linears as one program, run once an image.

Each Flux block turns `temb` into its shift/scale/gate rows with a linear (`norm1.linear` and
`norm1_context.linear` in a double block, `norm.linear` in a single one). Those rows depend on the timestep,
guidance and pooled text only, not on the tokens, yet inside the block programs they cost a GEMV over 6.45 GB
of bf16 weights every step (FLUX.1-dev, ~2.2 ms of a step on the H200, the same at any image size). With the
lever the `modulation` program computes them for many steps at once (one row per step and image), and the block
programs take their rows as an input where they took `temb`. The runtime feeds it the scheduler's timesteps
(runtime/modulation_rows.py).

Output layout, `[steps, batch * W]`: per step, block after block in execution order, each block's `[batch,
width]` rows contiguous (a double block's `norm1` then `norm1_context` rows, 12 * inner; a single block's 3 *
inner), so a block's input is a view of one step's row, and one copy fills a CUDA graph's buffer.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .regions import DOUBLE_BLOCK, SINGLE_BLOCK, Region, _time_text_embed, block_prefixes

MODULATION = "modulation"
MODULATION_INPUT = "modulation"  # what block programs take in place of `temb`
# the norms whose linear a block program no longer runs, with their share of the block's rows (in inner widths)
_NORMS = {DOUBLE_BLOCK: (("norm1", 6), ("norm1_context", 6)), SINGLE_BLOCK: (("norm", 3),)}
MAX_STEPS = 256  # rows one call computes (the program's `steps` axis); a longer schedule is computed in windows


def mark_batched_modulation(transformer: nn.Module) -> None:
    """Say that `transformer`'s regions take the modulation program's rows (build and load both call this)."""
    transformer.batched_modulation = True


def uses_batched_modulation(transformer: nn.Module) -> bool:
    return getattr(transformer, "batched_modulation", False)


def inner_dim(config) -> int:
    return int(config.num_attention_heads) * int(config.attention_head_dim)


def block_widths(transformer) -> list[int]:
    """Each block's modulation width, in execution order (double blocks, then single ones)."""
    inner = inner_dim(transformer.config)
    return [sum(share for _, share in _NORMS[kind]) * inner
            for kind, instances in block_prefixes(transformer).items() for _ in instances]


def block_index(transformer, instance: str) -> int:
    """Where block `instance` (its module path) runs among all blocks: its place in a step's row."""
    return [i for instances in block_prefixes(transformer).values() for i in instances].index(instance)


def split_step_rows(rows: torch.Tensor, widths: list[int], batch: int) -> list[torch.Tensor]:
    """One step's `[batch * W]` row as each block's `[batch, width]` input (views, no copy)."""
    views, offset = [], 0
    for width in widths:
        views.append(rows[offset:offset + batch * width].view(batch, width))
        offset += batch * width
    return views


class _Columns(nn.Module):
    """Stands in for a norm's linear: its rows are columns `start:stop` of the block's modulation input."""

    def __init__(self, start: int, stop: int):
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return rows[:, self.start:self.stop]


def _shallow(module: nn.Module) -> nn.Module:
    """A copy sharing parameters and submodules, whose submodule table can be changed alone."""
    twin = copy.copy(module)
    twin._modules = dict(module._modules)
    return twin


def block_taking_rows(block: nn.Module, kind: str, inner: int) -> nn.Module:
    """`block` as a block program under the lever runs it: each AdaLN norm reads its columns of the rows passed
    as `temb` (silu and linear become a column slice). Weights, slots and markers of the rest are shared."""
    twin, start = _shallow(block), 0
    for name, share in _NORMS[kind]:
        norm = _shallow(block._modules[name])
        norm._modules["silu"] = nn.Identity()
        norm._modules["linear"] = _Columns(start * inner, (start + share) * inner)
        twin._modules[name] = norm
        start += share
    return twin


def take_modulation_rows(region: Region, kind: str, inner: int) -> Region:
    """A block region (regions.py) made to take its modulation rows where it took `temb`."""
    region.body = block_taking_rows(region.body, kind, inner)
    region.activation_names = tuple(MODULATION_INPUT if n == "temb" else n for n in region.activation_names)
    return region


class _Norms(nn.Module):
    """One block's AdaLN norms, under their names in the block (so constant and slot names stay the model's)."""

    def __init__(self, block: nn.Module, names):
        super().__init__()
        for name in names:
            setattr(self, name, getattr(block, name))


class _ModulationBody(nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.time_text_embed = transformer.time_text_embed
        self.transformer_blocks = nn.ModuleList(
            _Norms(b, [n for n, _ in _NORMS[DOUBLE_BLOCK]]) for b in transformer.transformer_blocks)
        self.single_transformer_blocks = nn.ModuleList(
            _Norms(b, [n for n, _ in _NORMS[SINGLE_BLOCK]]) for b in transformer.single_transformer_blocks)


class ModulationRegion(Region):
    """`(pooled [S, B, P], timestep [S, B], guidance [S, B] or None) -> [S, B * W]`: every block's modulation rows
    for S steps of B images. Slot names are the layers' full names (`transformer_blocks.0.norm1.linear`)."""

    kind = MODULATION
    activation_names = ("pooled_projections", "timestep", "guidance")

    def __init__(self, transformer):
        super().__init__()
        self.body = _ModulationBody(transformer)

    def forward(self, pooled_projections, timestep, guidance, lora):
        self.bind_lora(lora)
        steps, batch = timestep.shape
        temb = _time_text_embed(self.body, pooled_projections, timestep.reshape(-1),
                                None if guidance is None else guidance.reshape(-1),
                                pooled_projections.reshape(steps * batch, -1))
        blocks = []
        for kind, holders in ((DOUBLE_BLOCK, self.body.transformer_blocks),
                              (SINGLE_BLOCK, self.body.single_transformer_blocks)):
            for holder in holders:
                norms = [getattr(holder, name) for name, _ in _NORMS[kind]]
                rows = torch.cat([norm.linear(norm.silu(temb)) for norm in norms], dim=1)
                blocks.append(rows.reshape(steps, -1))  # [S, B * width]: each image's row, then the next
        return torch.cat(blocks, dim=1)


def modulation_example(inputs: dict, steps: int = 3) -> tuple:
    """The modulation program's example inputs from a transformer call's (`steps` > 1: export must not
    specialise the axis)."""
    pooled, timestep, guidance = inputs["pooled_projections"], inputs["timestep"], inputs.get("guidance")
    ramp = torch.linspace(1.0, 0.5, steps, device=timestep.device, dtype=timestep.dtype)[:, None]
    return (pooled.unsqueeze(0).expand(steps, *pooled.shape).contiguous(), (ramp * timestep).contiguous(),
            None if guidance is None else guidance.unsqueeze(0).expand(steps, -1).contiguous())
