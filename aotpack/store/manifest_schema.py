"""Schema of `manifest.json`, derived from the dataclasses in `manifest.py`, checked before any field is used.

Types come from the dataclass annotations (so a field added to `ProgramSpec` or `Manifest` is
checked without touching this file); the ranges and relations that annotations cannot say are
listed in `_check_values`. Every refusal is a `ManifestError` naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import PurePosixPath

from ..errors import ManifestError

# The newest manifest.json this aotpack reads; a reader refuses newer ones with the fix. Format 2 added
# `quantization.unquantized_linears`. A build writes the lowest format that expresses its package
# (`format_version_for`), so a package that uses nothing newer stays readable by older aotpacks, and an older aotpack
# refuses one that does ("install the aotpack version that built it") instead of misreading it: before format 2 a
# runtime would quantize the linears a format-2 package keeps in bf16 and then fail to bind them. Format 3: a recipe
# with `fp8_attention_min_tokens`, whose programs call `aotpack::bf16_sdpa`, an op older aotpacks do not register
# (they would load the package and fail at its first short sequence). Format 4: a recipe with `batched_modulation`,
# whose block programs take modulation rows where older runtimes would pass `temb`. Format 5: a recipe with
# `joined_qkv`, whose double-block programs read each stream's q/k/v weights joined, which older runtimes do not make
# (they would refuse the package only after reading the whole model, naming weights the user cannot fix). Format 6: a
# recipe with `lora_tails`, whose single-block programs read their q/k/v/MLP-in base weights as views of the tailed
# weights (row stride `in + 256`): a runtime that binds contiguous weights instead (older ones) would run the programs
# on misread rows, with no error. Format-5 `lora_tails` packages (its first form, a copy of the weights) bind
# contiguous ones, so this aotpack refuses them too (`_check_values`). Format 7: a recipe with `lora_tails_mlp_in`,
# whose double-block programs read each stream's MLP-in weight as such a view too (a format-6 runtime would bind it
# contiguous: misread rows again). Format 8 (2026-12-08): a recipe with `lora_down_fp8_dots`, whose programs take A's
# FP8 halves as inputs that only this runtime writes (an older one would fail at load on the input names), or with
# `lora_tails_paired`, whose single blocks' first reader of each pair reads its base weight after the tail (an older
# runtime would bind it before: misread rows).
FORMAT_VERSION = 8
TAILS_SHARED_FORMAT = 6
TAILS_MLP_IN_FORMAT = 7
A_HALVES_PAIRS_FORMAT = 8

# manifest fields naming an extra program file (absent in packages without it; verified by sha256 like the rest)
OPTIONAL_PROGRAM_FIELDS = ("merge_program", "merge_by_address_program")
_FIX = "rebuild the package with `aotpack build` (or pull it again); do not edit manifest.json by hand"
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Fields with a dataclass default that must still be present in a manifest file.
_REQUIRED_ANYWAY = {"files", "format_version"}
SHAPE_NAMES = ("batch", "image_tokens", "text_tokens")


def format_version_for(quantization: dict, recipe: dict | None = None) -> int:
    """The lowest manifest format that expresses a package with this `quantization` record and `recipe`."""
    if (recipe or {}).get("lora_down_fp8_dots") or (recipe or {}).get("lora_tails_paired"):
        return A_HALVES_PAIRS_FORMAT
    if (recipe or {}).get("lora_tails_mlp_in"):
        return TAILS_MLP_IN_FORMAT
    if (recipe or {}).get("lora_tails"):
        return TAILS_SHARED_FORMAT
    if (recipe or {}).get("joined_qkv"):
        return 5
    if (recipe or {}).get("batched_modulation"):
        return 4
    if (recipe or {}).get("fp8_attention_min_tokens"):
        return 3
    return 2 if quantization.get("unquantized_linears") else 1


def check_manifest_data(data, manifest_cls) -> None:
    """Refuse (ManifestError) anything `manifest_cls.from_json` could not use safely."""

    if not isinstance(data, dict):
        raise ManifestError(f"manifest.json holds a JSON {_json_type(data)}, not an object", _FIX)
    version = data.get("format_version")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise ManifestError(
            f"manifest format_version {version!r} is not supported by this aotpack (reads 1 to {FORMAT_VERSION})",
            "rebuild the package with this aotpack version, or install the aotpack version that built it "
            f"({_aotpack_version(data)})",
        )
    _check_dataclass(data, manifest_cls, "manifest", required_anyway=_REQUIRED_ANYWAY)
    _check_values(data)


def check_relative_name(name, what: str) -> None:
    """A plain relative POSIX path inside the package: no absolute path, `..`, `.`, backslash or empty part."""
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{what} {name!r} is not a file name", _FIX)
    parts = name.split("/")
    if (name.startswith("/") or "\\" in name or "\x00" in name or any(p in ("", ".", "..") for p in parts)
            or PurePosixPath(name).is_absolute() or re.match(r"[A-Za-z]:", name)):
        raise ManifestError(f"{what} {name!r} is not a plain relative path inside the package "
                            "(absolute, '..', '.', backslash or empty part)", _FIX)


# -- types, from the annotations ----------------------------------------------------------------------
def _check_dataclass(data, cls, where: str, required_anyway=frozenset()) -> None:
    if not isinstance(data, dict):
        raise ManifestError(f"{where} is a JSON {_json_type(data)}, expected an object with fields "
                            f"{[f.name for f in dataclasses.fields(cls)]}", _FIX)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ManifestError(f"{where} has unknown field {unknown[0]!r}" + (f" (and {unknown[1:]})" if unknown[1:] else "")
                            + f"; known fields: {sorted(fields)}", _FIX)
    required = {name for name, f in fields.items()
                if (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
                or name in required_anyway}
    missing = sorted(required - set(data))
    if missing:
        raise ManifestError(f"{where} lacks the field(s) {missing}", _FIX)
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        _check_type(value, hints[name], f"{where}.{name}")


def _check_type(value, hint, where: str) -> None:
    if hint is typing.Any:
        return
    if dataclasses.is_dataclass(hint):
        _check_dataclass(value, hint, where)
        return
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                _check_type(value, option, where)
                return
            except ManifestError as err:
                errors.append(err)
        raise errors[0]
    if hint is type(None):
        if value is not None:
            raise ManifestError(f"{where} is {value!r}, expected null", _FIX)
        return
    base = origin or hint
    if base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, base)
    if not ok:
        raise ManifestError(f"{where} is {_show(value)} (a JSON {_json_type(value)}), expected "
                            f"{_describe(hint)}", _FIX)
    if base is list and args:
        for i, item in enumerate(value):
            _check_type(item, args[0], f"{where}[{i}]")
    elif base is dict and len(args) == 2:
        for key, item in value.items():
            _check_type(item, args[1], f"{where}[{key!r}]")


# -- values the annotations cannot express -------------------------------------------------------------
def _check_values(data: dict) -> None:
    if data["max_rank"] < 0 or data["max_rank"] > 65536:
        raise ManifestError(f"manifest.max_rank is {data['max_rank']}, expected 0..65536", _FIX)
    for name, value in data["versions"].items():
        if value is not None and not isinstance(value, str):
            raise ManifestError(f"manifest.versions[{name!r}] is {_show(value)}, expected a version string", _FIX)
    if not isinstance(data["versions"].get("torch"), str):
        raise ManifestError("manifest.versions lacks the torch version it was built with", _FIX)
    if not isinstance(data["model"].get("fingerprint"), str) or not isinstance(data["model"].get("id"), str):
        raise ManifestError("manifest.model lacks its id or fingerprint (strings)", _FIX)
    if not isinstance(data["quantization"].get("method"), str):
        raise ManifestError("manifest.quantization lacks its method (a string)", _FIX)
    kept = data["quantization"].get("unquantized_linears", [])
    if not isinstance(kept, list) or not all(isinstance(pattern, str) for pattern in kept):
        raise ManifestError(f"manifest.quantization.unquantized_linears is {_show(kept)}, expected a list of "
                            "name patterns (strings)", _FIX)
    _check_shapes(data["shapes"])
    if (isinstance(data["recipe"], dict) and data["recipe"].get("lora_tails")
            and data["format_version"] < TAILS_SHARED_FORMAT):
        raise ManifestError(f"this lora_tails package (manifest format {data['format_version']}) was built by an "
                            "earlier aotpack whose tailed weights were a copy of the base weights; this runtime "
                            "shares their storage and would bind them at another row stride",
                            "rebuild the package with this aotpack (`aotpack build`)")
    slot_names = set()
    for i, slot in enumerate(data["slots"]):
        if slot["in_features"] < 1 or slot["out_features"] < 1:
            raise ManifestError(f"manifest.slots[{i}] ({slot['name']!r}) has features "
                                f"{slot['in_features']}x{slot['out_features']}, expected >= 1", _FIX)
        if slot["name"] in slot_names:
            raise ManifestError(f"manifest.slots lists {slot['name']!r} twice", _FIX)
        slot_names.add(slot["name"])
    for name, digest in data["files"].items():
        check_relative_name(name, "manifest.files name")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ManifestError(f"manifest.files[{name!r}] is {_show(digest)}, expected a sha256 (64 hex digits)", _FIX)
    for field in OPTIONAL_PROGRAM_FIELDS:
        program = data.get(field)
        if program is not None:
            check_relative_name(program, f"manifest.{field}")
            if program not in data["files"]:
                raise ManifestError(f"manifest.{field} {program!r} has no sha256 in manifest.files: it would "
                                    "load unverified code", _FIX)
    if not data["programs"]:
        raise ManifestError("manifest.programs is empty: the package has nothing to run", _FIX)
    names, files = set(), set()
    for i, program in enumerate(data["programs"]):
        where = f"manifest.programs[{i}]"
        check_relative_name(program["file"], f"{where}.file")
        if program["file"] not in data["files"]:
            raise ManifestError(f"{where}.file {program['file']!r} has no sha256 in manifest.files: it would load "
                                "unverified code", _FIX)
        if program["name"] in names or program["file"] in files:
            raise ManifestError(f"{where} ({program['name']!r}, {program['file']!r}) repeats another program's "
                                "name or file", _FIX)
        names.add(program["name"])
        files.add(program["file"])
        if not program["instances"]:
            raise ManifestError(f"{where}.instances is empty", _FIX)
        for j, instance in enumerate(program["instances"]):
            if instance is not None and not isinstance(instance, str):
                raise ManifestError(f"{where}.instances[{j}] is {_show(instance)}, expected a module path or null",
                                    _FIX)
        rank = program.get("rank")
        if isinstance(rank, int) and not 0 <= rank <= data["max_rank"]:
            raise ManifestError(f"{where}.rank is {rank}, expected 0..max_rank ({data['max_rank']}) or null", _FIX)
        for j, spec in enumerate(program["inputs"]):
            _check_input(spec, f"{where}.inputs[{j}]", data["shapes"])


def _check_shapes(shapes: dict) -> None:
    for name in SHAPE_NAMES:
        if name not in shapes:
            raise ManifestError(f"manifest.shapes lacks {name!r}", _FIX)
    for name, bounds in shapes.items():
        if not (isinstance(bounds, list) and len(bounds) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
                and 1 <= bounds[0] <= bounds[1]):
            raise ManifestError(f"manifest.shapes[{name!r}] is {_show(bounds)}, expected [lo, hi] with 1 <= lo <= hi",
                                _FIX)


def _check_input(spec, where: str, shapes: dict) -> None:
    import torch

    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("dtype"), str):
        raise ManifestError(f"{where} is {_show(spec)}, expected {{'name', 'dtype', 'shape'}}", _FIX)
    if not isinstance(getattr(torch, spec["dtype"], None), torch.dtype):
        raise ManifestError(f"{where}.dtype {spec['dtype']!r} is not a torch dtype", _FIX)
    shape = spec.get("shape")
    if not isinstance(shape, list):
        raise ManifestError(f"{where}.shape is {_show(shape)}, expected a list", _FIX)
    for dim in shape:
        ok = (isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0) or isinstance(dim, str)
        if not ok:
            raise ManifestError(f"{where}.shape has dimension {_show(dim)}, expected a size >= 0 or a symbol name",
                                _FIX)


# -- messages --------------------------------------------------------------------------------------------
def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(hint) -> str:
    return getattr(hint, "__name__", None) if typing.get_origin(hint) is None else str(hint).replace("typing.", "")


def _aotpack_version(data: dict) -> str:
    versions = data.get("versions")
    return versions.get("aotpack", "unknown") if isinstance(versions, dict) else "unknown"

