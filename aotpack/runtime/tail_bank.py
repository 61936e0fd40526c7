"""The tails of a `lora_tails` package's tailed programs, written after every slot-bank write.

The tailed block programs (models/tail_groups.py) read each reader's tailed weight `[W | B_hi | B_hi | B_lo]` and
one LoRA input per tail group, `<holder>.lora_A` = its readers' A (a single block's four, a double-block stream's
one), each row j divided by its factor c_j (`lora_tails.column_factors`). After each switch the bank's own A/B
tensors hold the set; this writes the tails and the group inputs from them, layers of one shape in one batch of
kernels, no host read. `ready` says whether the tailed programs may run: a set of rank above `TAIL_RANK` in a reader
keeps the slotted programs. No set is refused for its strength: the programs choose each row's headroom from its own
`u` (`lora_tails.row_headroom`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.lora_tails import TAIL_COLUMNS, TAIL_RANK, column_factors, tail_columns, weight_tail
from ..models.slots import lora_input_names
from ..models.tail_groups import TailGroup, block_tail_groups


class _Reader:
    """One tailed reader: its slot name, base row scales, tailed weight's tail columns and its rows of the group
    input."""

    def __init__(self, name: str, scale: torch.Tensor, tail: torch.Tensor, group_rows: torch.Tensor):
        self.name, self.scale, self.tail, self.group_rows = name, scale, tail, group_rows


class _ShapeGroup:
    """Readers of one weight shape, written in one batch of kernels: their bank views (the bank's tensors never
    move) and write targets, made once at load rather than looked up per reader at every switch."""

    def __init__(self, readers: list[_Reader], bank):
        a_b = [tuple(bank.tensors[name] for name in lora_input_names(reader.name)) for reader in readers]
        self.lora_a = [a[:TAIL_RANK] for a, _ in a_b]  # [rank, in] each
        self.lora_b = [b[:, :TAIL_RANK] for _, b in a_b]  # [out, rank] each
        self.missing = TAIL_RANK - self.lora_a[0].shape[0]  # a bank of max_rank below TAIL_RANK: zero-padded
        self.scales = [reader.scale for reader in readers]
        self.targets = [reader.tail for reader in readers] + [reader.group_rows for reader in readers]

    def values(self) -> list[torch.Tensor]:
        """The tails and the group rows of the bank's live set, in `targets`' order."""
        lora_a, lora_b = torch.stack(self.lora_a), torch.stack(self.lora_b)  # [L, rank, in], [L, out, rank]
        if self.missing:
            lora_a, lora_b = F.pad(lora_a, (0, 0, 0, self.missing)), F.pad(lora_b, (0, self.missing))
        scales = torch.stack(self.scales)  # read at each switch: a merge writes them, its unmerge restores them
        factors = column_factors(scales, lora_b)  # [L, TAIL_RANK], powers of two
        tails = weight_tail(lora_b, scales, factors[:, None, :])
        scaled_a = (lora_a.float() / factors[:, :, None]).to(lora_a.dtype)  # exact: c_j is a power of two
        return [*tails.unbind(0), *scaled_a.unbind(0)]


class TailBank:
    def __init__(self, transformer, bank):
        self.bank = bank
        self.readers: list[_Reader] = []
        # every group the package's build may have installed; those it did not are absent from the blocks
        for blocks, index, block, name, _ in block_tail_groups(transformer, mlp_in=True):
            if (holder := getattr(block, name, None)) is not None:
                self._add_group(f"{blocks}.{index}", block, name, holder)
        by_shape: dict[tuple, list[_Reader]] = {}
        for reader in self.readers:
            by_shape.setdefault(tuple(reader.tail.shape) + tuple(reader.group_rows.shape), []).append(reader)
        self._groups = [_ShapeGroup(readers, bank) for readers in by_shape.values()]
        self.ready = False

    def _add_group(self, prefix: str, block, name: str, holder: TailGroup) -> None:
        """`holder`'s readers, and its group input in the bank (the tailed programs' input, found by name at load)."""
        in_features = holder.weights[0].shape[1] - TAIL_COLUMNS
        group = torch.zeros(len(holder.readers) * TAIL_RANK, in_features, dtype=self.bank.dtype,
                            device=holder.weights[0].device)
        self.bank.tensors[f"{prefix}.{name}.lora_A"] = group
        for position, reader in enumerate(holder.readers):
            scale = block.get_submodule(reader).base.weight.scale
            self.readers.append(_Reader(f"{prefix}.{reader}", scale,
                                        tail_columns(holder.weights[position], position, holder.paired),
                                        group[position * TAIL_RANK:(position + 1) * TAIL_RANK]))

    def refresh(self) -> None:
        """Write the live set's tails and group inputs (the bank was just written); `ready` if they hold it."""
        self.ready = False
        if self.bank.is_empty or not self.readers:
            return
        if any(self.bank.used_rank[reader.name] > TAIL_RANK for reader in self.readers):
            return
        targets, values = [], []
        for group in self._groups:
            targets += group.targets
            values += group.values()
        torch._foreach_copy_(targets, values)
        self.ready = True
