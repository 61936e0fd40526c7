"""Parse any published Flux LoRA file into per-layer (A, scaled B) pairs, through diffusers' converters.

Steps: refuse what a slot cannot hold (`unsupported`), convert with diffusers (`convert`), sort the
converted keys into transformer and text-encoder parts, then fold each layer's scaling (alpha / r,
rank and alpha patterns, rsLoRA, diffusers' saved LoraConfig metadata) into B exactly as
diffusers' `load_lora_adapter` + PEFT compute it. Nothing is dropped without a note.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from concurrent.futures import Future
from pathlib import Path

import torch

from ..errors import AdapterFileError, AdapterFormatError
from .convert import Conversion, convert, dropped_notes
from .files import METADATA_KEY, check_finite, check_float_dtypes, max_magnitudes, read_safetensors, upcast_float8
from .sources import AdapterSource, adapter_source, resolve_file
from .unsupported import scan

TRANSFORMER_PREFIX = "transformer."
TEXT_ENCODER_PREFIX = "text_encoder."
_FIX_PLAIN = ("use a plain LoRA (A/B matrices only) version of this adapter, or merge it into the base weights "
              "and build a package for the merged model")
_uids = itertools.count()


@dataclasses.dataclass
class LayerDelta:
    """`delta W = B @ A` for one layer, with alpha/rank scaling already folded into B."""

    A: torch.Tensor  # [rank, in]
    B: torch.Tensor  # [out, rank]

    @property
    def rank(self) -> int:
        return self.A.shape[0]



def resolved(value):
    """`value`, or the result of a `Future` (a background sha256, `read_safetensors`)."""
    return value.result() if isinstance(value, Future) else value

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
    uid: int = dataclasses.field(default_factory=lambda: next(_uids))  # identity of this parse
    # provenance, to reproduce an output: the sha256 of the file's bytes as parsed (None for an in-memory state
    # dict; a Future while a background thread hashes them, `read_safetensors`), and for a Hub file the revision
    # asked for (None: the default branch) and the commit it resolved to
    digest: "str | Future[str] | None" = None
    revision: str | None = None
    commit_hash: str | None = None

    @property
    def sha256(self) -> str | None:
        """The sha256 of the bytes parsed (waits for their background hash, ~1 s a GB)."""
        return resolved(self.digest)

    @property
    def nbytes(self) -> int:
        tensors = [t for d in self.layers.values() for t in (d.A, d.B)] + list(self.text_encoder.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def max_rank(self) -> int:
        return max((d.rank for d in self.layers.values()), default=0)

    def provenance(self, *, wait: bool = True) -> dict:
        """What identifies the bytes this adapter was parsed from: {"source", "sha256", "revision", "commit_hash"}
        (huggingface_hub's names; the last two None for a local file). `wait=False`: "sha256" may still be a
        Future (`resolved` gives its value), for records kept past a switch that must not wait for the hash."""
        return {"source": self.source, "sha256": self.sha256 if wait else self.digest, "revision": self.revision,
                "commit_hash": self.commit_hash}

    def to(self, device=None, dtype=None) -> "Adapter":
        layers = {k: LayerDelta(d.A.to(device=device, dtype=dtype), d.B.to(device=device, dtype=dtype))
                  for k, d in self.layers.items()}
        return dataclasses.replace(self, layers=layers)  # same uid: the same parse


def _split(converted: dict) -> tuple[dict, dict, list[str], list[str]]:
    """(transformer LoRA factors, text-encoder LoRA keys, transformer alpha keys diffusers does not apply,
    slot-incompatible keys); keys for no FluxPipeline component are left out (`convert` reports them as dropped)."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    transformer = {k[len(TRANSFORMER_PREFIX):]: v for k, v in converted.items() if k.startswith(TRANSFORMER_PREFIX)}
    if transformer and "lora_A" not in next(iter(transformer)):
        # diffusers' load_lora_adapter does this (judging by the first key): old diffusers names such as
        # `….lora.down.weight` become PEFT's `….lora_A.weight`
        transformer = convert_unet_state_dict_to_peft(transformer)
    factors, unapplied_alphas, incompatible = {}, [], []
    for key, value in transformer.items():
        if key.endswith((".lora_A.weight", ".lora_B.weight")):
            factors[key] = value
        elif key.endswith(".alpha"):
            # only in a file with `lora_down`/`lora_up` keys: diffusers' kohya converter keeps its `transformer.`
            # keys as they are (lora_down/up renamed lora_A/B), alphas too, which load_lora_weights then ignores
            unapplied_alphas.append(TRANSFORMER_PREFIX + key)
        else:  # norm / full-weight replacements, biases: what the converters add beyond A/B
            incompatible.append(TRANSFORMER_PREFIX + key)
    text_encoder = {k: v for k, v in converted.items() if k.startswith(TEXT_ENCODER_PREFIX) and "lora" in k}
    return factors, text_encoder, unapplied_alphas, incompatible


# diffusers' "mixture" converter maps the block modules it does not know (ff, proj_mlp, proj_out, norms) onto the
# block itself, so they collide on a name that is no linear layer (diffusers' load_lora_weights then fails)
_BLOCK = re.compile(r"(single_)?transformer_blocks\.\d+")


def _check_leaf_layers(factors: dict, conversion: Conversion, source: str) -> None:
    blocks = sorted({k.rsplit(".lora_", 1)[0] for k in factors if _BLOCK.fullmatch(k.rsplit(".lora_", 1)[0])})
    if blocks:
        raw = sorted(conversion.sources.get(f"{TRANSFORMER_PREFIX}{blocks[0]}.lora_A.weight", ()))
        example = next((k for k in raw if not k.endswith(".alpha")), blocks[0])
        raise AdapterFormatError(
            f"adapter {source}: diffusers' converter maps modules of this file (e.g. {example}) onto the block name "
            f"{blocks[0]}, which is no linear layer, and every other module of the block that is not an attention "
            "projection (ff, proj_mlp, proj_out, norm linears) onto the same name: diffusers' converter cannot map "
            "those modules of this file (diffusers' load_lora_weights fails on it too)",
            "use a version of this LoRA in the diffusers/PEFT layout (transformer.<layer>.lora_A.weight), or one "
            "trained on the attention projections only")


def _check_alphas(state_dict: dict, source: str) -> None:
    """A layer is scaled by alpha / rank. diffusers' kohya and mixture converters split that scale in a loop that
    never ends for alpha < 0 (a server must never hang on a file), and alpha 0 would silently zero the layer:
    both are refused before conversion."""
    keys = [k for k, v in state_dict.items() if k.endswith(".alpha") and v.numel() == 1]
    values = torch.cat([state_dict[k].reshape(1) for k in keys]).double().tolist() if keys else []  # one transfer
    bad = [(k, v) for k, v in zip(keys, values) if not (math.isfinite(v) and v > 0)]
    if bad:
        key, value = bad[0]
        raise AdapterFormatError(
            f"adapter {source}: {len(bad)} alpha values are not a finite number above 0 (e.g. {key} = {value:g}); "
            "a LoRA layer is scaled by alpha / rank",
            "the adapter is broken; re-export it with positive alphas (usually the rank), or use another checkpoint")


def _module_scalings(transformer_sd: dict, alphas: dict, metadata: dict, source: str) -> dict[str, float]:
    """alpha / r (or alpha / sqrt(r) with rsLoRA) per module, as diffusers' load_lora_adapter + PEFT compute it."""
    from diffusers.utils.peft_utils import _create_lora_config
    from peft.utils.other import get_pattern_key

    if alphas and metadata:  # two scalings that may disagree: diffusers' load_lora_adapter refuses them too
        raise AdapterFormatError(
            f"adapter {source} holds both a saved LoraConfig ({METADATA_KEY!r} metadata) and {len(alphas)} .alpha "
            f"keys (e.g. {min(alphas)}); diffusers refuses such a file ('Both network_alphas and metadata cannot "
            "be specified')",
            f"re-save the adapter with diffusers' save_lora_weights (metadata, no .alpha keys), or remove the "
            f"{METADATA_KEY!r} metadata to scale by the .alpha keys")

    rank = {f"^{k}": v.shape[1] for k, v in transformer_sd.items() if "lora_B" in k and v.ndim > 1}
    if not rank:  # e.g. a text-encoder-only adapter (A without B is refused by _layer_deltas)
        return {}
    empty = sorted(k for k, r in rank.items() if r == 0)
    if empty:  # alpha / 0 below; a rank-0 layer holds no LoRA
        raise AdapterFormatError(f"adapter {source}: {len(empty)} layers have rank 0 (e.g. {empty[0][1:]}: "
                                 f"shape {tuple(transformer_sd[empty[0][1:]].shape)})",
                                 "the adapter is broken; re-export it with a rank of 1 or more")
    prefix_alphas = {k[len(TRANSFORMER_PREFIX):]: v for k, v in alphas.items() if k.startswith(TRANSFORMER_PREFIX)}
    meta = {k[len(TRANSFORMER_PREFIX):]: v for k, v in metadata.items() if k.startswith(TRANSFORMER_PREFIX)}
    try:
        config = _create_lora_config(transformer_sd, prefix_alphas or None, meta or None, rank)
    except (TypeError, ValueError) as err:
        raise AdapterFormatError(f"the adapter's LoRA configuration (metadata/alphas) is invalid: {err}",
                                 "re-save the adapter with diffusers' save_lora_weights") from err
    scalings = {}
    for key in transformer_sd:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        given = alpha.item() if torch.is_tensor(alpha) else alpha
        try:
            alpha = float(given)
        except (TypeError, ValueError):
            alpha = math.nan
        if not math.isfinite(alpha):  # metadata is free text: "abc" or NaN would scale the layer by nothing
            raise AdapterFormatError(f"adapter {source}: layer {module} has LoRA alpha {given!r}, not a finite "
                                     "number (from its metadata or .alpha key)",
                                     "re-save the adapter with a numeric lora_alpha (usually the rank)")
        scalings[module] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    return scalings


def _layer_deltas(transformer_sd: dict, scalings: dict[str, float], source: str) -> dict[str, LayerDelta]:
    for have, lack in (("lora_B", "lora_A"), ("lora_A", "lora_B")):
        orphans = sorted(k for k in transformer_sd
                         if k.endswith(f".{have}.weight") and k.replace(f".{have}.", f".{lack}.") not in transformer_sd)
        if orphans:
            raise AdapterFormatError(f"adapter {source}: {len(orphans)} layers have {have} but no {lack} "
                                     f"(e.g. {orphans[0]})", "the file is incomplete; download it again")
    layers = {}
    magnitudes = max_magnitudes(transformer_sd)  # for the product bound, in one reduction
    for module, scaling in scalings.items():
        b_key = f"{module}.lora_B.weight"
        a, b = transformer_sd[f"{module}.lora_A.weight"], transformer_sd[b_key]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterFormatError(
                f"adapter {source}: layer {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                "not [r, in] x [out, r]",
                "only linear-layer LoRA factors with matching ranks are supported")
        _check_product_fits(module, magnitudes.get(f"{module}.lora_A.weight", 0.0),
                            magnitudes.get(b_key, 0.0) * abs(scaling), a.shape[0], source)
        if scaling != 1.0:  # scaled in float32, rounded once; fp16 stays float32 (its range is small)
            b = (b.float() * scaling).to(torch.float32 if b.dtype == torch.float16 else b.dtype)
        # The file's dtype is kept: the adapter cache converts once, to the slot dtype on the device.
        layers[module] = LayerDelta(*(t if t.is_contiguous() else t.contiguous() for t in (a, b)))
    return layers


# |B @ A| <= max|B| * max|A| * rank; beyond this bound the product (times a LoRA scale up to 100 and an
# activation) overflows float32/bfloat16 (max 3.4e38) and the output is NaN, so such values are refused.
MAX_DELTA_MAGNITUDE = 1e30


def _check_product_fits(module: str, a_max: float, b_max: float, rank: int, source: str) -> None:
    bound = a_max * b_max * rank
    if not bound <= MAX_DELTA_MAGNITUDE:
        raise AdapterFileError(
            f"adapter {source}: layer {module} has values up to |A| {a_max:.3g} and |B| {b_max:.3g} (scaled); "
            f"their product (up to {bound:.3g}) overflows the model's dtype",
            "the adapter is broken (a diverged or mis-scaled export); use another checkpoint")


def parse_state_dict(state_dict: dict, *, name: str, source: str, metadata: dict | None = None) -> Adapter:
    """Parse an in-memory LoRA state dict (any layout diffusers understands)."""
    metadata = metadata or {}
    state_dict = upcast_float8(state_dict)
    check_float_dtypes(state_dict, source)
    _check_alphas(state_dict, source)
    check_finite(state_dict, source)
    findings = scan(state_dict)
    if findings.refused:
        raise AdapterFormatError(
            f"adapter {source} holds parts a LoRA slot cannot represent ({findings.refusal_text()})", _FIX_PLAIN)
    notes = list(findings.notes)
    dropped = set(findings.dropped)
    state_dict = {k: v for k, v in state_dict.items() if k not in dropped}

    conversion = convert(state_dict, source)
    transformer_sd, text_encoder, unapplied_alphas, incompatible = _split(conversion.state_dict)
    if incompatible:
        raise AdapterFormatError(
            f"adapter {source} holds parts a LoRA slot cannot represent (after diffusers' conversion: "
            f"{len(incompatible)} keys, e.g. {sorted(incompatible)[:3]})", _FIX_PLAIN)
    _check_leaf_layers(transformer_sd, conversion, source)
    notes += dropped_notes(conversion, state_dict)
    if unapplied_alphas:
        notes.append(f"{len(unapplied_alphas)} alpha keys not applied, e.g. {min(unapplied_alphas)}: a file with "
                     "lora_down/lora_up keys goes through diffusers' kohya converter, which keeps the transformer. "
                     "factors unscaled and these alphas unused, so diffusers' load_lora_weights loads B @ A (scale 1); "
                     "the same here, to match it")
    scalings = _module_scalings(transformer_sd, conversion.alphas, metadata, source)
    layers = _layer_deltas(transformer_sd, scalings, source)
    if not layers and not text_encoder:
        raise _nothing_loads(state_dict, source)
    text_alphas = {k: v for k, v in conversion.alphas.items() if k.startswith(TEXT_ENCODER_PREFIX)}
    return Adapter(name=name, source=source, layers=layers, text_encoder=text_encoder,
                   text_encoder_alphas=text_alphas, metadata=metadata, notes=notes)


# kohya/ComfyUI module names with PEFT factor names: diffusers' converters read those module names only with
# lora_down/lora_up, and its PEFT loader reads lora_A/lora_B only under transformer.<diffusers name>
_MIXED_NAMING = re.compile(r"^(diffusion_model\.|lora_unet_).*\.lora_[AB]\.weight$")


def _nothing_loads(state_dict: dict, source: str) -> AdapterFormatError:
    mixed = sorted(k for k in state_dict if _MIXED_NAMING.match(k))
    if mixed:
        return AdapterFormatError(
            f"adapter {source} names its modules as kohya/ComfyUI files do but its factors as PEFT does "
            f"({len(mixed)} keys like {mixed[0]}): diffusers reads lora_unet_…/diffusion_model.… module names only "
            "with .lora_down.weight/.lora_up.weight factors, and lora_A/lora_B only under transformer.<diffusers "
            "layer name>, so no layer of it loads (diffusers' load_lora_weights loads nothing from it, silently)",
            "rename its factors to .lora_down.weight/.lora_up.weight (the convention of its module names), or "
            "re-export it from its trainer in the kohya or diffusers (PEFT) layout")
    return AdapterFormatError(f"adapter {source} holds no Flux LoRA layers (keys like {sorted(state_dict)[:3]})",
                              "check that this is a Flux.1 LoRA (not SD/SDXL or another model's)")


def _compact(tensors: list[torch.Tensor], dtype) -> list[torch.Tensor]:
    """Copies of `tensors` in `dtype`, each in its own memory (the file's buffer can be freed). Same-dtype
    tensors are copied by one multi-tensor op (x * 1.0 is exact: values are checked finite first)."""
    if all(t.dtype == (dtype or t.dtype) for t in tensors):
        return list(torch._foreach_mul(tensors, 1.0)) if tensors else []
    return [t.to(dtype, copy=True) for t in tensors]


def parse_adapter(source: str | Path | AdapterSource, *, weight_name: str | None = None,
                  revision: str | None = None, name: str | None = None, device=None, dtype=None) -> Adapter:
    """Parse a LoRA from a local file/folder or the Hub (`owner/repo/file.safetensors`, or `repo_id` +
    `weight_name`).

    With `device` the file goes there first and is checked and parsed there (`read_safetensors`); the
    factors come back as compact copies in `dtype` (the file's bytes are freed) and the CLIP parts on
    the host. Otherwise the factors are views of the file's bytes in host memory.

    The adapter records its provenance (`Adapter.provenance()`): the sha256 of the bytes parsed and, for a
    Hub file, the revision asked for and the commit hash it resolved to.
    """
    where = adapter_source(source, weight_name=weight_name, revision=revision)
    path, commit_hash = resolve_file(where)
    name = name or path.stem
    if device is not None:
        try:
            return _parse_on(device, dtype, path, name, where, commit_hash)
        except (AdapterFormatError, torch.OutOfMemoryError):
            # diffusers' converters are written for host tensors: one that cannot run on `device`
            # surfaces as a conversion error; and the device parse briefly needs the file's size
            # twice there, which a full small card may not have. The host parse below is the
            # reference (and gives the real error for a file that is broken).
            pass
    tensors, metadata, digest = read_safetensors(path)
    adapter = dataclasses.replace(parse_state_dict(tensors, name=name, source=where.describe(), metadata=metadata),
                                  digest=digest, revision=where.revision, commit_hash=commit_hash)
    return adapter if device is None else adapter.to(device, dtype)


def _parse_on(device, dtype, path: Path, name: str, where: AdapterSource, commit_hash: str | None) -> Adapter:
    tensors, metadata, digest = read_safetensors(path, device=device)
    adapter = dataclasses.replace(parse_state_dict(tensors, name=name, source=where.describe(), metadata=metadata),
                                  digest=digest, revision=where.revision, commit_hash=commit_hash)
    factors = _compact([t for d in adapter.layers.values() for t in (d.A, d.B)], dtype)
    layers = {k: LayerDelta(a, b) for k, a, b in zip(adapter.layers, factors[0::2], factors[1::2])}
    host = {k: v.cpu() for k, v in adapter.text_encoder.items()}
    alphas = {k: v.cpu() for k, v in adapter.text_encoder_alphas.items()}
    return dataclasses.replace(adapter, layers=layers, text_encoder=host, text_encoder_alphas=alphas)
