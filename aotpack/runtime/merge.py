"""Merged hot adapters: the live LoRA set folded into the bound base weights, in place.

The programs read the weights as user-managed constants (no copy), so writing into the very same
storages (`copy_`) changes what they compute: no rebind, no recompile. While merged, the slot bank is
empty and the no-slot programs run. Unmerging copies the retained originals back: bit-identical.

FP8 (torchao `Float8Tensor`, per-row): the master is the dequantized base (qdata x scale, exact in
float32), the merged weight is re-quantized from master + delta with torchao's own `from_hp`, and the
new qdata/scale are copied into the existing storages. The original qdata/scale are kept for the
restore. (The original bf16 weights are not retained by the loader, so the FP8 base itself is the
master: merging quantizes W_fp8 + delta, not W_bf16 + delta.)
"""

from __future__ import annotations

import torch

NONE, SLOTS, MERGED = "none", "slots", "merged"


def _weight_storages(weight) -> list[torch.Tensor]:
    """The plain tensors that hold `weight` (what the programs have bound): qdata/scale for FP8."""
    if hasattr(weight, "qdata") and hasattr(weight, "scale"):
        return [weight.qdata, weight.scale]
    return [weight]


def _high_precision(weight) -> torch.Tensor:
    """The float32 value of a (possibly FP8) weight."""
    if hasattr(weight, "qdata"):
        return weight.qdata.float() * weight.scale.float()  # per-row scale [out, 1]: exact in fp32
    return weight.detach().float()


def _requantized(weight, value: torch.Tensor) -> list[torch.Tensor]:
    """`value` in `weight`'s format, as tensors matching `_weight_storages(weight)`."""
    if not hasattr(weight, "qdata"):
        return [value.to(weight.dtype)]
    from torchao.quantization import PerRow

    new = type(weight).from_hp(value.to(weight.dtype), float8_dtype=weight.qdata.dtype, granularity=PerRow(),
                               mm_config=weight.mm_config, kernel_preference=weight.kernel_preference,
                               act_quant_kwargs=weight.act_quant_kwargs)
    return [new.qdata, new.scale]


class LoRAModes:
    """Which LoRA mode is live on a compiled transformer: none, slots or merged.

    A switch leaves the current mode exactly (unmerge restores the originals bit for bit) and then
    enters the next one. Callers validate the new set first, so a rejected set changes nothing.
    """

    def __init__(self, transformer, *, master_device=None):
        self.transformer = transformer
        self.mode = NONE
        self.master_device = master_device  # None: keep originals on the weights' device
        self._saved: dict[str, list[torch.Tensor]] = {}  # layer -> original storages (copies)
        transformer.bank.before_write = self._bank_written

    def _bank_written(self) -> None:
        """Someone writes the slot bank directly (diffusers' LoRA calls): leave a merged set first."""
        if self.mode == MERGED:
            self.leave()
        self.mode = SLOTS

    def _keep(self, storage: torch.Tensor) -> torch.Tensor:
        """A copy of `storage` for the restore: on its GPU while memory allows (fast restore), else in
        pinned host memory (a 24 GB card cannot hold a second copy of the touched weights)."""
        device = self.master_device
        if device is None and storage.is_cuda:
            free, _ = torch.cuda.mem_get_info(storage.device)
            device = storage.device if free > 4 * storage.nbytes + (2 << 30) else "cpu"
        device = torch.device(device or storage.device)
        if device.type == "cpu" and storage.is_cuda:
            return storage.detach().to("cpu", copy=True).pin_memory()
        return storage.detach().to(device, copy=True)

    def _layer_weight(self, name: str):
        module = self.transformer._weights_owner.get_submodule(name)
        return getattr(module, "base", module).weight

    @torch.no_grad()
    def enter(self, layers: dict[str, list[tuple]], *, merge: bool) -> None:
        if self.mode == MERGED:  # slots need no leaving: the bank write below replaces them
            self.leave()
        if not merge or not layers:
            self.transformer.bank.write(layers)
            self.mode = SLOTS if layers else NONE
            return
        self.transformer.bank.write({})
        for name, parts in layers.items():
            if not parts:
                continue
            weight = self._layer_weight(name)
            storages = _weight_storages(weight)
            self._saved[name] = [self._keep(s) for s in storages]
            delta = None
            for a, b, *scale in parts:
                term = b.float() @ a.float()
                if scale and scale[0] != 1.0:
                    term = term * scale[0]
                delta = term if delta is None else delta + term
            value = _high_precision(weight) + delta.to(weight.device)
            for storage, new in zip(storages, _requantized(weight, value)):
                storage.copy_(new.view(storage.shape))
        self.transformer.merged = True
        self.mode = MERGED

    @torch.no_grad()
    def leave(self) -> None:
        """Back to the base weights and an empty bank (from any mode)."""
        if self.mode == MERGED:
            for name, originals in self._saved.items():
                for storage, original in zip(_weight_storages(self._layer_weight(name)), originals):
                    storage.copy_(original)
            self._saved.clear()
            self.transformer.merged = False
        elif self.mode == SLOTS:
            self.transformer.bank.write({})
        self.mode = NONE
