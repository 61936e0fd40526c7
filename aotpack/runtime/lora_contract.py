"""diffusers' LoRA contract on the compiled transformer, so a stock `FluxPipeline` drives the slots.

`pipe.load_lora_weights`, `set_adapters`, `disable_lora`, `enable_lora`, `delete_adapters`,
`unload_lora_weights` and `get_active_adapters` (FluxLoraLoaderMixin + LoraBaseMixin, diffusers
0.42) call `load_lora_adapter`, `set_adapters`, `disable_lora`, `enable_lora`, `delete_adapters` and
`unload_lora` on `pipe.transformer` when it is a `ModelMixin`, and read `peft_config` and the active
adapters of the first PEFT `BaseTunerLayer` among its modules. Where PEFT injects adapter layers,
this parses each adapter once with aotpack's parser (diffusers' converters, PEFT's scaling) and
writes the stack of the active ones into the slot bank. Text-encoder parts take diffusers' own path.

The semantics are PEFT's (tests/test_lora_contract.py compares them with diffusers + PEFT eager):
a newly loaded adapter becomes the only active one, at weight 1; a weight stays with its adapter
until set again; disable/enable keep the active set; deleting an active adapter leaves the other
active ones (or, if none, the first remaining name in sorted order, as PEFT does).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
from torch import nn

from ..adapters.files import load_safetensors
from ..adapters.parse import Adapter, parse_state_dict
from ..adapters.sources import adapter_source, local_path
from ..adapters.stack import check_adapter, stack_adapters
from ..errors import AdapterError, UnsupportedCallError
from ..models.prepare import torch_dtype
from .requests import check_scale



@dataclasses.dataclass
class _LoraState:
    adapters: dict[str, Adapter] = dataclasses.field(default_factory=dict)  # load order
    weights: dict[str, float] = dataclasses.field(default_factory=dict)
    active: list[str] = dataclasses.field(default_factory=list)
    enabled: bool = True
    loaded: bool = False  # False again after unload_lora: diffusers then sees no peft_config


def _fusing_refused() -> UnsupportedCallError:
    return UnsupportedCallError("fuse_lora/unfuse_lora are not supported on a transformer set up with aotpack.apply",
                                "keep the adapters unfused (set_adapters switches the slots without recompiling), or "
                                "load with aotpack.load(...) and call set_loras(..., merge=True), which folds a set "
                                "into the FP8 weights and restores them exactly")


@functools.cache
def _adapter_layer_class():
    """A module that answers as PEFT's `BaseTunerLayer` for what diffusers reads through it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    class AdapterSetLayer(nn.Module, BaseTunerLayer):
        adapter_layer_names = ()

        def __init__(self, state: _LoraState):
            super().__init__()
            self._state = state

        @property
        def active_adapter(self) -> list[str]:  # read by pipe.get_active_adapters()
            return list(self._state.active)

        @property
        def disable_adapters(self) -> bool:
            return not self._state.enabled

        @property
        def r(self) -> dict[str, int]:  # diffusers' get_adapter_name counts these for "default_N"
            return {name: adapter.max_rank for name, adapter in self._state.adapters.items()}

        @property
        def lora_A(self) -> dict:  # pipe.set_lora_device skips names not in here: slots stay on their device
            return {}

        def merge(self, *args, **kwargs):
            raise _fusing_refused()

        def unmerge(self) -> None:  # nothing is ever merged
            return None

    return AdapterSetLayer


_LAYER_MODULE = "lora_adapter_set"


