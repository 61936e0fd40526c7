"""Programs saved for a compile worker without their weights' bytes.

AOTInductor never reads a weight's values into a package whose weights are bound at load
(`aot_inductor.package_constants_in_so = False`): it needs each weight's shape, strides, dtype and device.
So a program travels to its worker with every large weight as a meta tensor (no bytes written or read), and
the worker gives each one uninitialized memory of the same layout before it compiles. torchao's FP8 weights
are tensor subclasses: their inner tensors (FP8 data, row scales) are swapped the same way, the subclass kept.

Small tensors keep their values: Inductor may read a one-element constant (it folds uniform values) or inline
a tiny one into the code. The build's validation runs every compiled program on the real weights, which
would catch a program that had baked in a stand-in's value.

What it saves: writing a program's weights took 3.5-5.4 s a GB on the 2-core CPU machine (1 and 3 GB,
`scripts/probe_weightless_save.py`, 2026-12-05; 8.6 s a GB in an earlier measurement), the weightless save 0.00 s,
and the H200 build's modulation program carries 6.45 GB (~40 s outside every timed stage of its 2026-12-05a build).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

# Tensors below this many bytes travel with their values (see the module docstring); weights are far larger.
MIN_WEIGHTLESS_BYTES = 64 * 1024
# Inductor settings under which a compile reads weight values (it folds weights into new constants): a recipe
# that sets one saves its programs whole.
READS_WEIGHT_VALUES = ("freezing", "aot_inductor.use_runtime_constant_folding")


def compile_reads_weights(inductor_configs: dict) -> bool:
    """Whether a compile under `inductor_configs` reads weight values, so the weights must travel."""
    return any(inductor_configs.get(name) for name in READS_WEIGHT_VALUES)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of `tensor`'s data, a subclass's inner tensors summed."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def _rebuilt(tensor: torch.Tensor, device) -> torch.Tensor:
    """`tensor`'s layout (subclass, shape, strides, dtype) on `device`, with uninitialized data ("meta": none)."""
    if is_traceable_wrapper_subclass(tensor):
        names, context = tensor.__tensor_flatten__()
        inner = {name: _rebuilt(getattr(tensor, name), device) for name in names}
        rebuilt = type(tensor).__tensor_unflatten__(inner, context, tensor.size(), tensor.stride())
    else:
        rebuilt = torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, device=device)
    return nn.Parameter(rebuilt, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else rebuilt


def _tables(exported) -> tuple[dict, dict]:
    return exported.state_dict, exported.constants


@contextlib.contextmanager
def weights_left_out(exported, min_bytes: float = MIN_WEIGHTLESS_BYTES):
    """Within the block, every tensor of `exported` of at least `min_bytes` is a meta stand-in; yields
    {name: device} of those (what `give_empty_weights` needs). The program is restored on the way out."""
    swapped = {}
    try:
        for table in _tables(exported):
            for name, tensor in list(table.items()):
                if isinstance(tensor, torch.Tensor) and tensor_bytes(tensor) >= min_bytes:
                    swapped[name] = (table, tensor)
                    table[name] = _rebuilt(tensor, "meta")
        yield {name: str(tensor.device) for name, (_, tensor) in swapped.items()}
    finally:
        for name, (table, tensor) in swapped.items():
            table[name] = tensor


def save_without_weights(exported, path: str, min_bytes: float = MIN_WEIGHTLESS_BYTES) -> dict[str, str]:
    """`torch.export.save` of `exported` with its large tensors left out; returns {name: device} of those."""
    with weights_left_out(exported, min_bytes) as left_out:
        torch.export.save(exported, path)
    return left_out


def save_for_compile(exported, path: str, inductor_configs: dict) -> dict[str, str]:
    """`save_without_weights`, unless a compile under `inductor_configs` reads weight values: then whole (nothing
    left out)."""
    return save_without_weights(exported, path, min_bytes=float("inf") if compile_reads_weights(inductor_configs)
                                else MIN_WEIGHTLESS_BYTES)


def give_empty_weights(exported, left_out: dict[str, str]) -> None:
    """Give each tensor `save_without_weights` left out uninitialized memory on its device, in place."""
    for table in _tables(exported):
        for name in left_out.keys() & table.keys():
            table[name] = _rebuilt(table[name], torch.device(left_out[name]))
