"""LoRA slots: linear layers whose low-rank update comes in as program inputs.

A slotted linear computes `y = W x (+ b) + B (A x)` with `A: [R, in]` and `B: [out, R]` passed to
the compiled program on every call. An adapter of rank r < R fills the first r rows of A and
columns of B; the rest stay zero. Several adapters stack along the rank axis.
"""

from __future__ import annotations

import dataclasses
import fnmatch

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AotpackError


@dataclasses.dataclass(frozen=True)
class SlotSpec:
    """One slotted layer of the transformer, named as in its state dict (`transformer_blocks.0.attn.to_q`)."""

    name: str
    in_features: int
    out_features: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def lora_input_names(slot_name: str) -> tuple[str, str]:
    """The names under which a slot's A and B matrices are passed to a program."""
    return f"{slot_name}.lora_A", f"{slot_name}.lora_B"


def a_halves_input_names(slot_name: str) -> tuple[str, str]:
    """The names of a slot's A as FP8 high and low rows and their row scales (recipe lever `lora_down_fp8_dots`,
    models/lora_down_fp8.py): written by the runtime from the slot's A after each switch."""
    return f"{slot_name}.lora_A_fp8", f"{slot_name}.lora_A_fp8_scale"


def reads_a_halves(slot: nn.Module) -> bool:
    """Whether `slot`'s LoRA down-projection reads A as FP8 halves (`lora_down_fp8.mark_reads_fp8_input`)."""
    return getattr(slot, "lora_down_fp8_dots", False)


def slot_input_names(slot_name: str, slot: nn.Module) -> tuple[str, ...]:
    """A slot's program inputs: A and B, and for a slot that reads A's FP8 halves those two as well. A stays an
    input there (unread where the halves are): paths that do not route the slot through the FP8 down-projection
    (a context-parallel split block, the whole layout) read it, and `bound_lora` asks it."""
    names = lora_input_names(slot_name)
    return names + a_halves_input_names(slot_name) if reads_a_halves(slot) else names


class BiasAfterLinear(nn.Module):
    """`base(x) + bias`, with the bias held outside the (quantized) base linear.

    Row-wise FP8 matmuls with a bias epilogue fail in cuBLASLt for small M with K >= 12288
    (measured on the H200 with torch 2.11, see docs/gpu.md), so no FP8 linear keeps its bias; the
    separate add fuses into the next elementwise op.
    """

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.bias = base.bias
        base.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y if self.bias is None else y + self.bias


def weight_holder(layer: nn.Module) -> nn.Module:
    """The module that holds `layer`'s weight: the wrapped linear of a `BiasAfterLinear` (or slot), else itself."""
    return layer.base if isinstance(layer, BiasAfterLinear) else layer


class LoRASlotLinear(BiasAfterLinear):
    """`base(x) + bias + B (A x)`, where A and B are bound per call by the region that owns the slot.

    The slot owns the bias (see `BiasAfterLinear`): it fuses with the LoRA add.
    """

    def __init__(self, base: nn.Linear):
        super().__init__(base)
        self.lora_A: torch.Tensor | None = None
        self.lora_B: torch.Tensor | None = None
        # A as FP8 high and low rows [2R, in] and their scales [1, 2R], where bound (`a_halves_input_names`)
        self.lora_A_fp8: torch.Tensor | None = None
        self.lora_A_fp8_scale: torch.Tensor | None = None

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """`B (A x)` in the LoRA dtype (the slot must be bound)."""
        return F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.lora_A is None:
            return y
        return y + self.lora_delta(x).to(y.dtype)


def linear_layer_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def select_slot_names(model: nn.Module, patterns: tuple[str, ...] | list[str]) -> list[str]:
    """Every `nn.Linear` whose name matches one of the fnmatch patterns (`*` selects all)."""
    names = linear_layer_names(model)
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise AotpackError(
            f"the slot patterns {list(patterns)} match no nn.Linear of the transformer",
            "pass --slots with patterns such as '*' or 'transformer_blocks.*.attn.*'",
        )
    return chosen


def _resolve_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child_name = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child_name


def detach_biases(model: nn.Module, names) -> None:
    """Wrap each named `nn.Linear` that has a bias in a `BiasAfterLinear`, in place."""
    for name in names:
        parent, child_name = _resolve_parent(model, name)
        linear = getattr(parent, child_name)
        if isinstance(linear, nn.Linear) and linear.bias is not None:
            setattr(parent, child_name, BiasAfterLinear(linear))


def install_slots(model: nn.Module, names: list[str]) -> list[SlotSpec]:
    """Replace each named `nn.Linear` by a `LoRASlotLinear` wrapping it, in place."""
    specs = []
    for name in names:
        parent, child_name = _resolve_parent(model, name)
        linear = getattr(parent, child_name)
        if isinstance(linear, LoRASlotLinear):
            linear = linear.base
        if not isinstance(linear, nn.Linear):
            raise AotpackError(
                f"slot layer {name!r} is a {type(linear).__name__}, not an nn.Linear",
                "choose slot patterns that select linear layers only",
            )
        setattr(parent, child_name, LoRASlotLinear(linear))
        specs.append(SlotSpec(name, linear.in_features, linear.out_features))
    return specs


def slot_modules(module: nn.Module) -> dict[str, LoRASlotLinear]:
    """The slotted linears inside `module`, by name relative to it."""
    return {name: m for name, m in module.named_modules() if isinstance(m, LoRASlotLinear)}


def bind_slot_tensors(model: nn.Module, tensors: dict[str, torch.Tensor] | None) -> None:
    """Point every slot of an eager model at `tensors` (full layer names), or detach them (None)."""
    for name, slot in slot_modules(model).items():
        bind_slot(slot, name, tensors)


def bind_slot(slot: "LoRASlotLinear", name: str, tensors: dict[str, torch.Tensor] | None) -> None:
    """Point one slot (`name`: its key in `tensors`) at its A and B in `tensors`, and at A's FP8 halves where
    `tensors` holds them (a program's inputs; eager runs split A themselves); detach it for None."""
    if tensors is None:
        slot.lora_A = slot.lora_B = slot.lora_A_fp8 = slot.lora_A_fp8_scale = None
        return
    slot.lora_A, slot.lora_B = (tensors[n] for n in lora_input_names(name))
    slot.lora_A_fp8, slot.lora_A_fp8_scale = (tensors.get(n) for n in a_halves_input_names(name))


def zero_slot_tensors(specs, max_rank: int, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Zero A/B inputs for every slot: the program's input when no adapter is active."""
    tensors = {}
    for spec in specs:
        a_name, b_name = lora_input_names(spec.name)
        tensors[a_name] = torch.zeros(max_rank, spec.in_features, dtype=dtype, device=device)
        tensors[b_name] = torch.zeros(spec.out_features, max_rank, dtype=dtype, device=device)
    return tensors


def random_slot_tensors(specs, max_rank: int, dtype, device, generator: torch.Generator, std=0.05):
    """Random A/B inputs (used to validate that the slots are wired into the compiled program)."""
    tensors = {}
    for spec in specs:
        a_name, b_name = lora_input_names(spec.name)
        a = torch.randn(max_rank, spec.in_features, generator=generator) * (spec.in_features**-0.5)
        b = torch.randn(spec.out_features, max_rank, generator=generator) * (std * max_rank**-0.5)
        tensors[a_name] = a.to(device=device, dtype=dtype)
        tensors[b_name] = b.to(device=device, dtype=dtype)
    return tensors
