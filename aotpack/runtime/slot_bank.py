"""The slot bank: persistent, zero-padded LoRA A/B tensors that every compiled program reads."""

from __future__ import annotations

import torch

from ..models.slots import lora_input_names, zero_slot_tensors


class SlotBank:
    """Persistent, zero-padded A/B tensors for every slot: the programs read these on every call.

    Activating adapters copies into them in place (device-side copies, stable addresses).
    """

    def __init__(self, slots, max_rank: int, dtype: torch.dtype, device):
        self.tensors = zero_slot_tensors(slots, max_rank, dtype, device)
        self.dtype = dtype
        self.used_rank = {s.name: 0 for s in slots}
        self.before_write = None  # merge.py: a write from outside unmerges a merged set first
        # what the new set's derived inputs write after each write: tail_bank.py (a lora_tails package's tails),
        # a_halves_bank.py (a lora_down_fp8_dots package's A halves)
        self.after_write: list = []
        self.writes = 0  # every write (modulation_rows.py: a table of rows is not used after one)

    @property
    def is_empty(self) -> bool:
        """No slot holds an adapter (all used ranks 0): the LoRA branches would add exact zeros."""
        return not any(self.used_rank.values())

    def write(self, layers: dict[str, list[tuple]]) -> None:
        """Set every slot to the concatenation of `layers[name]` ((A, B) or (A, B, scale) parts); others to zero.

        Callers validate ranks first: this never fails part-way for rank reasons. Copies are batched
        (`_foreach_*`; a scaled B is one `mul` into its slot), so a switch at scale 1 is a few batched device
        kernels, and no allocation.
        """
        if self.before_write is not None:
            self.before_write()
        self.writes += 1
        dst, src, zero = [], [], []
        for name, used in self.used_rank.items():
            a_buf, b_buf = (self.tensors[n] for n in lora_input_names(name))
            offset = 0
            for a, b, *scale in layers.get(name, ()):
                rank = a.shape[0]
                b_view = b_buf[:, offset:offset + rank]
                dst.append(a_buf[offset:offset + rank])
                src.append(a)
                if not scale or scale[0] == 1.0:
                    dst.append(b_view)
                    src.append(b)
                else:  # not `_foreach_mul_` with a scalar list: it rounds the scale to bf16 first (0.8 -> 0.80078)
                    torch.mul(b, scale[0], out=b_view)
                offset += rank
            if used > offset:  # clear what the previous set left beyond the new rank
                # A's rows are contiguous; B's columns are not, so a fully cleared slot zeroes all of
                # B (contiguous: foreach's fast multi-tensor kernel instead of one launch per view).
                zero += [a_buf[offset:used], b_buf if offset == 0 else b_buf[:, offset:used]]
            self.used_rank[name] = offset
        # One batched copy for every A and unscaled B (a B below max_rank is a strided view: foreach copies
        # those one by one): r64-all at scale 1 was ~500 launches, 19-22 ms on a slow host (H200, 2026-12-01n)
        if dst:
            torch._foreach_copy_(dst, src, non_blocking=True)
        if zero:
            torch._foreach_zero_(zero)
        for write_derived in self.after_write:
            write_derived()

    def warm_up(self) -> None:
        """Run every kind of write once, with zeros, so that the first real switch pays no one-off cost.

        On CUDA, kernels load lazily on first launch (CUDA_MODULE_LOADING=LAZY); the first clear and the
        first scaled copy of a process would otherwise pay for it. The bank ends as it began: all zero.
        """
        names = list(self.used_rank)[:2]
        if not names:
            return
        rank = min(2, self.tensors[lora_input_names(names[0])[0]].shape[0])

        def zeros(name, r, scale):
            a_buf, b_buf = (self.tensors[n] for n in lora_input_names(name))
            return [(torch.zeros_like(a_buf[:r]), torch.zeros_like(b_buf[:, :r]), scale)]

        # a scaled copy (mul) and a plain one (the batched copy); then a partial clear (B's columns beyond rank 1)
        # with the other slot cleared whole; then everything cleared
        self.write({names[0]: zeros(names[0], rank, 0.5), **{n: zeros(n, 1, 1.0) for n in names[1:]}})
        self.write({names[0]: zeros(names[0], 1, 0.5)})
        self.write({})  # a full clear
