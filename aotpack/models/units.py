"""Program units of any layout: the region wrapper for a program kind, split for context parallelism or not.

Build and runtime ask here, so neither needs to know which module defines which kind (regions.py: the
prologue, blocks, epilogue and whole; split_regions.py: blocks cut around attention; modulation.py: the
modulation program, and blocks that take its rows).
"""

from __future__ import annotations

from .modulation import MODULATION, ModulationRegion, inner_dim, take_modulation_rows, uses_batched_modulation
from .regions import BLOCK_KINDS, Region
from .regions import make_region as make_unsplit_region
from .split_regions import SPLIT_KINDS, make_split_region


def make_region(transformer, kind: str, instance: str | None = None) -> Region:
    """The region wrapper for `kind`; `instance` is the block's module path for block kinds."""
    if kind in SPLIT_KINDS:
        return make_split_region(transformer, kind, instance)
    if kind == MODULATION:
        return ModulationRegion(transformer)
    region = make_unsplit_region(transformer, kind, instance)
    if kind in BLOCK_KINDS and uses_batched_modulation(transformer):  # recipe lever batched_modulation
        return take_modulation_rows(region, kind, inner_dim(transformer.config))
    return region
