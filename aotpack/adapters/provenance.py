"""Which keys of a raw LoRA file reach diffusers' converted state dict.

diffusers' converters drop some keys silently (T5 LoRA parts, position embeddings, text
projections, DoRA scales, zero or non-zero `diff_b`, unknown prefixes, ...). Rather than
re-implementing their rules to predict that, the conversion runs once under a torch function mode
that tags every tensor an operation produces with the raw keys it was computed from. A raw key
whose tensor tags nothing in the output was dropped. Scalars read with `.item()` (kohya alphas)
lose their tag, so an `.alpha` counts as used when its module's factors are used.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

_TAG = "_aotpack_sources"


def _tags(tensor) -> frozenset:
    return getattr(tensor, _TAG, frozenset())


class _SourceTracking(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        sources = frozenset().union(*(_tags(leaf) for leaf in pytree.tree_leaves((args, kwargs))
                                      if isinstance(leaf, torch.Tensor)))
        if sources:
            for leaf in pytree.tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    setattr(leaf, _TAG, _tags(leaf) | sources)
        return out


def tracked(state_dict: dict) -> dict:
    """A copy of `state_dict` whose tensors (aliases, same storage) carry their own key as a tag."""
    copy = {}
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            value = value.detach()  # a new Python object: the caller's tensors are never tagged
            setattr(value, _TAG, frozenset([key]))
        copy[key] = value
    return copy


def run_tracked(function, *args, **kwargs):
    with _SourceTracking():
        return function(*args, **kwargs)


def used_keys(raw_keys, *outputs: dict) -> set[str]:
    """Raw keys whose tensors contributed to any value of `outputs` (alphas of used modules included)."""
    used = set()
    for output in outputs:
        for value in (output or {}).values():
            if isinstance(value, torch.Tensor):
                used |= _tags(value)
    used_prefixes = {key[: i + 1] for key in used for i, char in enumerate(key) if char == "."}
    return used | {key for key in raw_keys if key.endswith(".alpha") and key[: -len("alpha")] in used_prefixes}
