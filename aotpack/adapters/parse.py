"""Parse any published Flux LoRA file into per-layer (A, scaled B) pairs, through diffusers' converters.

Format detection and key conversion (kohya / sd-scripts, ComfyUI, XLabs, ai-toolkit, fal, BFL
control, PEFT/diffusers) are diffusers' own `FluxLoraLoaderMixin.lora_state_dict`; per-layer
scaling (alpha / rank, rank and alpha patterns, rsLoRA, diffusers' saved LoraConfig metadata)
follows `load_lora_adapter` + PEFT exactly. What a slot cannot represent is reported, never dropped.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from ..errors import AdapterFormatError
from .files import load_safetensors, resolve_adapter_source

TRANSFORMER_PREFIX = "transformer."
TEXT_ENCODER_PREFIX = "text_encoder."


@dataclasses.dataclass
class LayerDelta:
    """`delta W = B @ A` for one layer, with alpha/rank scaling already folded into B."""

    A: torch.Tensor  # [rank, in]
    B: torch.Tensor  # [out, rank]

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclasses.dataclass
class Adapter:
    """A parsed adapter in compact form (rank-r factors), ready to be stacked into slots."""

    name: str
    source: str
    layers: dict[str, LayerDelta]  # transformer layer name -> delta
    text_encoder: dict[str, torch.Tensor]  # diffusers-format CLIP LoRA keys ("text_encoder.…")
    text_encoder_alphas: dict[str, torch.Tensor]
    metadata: dict
    notes: list[str]

    @property
    def nbytes(self) -> int:
        tensors = [t for d in self.layers.values() for t in (d.A, d.B)] + list(self.text_encoder.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def max_rank(self) -> int:
        return max((d.rank for d in self.layers.values()), default=0)

    def to(self, device=None, dtype=None) -> "Adapter":
        layers = {k: LayerDelta(d.A.to(device=device, dtype=dtype), d.B.to(device=device, dtype=dtype))
                  for k, d in self.layers.items()}
        return dataclasses.replace(self, layers=layers)


# Parts of a LoRA file a slot cannot hold, by key pattern, with what they are.
_UNSUPPORTED = (
    (".lora_B.bias", "LoRA bias (lora_B.bias)"),
    ("lora_magnitude_vector", "DoRA magnitude vectors"),
    ("dora_scale", "DoRA scales"),
    (".lokr_", "LoKr factors"),
    (".hada_", "LoHa factors"),
    (".diff_b", "bias deltas (diff_b)"),
    (".diff", "full weight deltas (diff)"),
)
_NORM_KEYS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


def _classify(state_dict: dict) -> tuple[dict, dict, dict[str, list[str]], list[str]]:
    """Split converted keys into transformer LoRA, text-encoder LoRA, unsupported parts, and other keys."""
    transformer, text_encoder, unsupported, other = {}, {}, {}, []
    for key, value in state_dict.items():
        label = next((label for pattern, label in _UNSUPPORTED if pattern in key), None)
        if label is None and key.startswith(TRANSFORMER_PREFIX) and "lora" not in key:
            if any(norm in key for norm in _NORM_KEYS) or key.endswith((".weight", ".bias", ".scale")):
                label = "norm/weight replacements (e.g. Control-LoRA norm scales)" if any(
                    norm in key for norm in _NORM_KEYS) else "full weight/bias replacements"
        if label is not None:
            unsupported.setdefault(label, []).append(key)
        elif key.startswith(TRANSFORMER_PREFIX) and ".lora_" in key:
            transformer[key[len(TRANSFORMER_PREFIX):]] = value
        elif key.startswith(TEXT_ENCODER_PREFIX) and ".lora_" in key:
            text_encoder[key] = value
        else:
            other.append(key)
    return transformer, text_encoder, unsupported, other


def _module_scalings(transformer_sd: dict, alphas: dict, metadata: dict) -> dict[str, float]:
    """alpha / r (or alpha / sqrt(r) with rsLoRA) per module, as diffusers' load_lora_adapter + PEFT compute it."""
    from diffusers.utils.peft_utils import _create_lora_config
    from peft.utils.other import get_pattern_key

    rank = {f"^{k}": v.shape[1] for k, v in transformer_sd.items() if "lora_B" in k and v.ndim > 1}
    prefix_alphas = {k[len(TRANSFORMER_PREFIX):]: v for k, v in (alphas or {}).items()
                     if k.startswith(TRANSFORMER_PREFIX)}
    meta = {k[len(TRANSFORMER_PREFIX):]: v for k, v in (metadata or {}).items() if k.startswith(TRANSFORMER_PREFIX)}
    config = _create_lora_config(transformer_sd, prefix_alphas or None, meta or None, rank)
    scalings = {}
    for key in transformer_sd:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        alpha = float(alpha.item() if torch.is_tensor(alpha) else alpha)
        scalings[module] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    return scalings


