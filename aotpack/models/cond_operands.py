"""Operands for `torch.cond`, which refuses operands that alias each other.

A joined q/k/v GEMM (recipe lever `joined_qkv`) hands q and k over as column slices of one output; FP8 attention's
token-count branch (`fp8_attention.by_token_count`) takes both as operands, and export then stopped with "Higher
Order Operators do not support aliasing" (H100 build, 2026-12-06). Each slice made by `column_slice` remembers its
parent: `unaliased` passes the parent once instead, and its `rebuild` slices it again inside the branch (static
column offsets, so no symbolic size is closed over, which cond's tracing refuses too).
"""

from __future__ import annotations

import torch

_PARENT = "_column_slice_of"  # plain attribute on a slice: (parent tensor, first column)


def column_slice(parent: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """`parent[..., start:start + width]`, marked so that `unaliased` can pass `parent` in its place."""
    part = parent.narrow(-1, start, width)
    setattr(part, _PARENT, (parent, start))
    return part


def unaliased(operands: tuple):
    """`(flat, rebuild)`: `operands` with every `column_slice` replaced by its parent (once per parent), and
    `rebuild(*flat)` giving the operands back (inside a cond branch, from the branch's own inputs)."""
    flat, layout, parents = [], [], {}
    for operand in operands:
        marked = getattr(operand, _PARENT, None) if isinstance(operand, torch.Tensor) else None
        if marked is None:
            layout.append((len(flat), None, None))
            flat.append(operand)
            continue
        parent, start = marked
        if id(parent) not in parents:
            parents[id(parent)] = len(flat)
            flat.append(parent)
        layout.append((parents[id(parent)], start, operand.shape[-1]))

    def rebuild(*inputs) -> tuple:
        return tuple(inputs[i] if start is None else inputs[i].narrow(-1, start, width) for i, start, width in layout)

    return tuple(flat), rebuild
