"""Turn an eager Flux transformer into the exact module the programs were exported from.

Build and runtime both go through `prepare_transformer`, so that parameter names, dtypes and
quantized layouts of the bound weights are identical to what the compiled programs expect.
"""

from __future__ import annotations

import torch

from .quant import place_and_quantize
from .regions import block_prefixes
from .slots import SlotSpec, detach_biases, install_slots, select_slot_names

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def regional_slot_names(transformer, patterns) -> list[str]:
    """Slot names, made uniform per block type: one program serves every block of a type.

    If a pattern selects a layer in some blocks of a type, that layer gets a slot in all of them
    (an adapter that does not target a block simply leaves that block's slot at zero).
    """
    chosen = set(select_slot_names(transformer, patterns))
    names = [n for n in chosen if not n.startswith(("transformer_blocks.", "single_transformer_blocks."))]
    for prefixes in block_prefixes(transformer).values():
        relative = {n[len(p) + 1:] for p in prefixes for n in chosen if n.startswith(p + ".")}
        names += [f"{p}.{r}" for p in prefixes for r in relative]
    order = {name: i for i, name in enumerate(n for n, _ in transformer.named_modules())}
    return sorted(names, key=order.__getitem__)


def prepare_transformer(transformer, *, dtype: str, device: str, quantization: str, slot_names,
                        unquantized_linears=()) -> list[SlotSpec]:
    """Cast, place, quantize (all block linears but `unquantized_linears`) and slot `transformer` in place;
    returns the slot table."""
    transformer.requires_grad_(False)
    transformer.to(torch_dtype(dtype))
    quantized = place_and_quantize(transformer, quantization, device, tuple(unquantized_linears))
    slotted = set(slot_names)
    specs = install_slots(transformer, list(slot_names))
    detach_biases(transformer, [n for n in quantized if n not in slotted])
    return specs
