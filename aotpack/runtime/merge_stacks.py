"""The touched layers as the merge programs take them: grouped by shape and rank, their factors stacked."""

from __future__ import annotations

import torch


def shape_groups(layers: list[tuple]) -> list[list[tuple]]:
    """`(weight, parts)` pairs (FP8 weights) grouped by weight shape, dtype and device and by the ranks of their
    parts, in the order the layers came: what one merge-program call can take together."""
    groups: dict[tuple, list[tuple]] = {}
    for weight, parts in layers:
        key = (tuple(weight.qdata.shape), weight.qdata.dtype, weight.qdata.device, tuple(a.shape[0] for a, *_ in parts))
        groups.setdefault(key, []).append((weight, parts))
    return list(groups.values())


def stacked_factors(layers: list[tuple], device, dtype: torch.dtype,
                    rank_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The `(weight, parts)` layers' A `[L, R, K]` and scaled B `[L, N, R]` in `dtype`: each part stacked over the
    layers, the parts side by side along the rank (B @ A is then the sum of the parts' scaled products), zeros
    appended up to a multiple of `rank_multiple` (exact: they add nothing). Each B is scaled in its own dtype as
    `torch.mul(b, scale)` would (fp32 math, one rounding)."""
    a_parts, b_parts = [], []
    for index in range(len(layers[0][1])):
        parts = [parts[index] for _, parts in layers]
        a_parts.append(torch.stack([a.to(device=device, dtype=dtype) for a, *_ in parts]))
        bs = [b.to(device=device, dtype=dtype) for _, b, *_ in parts]
        scales = [float(scale[0]) if scale else 1.0 for _, _, *scale in parts]
        if any(s != 1.0 for s in scales):
            bs = torch._foreach_mul(bs, scales)
        b_parts.append(torch.stack(bs))
    pad = -sum(a.shape[1] for a in a_parts) % rank_multiple
    if pad:
        layer_count, rows, cols = len(layers), b_parts[0].shape[1], a_parts[0].shape[2]
        a_parts.append(torch.zeros(layer_count, pad, cols, dtype=dtype, device=device))
        b_parts.append(torch.zeros(layer_count, rows, pad, dtype=dtype, device=device))
    if len(a_parts) == 1:
        return a_parts[0], b_parts[0]
    return torch.cat(a_parts, dim=1), torch.cat(b_parts, dim=2)
