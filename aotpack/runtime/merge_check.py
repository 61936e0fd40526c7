"""How much of a LoRA set a merge into FP8 weights would keep, measured on sampled rows before merging.

A merge rounds W_fp8 + BA onto a per-row FP8 grid again (models/merge_rows.py). FP8 e4m3 keeps 3 mantissa bits,
so the grid's step around a weight is 6-12% of its value, and when BA is small the fresh row scale barely moves
the grid W_fp8 already sits on: a change well below half a step rounds back to the weight it came from. A weak
enough LoRA, merged, is a weaker LoRA (the complaint FP8 services answer with scale x1.5). The slots keep BA in
bf16 beside the unchanged base instead, and hold the LoRA's full strength at every strength measured (against
eager upcast to float32: 0.998-1.010 for LoRAs moving the output by 0.27-27%;
benchmarks/results/2026-12-04c-h200-precise-reference/).

`estimate_merge` runs the merge's own math (`merged_rows`) on evenly spaced rows of evenly spaced touched FP8
layers and compares the rows' change with BA itself:

    strength = <merged - base, BA> / <BA, BA>    (1: the whole change kept; 0.3: most of it rounded away)
    error    = ||merged - base - BA|| / ||BA||   (bias and rounding noise together)

Measured on the H200 (2026-12-04, random FLUX.1-dev weights, r64 on all 494 block linears at growing factor std,
benchmarks/results/2026-12-04b-h200-merge-check/): at an estimated strength of 0.33 (std 0.005, a ~0.9% change of
the weights) the merged set's effect on the output was 0.67x the same set's in slots (effect strength against eager
bf16 + PEFT 0.103 vs 0.153); at estimated strengths 1.0-1.13 (std 0.01 and up) merged and slots matched within
0.04. The error does not separate the cases: merged, every strength carried 8-18% more fidelity error
than in slots (the re-rounding adds about half the base's own FP8 noise), at an estimated error of 0.05 as at 1.8.
Against eager upcast to float32 (2026-12-04c, the same LoRAs), which bf16's own noise does not dilute: merged 0.595
at std 0.005, 1.107 / 1.070 at std 0.01 / 0.02 (estimated 1.05 / 1.13), 0.992-0.999 from std 0.05 up; slots 1.00.
So the merge policy does not merge unasked a set whose estimated strength is below `MIN_MERGE_STRENGTH`; an asked
merge goes ahead with a warning that gives the numbers. On trained-like weights (Gaussian, 0.1% outliers; CPU
simulation of one 1024x3072 layer) the strength fell to 0.81 at a 3% change and 0.37 at 1%.
"""

from __future__ import annotations

import dataclasses

import torch

from ..models.merge_rows import merged_rows
from .merge_stacks import shape_groups, stacked_factors

ROWS_PER_LAYER = 64  # sampled rows per sampled layer
LAYERS = 48  # sampled layers at most: each costs ~10 small launches; all 494 at 16 rows took 33 ms on the H200
MIN_MERGE_STRENGTH = 0.8  # between the measured 0.33 (merged effect 0.67x the slots') and 1.0 (the same)


@dataclasses.dataclass(frozen=True)
class MergeEstimate:
    strength: float  # projection of the merged change on the LoRA's product (1: full strength)
    error: float  # relative L2 error of the merged change against the product
    rows: int  # sampled rows it was measured on

    @property
    def faithful(self) -> bool:
        return self.strength >= MIN_MERGE_STRENGTH

    def describe(self) -> str:
        return (f"re-rounded into the FP8 weights, the set's weight change would keep only {self.strength:.0%} of "
                f"itself (below {MIN_MERGE_STRENGTH:.0%}; error {self.error:.2f}; {self.rows} sampled rows): "
                "a weaker LoRA")


def _evenly_spaced(total: int, count: int) -> list[int]:
    """`count` indices spread over range(total) from first to last (all of them where total <= count); host
    arithmetic: no device sort or sync."""
    if total <= count:
        return list(range(total))
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


@torch.no_grad()
def estimate_merge(layers: list[tuple], dtype: torch.dtype = torch.bfloat16) -> MergeEstimate | None:
    """`(weight, parts)` pairs as the merge takes them; None where no FP8 weight is touched (a bf16 or fp32 merge
    adds the product at the weight's own precision). `dtype`: the factors' dtype in the merge program."""
    fp8 = [(weight, parts) for weight, parts in layers if hasattr(weight, "qdata") and parts]
    if not fp8:
        return None
    fp8 = [fp8[i] for i in _evenly_spaced(len(fp8), LAYERS)]
    device = fp8[0][0].qdata.device
    dot = torch.zeros((), dtype=torch.float64, device=device)
    product_sq, error_sq, rows_total = dot.clone(), dot.clone(), 0
    for group in shape_groups(fp8):
        rows = torch.tensor(_evenly_spaced(group[0][0].qdata.shape[0], ROWS_PER_LAYER), device=device)
        # FP8 rows picked through a byte view: index_select has no FP8 kernel on every device
        qdata = torch.stack([weight.qdata.view(torch.uint8)[rows] for weight, _ in group]).view(group[0][0].qdata.dtype)
        scale = torch.stack([weight.scale.view(-1, 1)[rows] for weight, _ in group])
        sampled = [(weight, [(a, b.to(device)[rows], *scale_) for a, b, *scale_ in parts]) for weight, parts in group]
        lora_a, lora_b = stacked_factors(sampled, device, dtype)
        new_qdata, new_scale = merged_rows(qdata, scale, lora_a, lora_b)
        change = new_qdata.to(torch.float32) * new_scale - qdata.to(torch.float32) * scale
        product = torch.matmul(lora_b.float(), lora_a.float())
        dot += (change * product).sum(dtype=torch.float64)
        product_sq += product.square().sum(dtype=torch.float64)
        error_sq += (change - product).square().sum(dtype=torch.float64)
        rows_total += len(group) * rows.numel()
    if float(product_sq) == 0.0:
        return MergeEstimate(strength=1.0, error=0.0, rows=rows_total)  # a zero product: nothing to lose
    return MergeEstimate(strength=float(dot / product_sq), error=float((error_sq / product_sq).sqrt()),
                         rows=rows_total)


def warm(device, dtype: torch.dtype, rank: int) -> None:
    """Estimates on scratch zeros at FLUX's widths, two layers a call as a merge's groups stack them. On the H200
    (2026-12-04) a process's first estimate took 245 ms unwarmed (the eager kernels' first launches), 84 ms after a
    warm on one small layer, 11-17 ms after this one; later ones ~5 ms."""
    import types

    for cols in (3072, 12288):
        scratch = [types.SimpleNamespace(qdata=torch.zeros(ROWS_PER_LAYER, cols, device=device).to(torch.float8_e4m3fn),
                                         scale=torch.ones(ROWS_PER_LAYER, 1, device=device)) for _ in range(2)]
        estimate_merge([(weight, [(torch.zeros(rank, cols, dtype=dtype, device=device),
                                   torch.zeros(ROWS_PER_LAYER, rank, dtype=dtype, device=device), 1.0)])
                        for weight in scratch], dtype)
