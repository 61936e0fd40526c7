"""A's FP8 halves for the slots whose programs read them (recipe lever `lora_down_fp8_dots`), written after every
slot-bank write.

Such a slot's down-projection (models/lora_down_fp8.py) runs FP8 x FP8 tensor-core dots against A split into FP8
high and low rows with one float32 scale a row (`fp8_hi_lo_rows`): `<slot>.lora_A_fp8` [2R, in] and
`<slot>.lora_A_fp8_scale` [1, 2R], two more program inputs. Splitting A inside the program cost ~8 us a call (57
calls a 512² step: the cuBLASLt form lost 1.2 ms that way, H100, 2026-12-08a); here it runs once a switch, slots of
one shape in one batch of kernels, no host read. The tensors live in the bank's `tensors` under those names, so the
programs find them as they find A and B; their addresses never change (CUDA graphs replay them).
"""

from __future__ import annotations

import torch

from ..models.lora_down_fp8 import fp8_hi_lo_rows
from ..models.slots import a_halves_input_names, lora_input_names


def a_halves_slot(input_name: str) -> str | None:
    """The slot whose A halves (or their scales) `input_name` names, None for any other program input."""
    for suffix in a_halves_input_names(""):  # (".lora_A_fp8", ".lora_A_fp8_scale")
        if input_name.endswith(suffix):
            return input_name.removesuffix(suffix)
    return None


class AHalvesBank:
    """The halves of the slots that `add` was given, in `bank.tensors`, and `refresh`, which the bank calls after each
    write. Each refresh splits every such slot, a few kernels a weight shape: FLUX.1-dev's 38 single-block `proj_out`
    A's [64, 15360] (75 MB in bf16) go through float32 temporaries of ~150 MB each, a few at a time (~0.6 GB at
    the peak, freed after), then the double blocks' 19 (or 38 with `lora_down_fp8_text`) [64, 12288]. Its time on a
    GPU is unmeasured and counts toward a switch."""

    def __init__(self, bank):
        self.bank = bank
        self._by_shape: dict[tuple, list[str]] = {}  # slot names by A's shape, each shape split as one batch

    def __len__(self) -> int:
        return sum(len(slots) for slots in self._by_shape.values())

    def add(self, slot: str) -> None:
        """Give `slot` its halves in the bank (a program reads them), split from the bank's A as it stands."""
        names = a_halves_input_names(slot)
        if names[0] in self.bank.tensors:
            return
        a = self.bank.tensors[lora_input_names(slot)[0]]
        for name, value in zip(names, fp8_hi_lo_rows(a)):
            self.bank.tensors[name] = value.contiguous()
        self._by_shape.setdefault(tuple(a.shape), []).append(slot)

    def refresh(self) -> None:
        """Split the bank's A of every such slot into its halves (the bank was just written)."""
        targets, values = [], []
        for slots in self._by_shape.values():
            halves, scales = fp8_hi_lo_rows(torch.stack([self.bank.tensors[lora_input_names(s)[0]] for s in slots]))
            for slot, *split in zip(slots, halves.unbind(0), scales.unbind(0)):
                targets += [self.bank.tensors[name] for name in a_halves_input_names(slot)]
                values += split
        if targets:
            torch._foreach_copy_(targets, values)
