"""A partial merge: only some blocks' LoRA layers are folded into the weights; the rest of the set stays in slots.

Why: a merge rounds every touched weight onto its FP8 grid again, a noise the slots never add (docs/merging.md: at
1024² a strong r64 set had a fidelity error of 0.094 in slots, 0.110 merged), while the slots cost time on every
step (1024²: 95.99 ms a step in slots from CUDA graphs, 82.66 merged; H200, random weights, 2026-12-05,
`bench_speed.sh`, benchmarks/results/2026-12-05c-h200-weightless-build/). Folding a share of the
blocks runs their no-slot programs and leaves the others slotted, which trades between the two. The share counts
the touched block weights (their elements), since the re-rounding noise grows with them.
"""

from __future__ import annotations

import math

from ..errors import UnsupportedCallError


def check_share(share) -> float:
    """`share` as a float in (0, 1], or a typed error that names it."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not math.isfinite(share) \
            or not 0 < share <= 1:
        raise UnsupportedCallError(
            f"merge share {share!r} is not a number in (0, 1]",
            "give merge_share=1 (--merge-share 1, the default) to fold whole sets, or a share such as 0.5 to fold "
            "that share of the blocks' LoRA weights and keep the rest in slots")
    return float(share)


def blocks_to_merge(blocks: list[tuple[object, set[str]]], touched: dict[str, int], share: float) -> set:
    """The keys of the blocks to fold: blocks are `(key, layer names)` in chain order, `touched` the set's layers
    with their weight sizes. The chosen blocks hold about `share` of the touched block weights, spread evenly
    along the chain (error diffusion: a block is taken once the share owed to the blocks so far reaches half of
    its own size), so that no run of neighbouring blocks carries all the re-rounding."""
    chosen, owed = set(), 0.0
    for key, layers in blocks:
        size = sum(touched.get(name, 0) for name in layers)
        if not size:
            continue
        owed += share * size
        if owed >= size / 2:
            chosen.add(key)
            owed -= size
    return chosen
