"""`aotpack.json` inside each `.pt2`: what the program was compiled for, covered by its sha256.

The manifest is the index; the archive is the truth. `max_rank`, the slot table (names and
in/out features, in input order), the activation inputs and the dynamic shape ranges (batch,
image_tokens, text_tokens) are written into the archive at build time, so an edited manifest (a
larger `max_rank`, a reordered slot list, a wider `image_tokens`) is refused at load instead of
feeding the program tensors of the wrong shape (NaN or wrong output with exit 0, or a size the
compiled code never allowed for).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path, PurePosixPath

from ..errors import PackageIntegrityError, PackageMismatchError

METADATA_NAME = "aotpack.json"
METADATA_FORMAT = 1


def _slot_prefix(kind: str, instance) -> str:
    from ..models.regions import instance_slot_prefix

    return instance_slot_prefix(kind, instance)


def program_metadata(spec, manifest_max_rank: int, slot_table: dict, shapes: dict) -> dict:
    """The record written into a program: derived from the build's own spec, before the manifest is written.
    `shapes`: the package's ranges the program was exported from (split programs take a shard of them)."""
    prefix = _slot_prefix(spec.kind, spec.instances[0])
    return {
        "format": METADATA_FORMAT,
        "kind": spec.kind,
        "max_rank": manifest_max_rank if spec.slots else 0,  # the rank of its LoRA inputs (none: 0)
        "slots": [{"name": name, "in_features": slot_table[prefix + name].in_features,
                   "out_features": slot_table[prefix + name].out_features} for name in spec.slots],
        "inputs": spec.inputs,
        # added within format 1: records without it (older builds) skip the check, older readers ignore it
        "shapes": _plain_shapes(shapes),
    }


def _plain_shapes(shapes: dict) -> dict:
    return {name: [int(low), int(high)] for name, (low, high) in sorted(shapes.items())}


def _archive_root(archive: zipfile.ZipFile) -> str:
    roots = {PurePosixPath(name).parts[0] for name in archive.namelist() if PurePosixPath(name).parts}
    return next(iter(roots)) if len(roots) == 1 else ""


def stamp_program(path: Path, spec, max_rank: int, slot_table: dict, shapes: dict) -> None:
    """Add `<root>/aotpack.json` to the program archive at `path` (before its sha256 is taken)."""
    record = program_metadata(spec, max_rank, slot_table, shapes)
    with zipfile.ZipFile(path, "a") as archive:
        root = _archive_root(archive)
        archive.writestr(f"{root}/{METADATA_NAME}" if root else METADATA_NAME, json.dumps(record, indent=1))


def read_program_metadata(path: Path) -> dict | None:
    """The record in the program archive, or None for a package built before records existed."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if PurePosixPath(n).name == METADATA_NAME
                     and len(PurePosixPath(n).parts) <= 2]
            if not names:
                return None
            return json.loads(archive.read(names[0]))
    except zipfile.BadZipFile as err:
        raise PackageIntegrityError(f"program {path} is not a .pt2 archive (not a zip file: {err})",
                                    "pull or build the package again") from err
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError) as err:
        raise PackageIntegrityError(f"program {path} holds an unreadable {METADATA_NAME} ({err})",
                                    "pull or build the package again") from err


def check_program_metadata(path: Path, spec, manifest) -> None:
    """The manifest's max_rank, slot table, inputs and shape ranges for this program match what it was compiled
    for."""
    record = read_program_metadata(path)
    if record is None:  # built before records existed: only the sha256 covers it (docs/reliability.md)
        return
    fix = "rebuild the package, or pull it again; do not edit manifest.json by hand"
    if not isinstance(record, dict) or record.get("format") != METADATA_FORMAT:
        raise PackageMismatchError(f"program {path.name} has a {METADATA_NAME} of an unknown format",
                                   "load it with the aotpack version that built it, or rebuild the package")
    expected_rank = manifest.max_rank if spec.slots else 0
    if record.get("max_rank") != expected_rank:
        raise PackageMismatchError(f"manifest max_rank is {manifest.max_rank}, but {path.name} was compiled for "
                                   f"max_rank {record.get('max_rank')}", fix)
    if record.get("inputs") != spec.inputs:
        raise PackageMismatchError(f"manifest inputs of {spec.kind} differ from those {path.name} was compiled for",
                                   fix)
    compiled_shapes = record.get("shapes")
    if compiled_shapes is not None:  # absent: built before shapes were recorded (sha256 only, as above)
        _check_shapes(path, manifest.shapes, compiled_shapes, fix)
    table = manifest.slot_table()
    compiled = record.get("slots") or []
    if [s.get("name") for s in compiled] != list(spec.slots):
        raise PackageMismatchError(f"manifest slots of {spec.kind} ({len(spec.slots)}) differ from the slots "
                                   f"{path.name} was compiled with ({len(compiled)}), in names or order", fix)
    for instance in spec.instances:
        prefix = _slot_prefix(spec.kind, instance)
        for slot in compiled:
            entry = table.get(prefix + slot["name"])
            if entry is None or (entry.in_features, entry.out_features) != (slot["in_features"],
                                                                             slot["out_features"]):
                have = "no such slot" if entry is None else f"{entry.in_features}x{entry.out_features}"
                raise PackageMismatchError(
                    f"manifest slot {prefix + slot['name']!r} ({have}) differs from {path.name}'s compiled "
                    f"{slot['in_features']}x{slot['out_features']}", fix)


def _check_shapes(path: Path, shapes: dict, compiled, fix: str) -> None:
    """A range the programs were not exported for (a wider `image_tokens`, say) would reach a compiled call
    that fails obscurely or computes garbage; a narrower one is an edit as well."""
    if not isinstance(compiled, dict):
        raise PackageIntegrityError(f"program {path} holds a {METADATA_NAME} whose shapes are {compiled!r}",
                                    "pull or build the package again")
    declared = _plain_shapes(shapes)  # the manifest schema checked it: names -> [lo, hi] integers
    for name in sorted(set(declared) | set(compiled)):
        have, built = declared.get(name), compiled.get(name)
        if have != built:
            raise PackageMismatchError(f"manifest shapes.{name} is {have}, but {path.name} was compiled for "
                                       f"{name} {built}", fix)
