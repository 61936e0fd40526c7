"""Checking a generation request before any work: one validator for `run` flags, jobs lines, the Python
API and the HTTP server. Every refusal is a `RequestError` naming the field, the value and the fix.

Ranges (docs/reliability.md lists them with their tests):
- LoRA scale: finite, |scale| <= 100 (beyond that a LoRA only produces saturated noise).
- guidance: finite, 0 <= guidance <= 100.
- steps: integer, 1 <= steps <= 1000.  seed: integer, 0 <= seed < 2**63 (torch.Generator's range).
- height/width: rounded down to a multiple of 16 as diffusers' FluxPipeline does (vae_scale_factor * 2);
  the rounded size is the one reported; the image tokens (h/16 * w/16) must lie in the package's range.
- max_sequence_length: integer within the package's text-token range and <= 512 (T5's limit in Flux).
- output paths: an image extension (.png/.jpg/.jpeg/.webp), not a directory, a parent that can be created.
- prompt: a string that is valid Unicode (no lone surrogates: the tokenizers refuse them mid-batch), at most
  MAX_PROMPT_CHARS characters (CLIP reads 77 tokens and T5 512; a 1 MB prompt held a server's model thread 10 s).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from pathlib import Path

from ..errors import RequestError

MAX_LORA_SCALE = 100.0
GUIDANCE_RANGE = (0.0, 100.0)
STEPS_RANGE = (1, 1000)
SEED_RANGE = (0, 2**63 - 1)
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline refuses more (T5 was trained to 512)
SIZE_MULTIPLE = 16  # FluxPipeline: vae_scale_factor (8) * 2 (2x2 latent patches)
MAX_PROMPT_CHARS = 20_000  # ~10x what T5's 512 tokens can read; longer text is only work for the tokenizers
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
LATENT_SUFFIXES = (".safetensors",)


@dataclasses.dataclass(frozen=True)
class PackageLimits:
    """What a package's compiled programs accept (the manifest's dynamic shapes)."""

    image_tokens: tuple[int, int] = (1, 2**31)
    text_tokens: tuple[int, int] = (1, MAX_SEQUENCE_LENGTH)
    size_multiple: int = SIZE_MULTIPLE

    @classmethod
    def from_manifest(cls, manifest) -> PackageLimits:
        shapes = manifest.shapes
        return cls(image_tokens=tuple(shapes["image_tokens"]), text_tokens=tuple(shapes["text_tokens"]))


ANY_PACKAGE = PackageLimits()  # only the general limits (no package's shapes known)


def _where(where: str, field: str) -> str:
    return f"{where}: {field}" if where else field


def check_number(value, field: str, low: float, high: float, where: str = "") -> float:
    """A finite real number in [low, high] (bools and strings are refused, not converted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{_where(where, field)} = {value!r} is not a number",
                           f"give {field} as a number between {low:g} and {high:g}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        number = math.inf
    if not math.isfinite(number):
        raise RequestError(f"{_where(where, field)} = {value!r} is not finite",
                           f"give {field} as a finite number between {low:g} and {high:g}")
    if not low <= number <= high:
        raise RequestError(f"{_where(where, field)} = {value!r} is outside [{low:g}, {high:g}]",
                           f"give {field} between {low:g} and {high:g}")
    return number


def check_int(value, field: str, low: int, high: int, where: str = "") -> int:
    """An integer in [low, high]; a float with an integral value (2.0) is accepted, 2.5 is not."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{_where(where, field)} = {value!r} is not an integer",
                           f"give {field} as an integer between {low} and {high}")
    if not low <= value <= high:
        raise RequestError(f"{_where(where, field)} = {value!r} is outside [{low}, {high}]",
                           f"give {field} between {low} and {high}")
    return value


def check_scale(value, where: str = "", name: str = "") -> float:
    """A LoRA scale as a float. numpy scalars (`np.float32(0.8)`, `np.int64(1)`) and one-element real tensors are
    numbers, as diffusers and PEFT take them (`float(w)`); bools and strings are not."""
    field = f"LoRA scale of {name}" if name else "LoRA scale"
    if _is_scalar_tensor(value):
        value = value.item()
    elif isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
        value = float(value)
    return check_number(value, field, -MAX_LORA_SCALE, MAX_LORA_SCALE, where)


def _is_scalar_tensor(value) -> bool:
    import torch

    return torch.is_tensor(value) and value.numel() == 1 and not value.dtype.is_complex and value.dtype != torch.bool


def _is_adapter_object(value) -> bool:
    return hasattr(value, "layers") or hasattr(value, "weight_name")  # a parsed Adapter or an AdapterSource


def _shown(value) -> str:
    return f"Adapter {value.name!r}" if hasattr(value, "layers") else repr(value)[:200]  # an Adapter's repr is huge


def check_loras(loras, where: str = "", example: str = '[["style.safetensors", 0.8]]') -> list[tuple[object, float]]:
    """`[(source, scale), ...]` from any iterable of sources or (source, scale) pairs; a dict (its scales would be
    lost), a bare path (read as one adapter per character) or a lone adapter is refused, as is an entry that is not
    a pair, a source that is not a path / Hub file / Adapter / AdapterSource, and an empty path. `example`: the
    caller's form of a valid value, for the fixes (JSON lines, `set_loras`)."""
    if isinstance(loras, (str, bytes, os.PathLike, dict)) or _is_adapter_object(loras) \
            or not hasattr(loras, "__iter__"):
        fix = (f"give a list of (adapter, scale) pairs, e.g. {example} (a dict: list(loras.items()))"
               if isinstance(loras, dict) else f"give a list, e.g. {example}")
        raise RequestError(f"{_where(where, 'loras')} = {_shown(loras)} is a {type(loras).__name__}, not a list", fix)
    checked = []
    for entry in loras:
        if isinstance(entry, (list, tuple)):
            if len(entry) != 2:
                raise RequestError(f"{_where(where, 'loras')}: entry {_shown(entry)} has {len(entry)} items, not "
                                   "(adapter, scale)", f"give each entry as an adapter or an (adapter, scale) pair, "
                                                       f"e.g. {example}")
            source, scale = entry
        else:
            source, scale = entry, 1.0
        if not isinstance(source, (str, os.PathLike)) and not _is_adapter_object(source):
            raise RequestError(f"{_where(where, 'loras')}: entry {_shown(entry)} is not a path, a Hub file, an "
                               "AdapterSource or an Adapter", f"give e.g. {example}")
        if isinstance(source, (str, os.PathLike)) and not os.fspath(source).strip():  # "" would read the folder "."
            raise RequestError(f"{_where(where, 'loras')}: entry {_shown(entry)} has an empty path",
                               "give the LoRA file's path, e.g. style.safetensors:0.8")
        checked.append((source, check_scale(scale, where, source.name if hasattr(source, "layers") else str(source))))
    return checked


def produced_size(height: int, width: int, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """The (height, width) FluxPipeline produces: each rounded down to a multiple of `multiple`."""
    return height // multiple * multiple, width // multiple * multiple


def check_size(height, width, limits: PackageLimits = ANY_PACKAGE, where: str = "") -> tuple[int, int, list[str]]:
    """(height, width, notes): the produced size, or a refusal that names the nearest valid one."""
    height = check_int(height, "height", 1, 2**16, where)
    width = check_int(width, "width", 1, 2**16, where)
    multiple = limits.size_multiple
    produced_h, produced_w = produced_size(height, width, multiple)
    low, high = limits.image_tokens
    tokens = (produced_h // multiple) * (produced_w // multiple)
    if not low <= tokens <= high:
        ratio = math.sqrt((low if tokens < low else high) / max(tokens, 1))
        # Grow (or shrink) both sides by the same ratio, rounded away from the violated bound.
        rounding = math.ceil if tokens < low else math.floor
        epsilon = -1e-9 if tokens < low else 1e-9  # 1040 * sqrt(4096/4225) is 1024, not 1023.99...
        nearest = [max(multiple, rounding(max(side, multiple) * ratio / multiple + epsilon) * multiple)
                   for side in (produced_h, produced_w)]
        raise RequestError(
            f"{_where(where, 'size')} {width}x{height} (width x height) makes {tokens} image tokens at "
            f"{produced_w}x{produced_h}; this package accepts {low}..{high}",
            f"use e.g. {nearest[1]}x{nearest[0]} (multiples of {multiple}), or build a package whose "
            "shapes.image_tokens covers this size")
    notes = []
    if (produced_h, produced_w) != (height, width):
        notes.append(f"size {width}x{height} is produced as {produced_w}x{produced_h} (FluxPipeline rounds down "
                     f"to multiples of {multiple})")
    return produced_h, produced_w, notes


def check_sequence_length(value, limits: PackageLimits = ANY_PACKAGE, where: str = "") -> int:
    low, high = limits.text_tokens
    return check_int(value, "max_sequence_length", low, min(high, MAX_SEQUENCE_LENGTH), where)


def check_output_path(path, field: str = "out", suffixes=IMAGE_SUFFIXES, where: str = "") -> str:
    """`path` can be written: the right extension, not a directory, its parent a directory (or creatable)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path) or "\0" in str(path) \
            or str(path).endswith(("/", os.sep)):  # "out.png/" names a folder (pathlib drops the slash)
        raise RequestError(f"{_where(where, field)} = {path!r} is not a file path",
                           f"give a file path ending in {' or '.join(suffixes)}")
    target = Path(path).expanduser()
    if target.suffix.lower() not in suffixes:
        raise RequestError(f"{_where(where, field)} = {str(path)!r} does not end in {' or '.join(suffixes)}",
                           f"name the file e.g. {target.with_suffix(suffixes[0]).name}")
    if target.is_dir():
        raise RequestError(f"{_where(where, field)} = {str(path)!r} is a directory", "name a file inside it")
    parent = target.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise RequestError(f"{_where(where, field)} = {str(path)!r}: {parent} is not a writable directory",
                           "write the output somewhere you can create files")
    return str(path)


def check_prompt(prompt, where: str = "") -> str:
    """A string the tokenizers take: valid Unicode, at most MAX_PROMPT_CHARS characters."""
    if not isinstance(prompt, str):
        raise RequestError(f"{_where(where, 'prompt')} = {prompt!r} is not a string", 'give "prompt": "..."')
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(f"{_where(where, 'prompt')} has an invalid character at position {err.start} "
                           f"({prompt[err.start:err.end]!r}, a lone surrogate)",
                           "send the prompt as valid UTF-8 (a JSON \\ud83d... escape must come in its pair)") from None
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"{_where(where, 'prompt')} has {len(prompt)} characters, more than {MAX_PROMPT_CHARS}",
                           f"shorten it (CLIP reads 77 tokens and T5 at most {MAX_SEQUENCE_LENGTH})")
    return prompt


def validate_request(request, limits: PackageLimits = ANY_PACKAGE, where: str = ""):
    """A checked copy of `request` (a `jobs.Request`): numbers in range, the size as produced (noted in
    `request.notes` when rounded), output paths writable."""
    check_prompt(request.prompt, where)
    height, width, notes = check_size(request.height, request.width, limits, where)
    checked = dataclasses.replace(
        request,
        loras=check_loras(request.loras, where),
        seed=check_int(request.seed, "seed", *SEED_RANGE, where),
        steps=check_int(request.steps, "steps", *STEPS_RANGE, where),
        height=height, width=width,
        guidance=check_number(request.guidance, "guidance", *GUIDANCE_RANGE, where),
        max_sequence_length=check_sequence_length(request.max_sequence_length, limits, where),
        out=check_output_path(request.out, "out", IMAGE_SUFFIXES, where) if request.out is not None else None,
        save_latents=(check_output_path(request.save_latents, "save_latents", LATENT_SUFFIXES, where)
                      if request.save_latents is not None else None),
        notes=list(request.notes) + notes,
    )
    if checked.fit not in (None, "svd"):
        raise RequestError(f"{_where(where, 'fit')} = {checked.fit!r} is not 'svd'", 'leave it out or give "svd"')
    if checked.merge is not None and not isinstance(checked.merge, bool):
        raise RequestError(f"{_where(where, 'merge')} = {checked.merge!r} is not true, false or null",
                           'give "merge": true (fold in now), false (keep in slots), or leave it out')
    return checked