def parse_state_dict(state_dict: dict, *, name: str, source: str, metadata: dict | None = None) -> Adapter:
    """Parse an in-memory LoRA state dict (any layout diffusers understands)."""
    from diffusers import FluxPipeline

    raw_keys = set(state_dict)
    try:
        converted, alphas = FluxPipeline.lora_state_dict(dict(state_dict), return_alphas=True)
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as err:
        raise AdapterFormatError(
            f"adapter {source}: diffusers cannot convert this LoRA layout ({type(err).__name__}: {err})",
            "use a Flux.1 LoRA in a published format (PEFT/diffusers, kohya, ComfyUI, XLabs, ai-toolkit)",
        ) from err
    transformer_sd, text_encoder, unsupported, other = _classify(converted)
    if unsupported:
        parts = "; ".join(f"{label}: {len(keys)} keys, e.g. {keys[0]}" for label, keys in unsupported.items())
        raise AdapterFormatError(
            f"adapter {source} holds parts a LoRA slot cannot represent ({parts})",
            "use a plain LoRA (A/B matrices only) version of this adapter, or merge it into the base weights "
            "and build a package for the merged model",
        )
    notes = []
    if other:
        notes.append(f"{len(other)} keys not used by FluxPipeline (e.g. {sorted(other)[:3]})")
    if len(converted) + len(alphas or {}) < len(raw_keys) and any(".lora_down." in k for k in raw_keys):
        notes.append(f"diffusers' kohya converter consumed {len(raw_keys)} keys into "
                     f"{len(converted)} (embedder/final-layer keys it does not map are dropped by diffusers too)")
    scalings = _module_scalings(transformer_sd, alphas, metadata or {})
    layers = {}
    for module, scaling in scalings.items():
        a = transformer_sd[f"{module}.lora_A.weight"]
        b_key = f"{module}.lora_B.weight"
        if b_key not in transformer_sd:
            raise AdapterFormatError(f"adapter {source}: layer {module} has lora_A but no lora_B",
                                     "the file is incomplete; download it again")
        a, b = a.float(), transformer_sd[b_key].float()
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterFormatError(
                f"adapter {source}: layer {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, not [r, in] x [out, r]",
                "only linear-layer LoRA factors are supported",
            )
        layers[module] = LayerDelta(a.contiguous(), (b * scaling).contiguous())
    text_alphas = {k: v for k, v in (alphas or {}).items() if k.startswith(TEXT_ENCODER_PREFIX)}
    if not layers and not text_encoder:
        raise AdapterFormatError(f"adapter {source} holds no Flux LoRA layers",
                                 "check that this is a Flux.1 LoRA (not SD/SDXL)")
    return Adapter(name=name, source=source, layers=layers, text_encoder=text_encoder,
                   text_encoder_alphas=text_alphas, metadata=metadata or {}, notes=notes)


def parse_adapter(source: str | Path, *, weight_name: str | None = None, revision: str | None = None,
                  name: str | None = None) -> Adapter:
    """Parse a LoRA from a local file or the Hub (`owner/repo/file.safetensors`)."""
    path = resolve_adapter_source(str(source), weight_name=weight_name, revision=revision)
    tensors, metadata = load_safetensors(path)
    return parse_state_dict(tensors, name=name or path.stem, source=str(source), metadata=metadata)
