"""Program units of any layout: the region wrapper for a program kind, split for context parallelism or not.

Build and runtime ask here, so neither needs to know which module defines which kind (regions.py: the
prologue, blocks, epilogue and whole; split_regions.py: blocks cut around attention).
"""

from __future__ import annotations

from .regions import Region
from .regions import make_region as make_unsplit_region
from .split_regions import SPLIT_KINDS, make_split_region


def make_region(transformer, kind: str, instance: str | None = None) -> Region:
    """The region wrapper for `kind`; `instance` is the block's module path for block kinds."""
    if kind in SPLIT_KINDS:
        return make_split_region(transformer, kind, instance)
    return make_unsplit_region(transformer, kind, instance)
