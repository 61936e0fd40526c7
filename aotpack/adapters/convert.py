"""Run diffusers' own Flux LoRA converters on a raw state dict, and report what they dropped.

Layout detection and key conversion (kohya / sd-scripts, ComfyUI, XLabs, "mixture", BFL control,
fal Kontext, ai-toolkit / PEFT) are `FluxLoraLoaderMixin.lora_state_dict`, exactly what
`FluxPipeline.load_lora_weights` runs; nothing here re-implements them.
"""

from __future__ import annotations

import dataclasses
import re
import traceback
from pathlib import Path

import torch

from ..errors import AdapterFormatError
from .provenance import run_tracked, tracked, used_keys

# Labels for what diffusers drops, so a note says what was lost (detection itself is generic).
_DROPPED_KINDS = (
    ("T5 text-encoder LoRA (FluxPipeline loads no T5 LoRA)", re.compile(r"t5xxl|lora_te[23]_|text_encoder_2\.")),
    ("CLIP position-embedding LoRA", re.compile(r"position_embedding")),
    ("CLIP text-projection LoRA", re.compile(r"text_projection")),
)


LOADED_PREFIXES = ("transformer.", "text_encoder.")  # what FluxPipeline.load_lora_weights loads


@dataclasses.dataclass
class Conversion:
    state_dict: dict[str, torch.Tensor]  # diffusers keys: "transformer.…" / "text_encoder.…" (and others)
    alphas: dict[str, torch.Tensor]
    dropped: list[str]  # raw keys that reach nothing FluxPipeline loads
    misnamed: dict[str, list[str]]  # of those, raw keys converted to names no component loads -> those names
    sources: dict[str, set[str]]  # converted key -> the raw keys its tensor was computed from


def convert(state_dict: dict[str, torch.Tensor], source: str) -> Conversion:
    from diffusers import FluxPipeline

    raw = tracked(state_dict)
    try:
        converted, alphas = run_tracked(FluxPipeline.lora_state_dict, raw, return_alphas=True)
    except Exception as err:  # converters fail with assorted types (KeyError, AssertionError, ValueError...)
        raise AdapterFormatError(
            f"adapter {source}: diffusers cannot convert this LoRA layout ({_where(err)})",
            "use a Flux.1 LoRA in a published layout (PEFT/diffusers, kohya, ComfyUI, XLabs, ai-toolkit), "
            "made for this model's block counts and widths",
        ) from err
    alphas = alphas or {}
    loaded = {k: v for k, v in converted.items() if k.startswith(LOADED_PREFIXES)}
    dropped = sorted(set(state_dict) - used_keys(state_dict.keys(), loaded, alphas))
    misnamed = {}
    for key, value in converted.items():
        if key not in loaded:
            for raw_key in used_keys(dropped, {key: value}):
                misnamed.setdefault(raw_key, []).append(key)
    sources = {key: used_keys((), {key: value}) for key, value in converted.items()}
    # Untag: the output tensors are aliases that must not carry the tags into the adapter.
    converted = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in converted.items()}
    alphas = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in alphas.items()}
    return Conversion(converted, alphas, dropped, misnamed, sources)


def _where(err: Exception) -> str:
    """The error and the converter line that raised it (converters often assert without a message)."""
    frame = traceback.extract_tb(err.__traceback__)[-1]
    return f"{type(err).__name__}: {err} at {Path(frame.filename).name}:{frame.lineno} `{frame.line}`"


def _misnamed_as(key: str, conversion: Conversion) -> str | None:
    """The name no component loads that diffusers converted `key` (or, for an alpha, its module) to, if any."""
    if key in conversion.misnamed:
        return conversion.misnamed[key][0]
    module = key[: -len("alpha")] if key.endswith(".alpha") else None
    return next((names[0] for raw, names in conversion.misnamed.items() if module and raw.startswith(module)), None)


def _label(key: str, conversion: Conversion) -> str:
    if _misnamed_as(key, conversion):
        return "converted to names that FluxPipeline.load_lora_weights does not load"
    return next((label for label, pattern in _DROPPED_KINDS if pattern.search(key)), "not converted")


def dropped_notes(conversion: Conversion, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """One note per kind of dropped key, saying whether dropping it changes anything."""
    groups: dict[str, list[str]] = {}
    for key in conversion.dropped:
        groups.setdefault(_label(key, conversion), []).append(key)
    notes = []
    for label, keys in groups.items():
        nonzero = [k for k in keys if not k.endswith(".alpha") and torch.any(state_dict[k])]
        effect = ("all zero, so nothing is lost" if not nonzero else
                  f"{len(nonzero)} non-zero tensors not applied, exactly as diffusers' load_lora_weights skips them")
        example = next((k for k in keys if not k.endswith(".alpha")), keys[0])
        misnamed_as = _misnamed_as(example, conversion)  # the example's own converted name
        label = f"{label}: this one to {misnamed_as}" if misnamed_as else label
        notes.append(f"diffusers drops {len(keys)} keys, e.g. {example} ({label}): {effect}")
    return notes