class LoraContractMixin:
    """diffusers' PEFT adapter methods for `CompiledFluxTransformer` (needs `manifest`, `bank`,
    `device` and `weight_layer_names()` of its host)."""

    # -- state -----------------------------------------------------------------------------------------
    @property
    def _lora(self) -> _LoraState:
        layer = self._modules.get(_LAYER_MODULE)
        if layer is None:
            layer = _adapter_layer_class()(_LoraState())
            self.add_module(_LAYER_MODULE, layer)
        return layer._state

    @property
    def peft_config(self) -> dict:
        """{adapter name: LoraConfig}; absent (AttributeError) before any load and after unload, as in PEFT.

        Scaling is folded into each adapter's B factors, so `lora_alpha == r` here."""
        layer = self._modules.get(_LAYER_MODULE)
        if layer is None or not layer._state.loaded:
            raise AttributeError("peft_config")
        from peft import LoraConfig

        return {name: LoraConfig(r=max(a.max_rank, 1), lora_alpha=max(a.max_rank, 1), target_modules=sorted(a.layers))
                for name, a in layer._state.adapters.items()}

    @property
    def _hf_peft_config_loaded(self) -> bool:
        layer = self._modules.get(_LAYER_MODULE)
        return layer is not None and layer._state.loaded

    def _write_slots(self, state: _LoraState) -> None:
        """Stack the active, loaded adapters into the bank (checked before anything changes)."""
        names = [n for n in state.active if n in state.adapters] if state.enabled else []
        entries = [(state.adapters[n], state.weights[n]) for n in names]
        slots = self.manifest.slot_table()
        layers, _ = stack_adapters(entries, slots, self.manifest.max_rank,
                                   model_layers=set(slots) | self.weight_layer_names())
        self.bank.write(layers)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _commit(self, **changes) -> None:
        """Apply `changes` to the state if the resulting slot contents are valid; else leave all as it was."""
        state = self._lora
        copied = {"adapters": dict(state.adapters), "weights": dict(state.weights), "active": list(state.active)}
        candidate = dataclasses.replace(state, **{**copied, **changes})
        self._write_slots(candidate)
        for field in dataclasses.fields(_LoraState):
            setattr(state, field.name, getattr(candidate, field.name))

    # -- loading ---------------------------------------------------------------------------------------
    def _read_adapter(self, source, prefix: str | None, kwargs) -> tuple[dict, dict]:
        """(state dict, diffusers metadata) from a dict, a local file/folder or a Hub file."""
        if isinstance(source, dict):
            state_dict, metadata = dict(source), kwargs.get("metadata") or {}
        else:
            where = adapter_source(os.fspath(source), weight_name=kwargs.get("weight_name"),
                                   revision=kwargs.get("revision"))
            state_dict, metadata = load_safetensors(local_path(where))
            metadata = kwargs.get("metadata") or metadata
        alphas = kwargs.get("network_alphas") or {}
        state_dict.update({k: v if torch.is_tensor(v) else torch.tensor(float(v)) for k, v in alphas.items()})
        if prefix is not None:  # the parser expects diffusers' "transformer." keys
            state_dict = {k: v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
            state_dict = {f"transformer.{k.removeprefix(f'{prefix}.')}": v for k, v in state_dict.items()}
            metadata = {f"transformer.{k.removeprefix(f'{prefix}.')}": v for k, v in metadata.items()
                        if k.startswith(f"{prefix}.")}
        return state_dict, metadata

    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict, prefix: str | None = "transformer",
                          hotswap: bool = False, **kwargs) -> None:
        """Parse a LoRA (state dict, file, folder or Hub file) into this package's slots, as
        `FluxPipeline.load_lora_weights` expects; the new adapter becomes the only active one."""
        state = self._lora
        name = kwargs.get("adapter_name")
        if name in state.adapters and not hotswap:
            raise AdapterError(f"adapter name {name!r} is already loaded", "pick another adapter_name, delete it "
                               "first (delete_adapters) or pass hotswap=True to replace it")
        if hotswap and name not in state.adapters:
            raise AdapterError(f"hotswap=True but no adapter named {name!r} is loaded (loaded: {list(state.adapters)})",
                               "load it first without hotswap, or name a loaded adapter")
        state_dict, metadata = self._read_adapter(pretrained_model_name_or_path_or_dict, prefix, kwargs)
        if not any("lora" in k for k in state_dict):
            return  # nothing for the transformer (e.g. a CLIP-only LoRA): diffusers skips it too
        name = name if name is not None else f"default_{len(state.adapters)}"
        adapter = parse_state_dict(state_dict, name=name, source=f"adapter {name!r}", metadata=metadata)
        adapter = adapter.to(self.device, torch_dtype(self.manifest.lora_dtype))
        slots = self.manifest.slot_table()
        check_adapter(adapter, slots, self.manifest.max_rank, set(slots) | self.weight_layer_names())
        adapters = {**state.adapters, name: adapter}
        if hotswap:  # replaces the weights in place: active set and weight stay (PEFT's hotswap)
            self._commit(adapters=adapters, loaded=True)
        else:
            self._commit(adapters=adapters, weights={**state.weights, name: 1.0}, active=[name], loaded=True)

    # -- switching -------------------------------------------------------------------------------------
    def set_adapters(self, adapter_names, weights=None) -> None:
        """Activate `adapter_names` with `weights` (a float each, or one for all; None means 1.0)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = weights if isinstance(weights, list) else [weights] * len(names)
        if len(weights) != len(names):
            raise AdapterError(f"{len(names)} adapter names but {len(weights)} weights", "pass one weight per adapter")
        if any(isinstance(w, dict) for w in weights):
            raise UnsupportedCallError("per-block LoRA weights (dicts) are not supported by compiled slots",
                                       "pass one float weight per adapter")
        # NaN/Inf/huge weights would run as NaN/saturated images: refused as set_loras refuses them
        resolved = {n: 1.0 if w is None else check_scale(w, name=f"adapter {n!r}") for n, w in zip(names, weights)}
        self._commit(active=names, weights={**self._lora.weights, **resolved})

    def set_adapter(self, adapter_name) -> None:
        self.set_adapters(adapter_name)

    def disable_lora(self) -> None:
        self._commit(enabled=False)

    def enable_lora(self) -> None:
        self._commit(enabled=True)

    disable_adapters = disable_lora
    enable_adapters = enable_lora

    def active_adapters(self) -> list[str]:
        return list(self._lora.active)

    def get_active_adapters(self) -> list[str]:
        return self.active_adapters()

    def delete_adapters(self, adapter_names) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        state = self._lora
        adapters = {n: a for n, a in state.adapters.items() if n not in names}
        active = [n for n in state.active if n not in names]
        if not active and any(n in state.active for n in names) and adapters:
            active = [min(adapters)]  # PEFT's choice (first in sorted order) when the last active adapter goes
        self._commit(adapters=adapters, weights={n: w for n, w in state.weights.items() if n in adapters},
                     active=active)

    def unload_lora(self) -> None:
        self._commit(adapters={}, weights={}, active=[], enabled=True, loaded=False)

    # -- what slots cannot do --------------------------------------------------------------------------
    def fuse_lora(self, *args, **kwargs):
        raise _fusing_refused()

    def unfuse_lora(self) -> None:  # nothing is ever fused
        return None

    def enable_lora_hotswap(self, target_rank: int = 128, check_compiled: str = "error") -> None:
        """Slots are hot-swappable by construction; only the package's max_rank bounds what fits."""
        if target_rank > self.manifest.max_rank:
            raise AdapterError(f"target_rank {target_rank} is above the package's max_rank {self.manifest.max_rank}",
                               f"build the package with --max-rank {target_rank}")
