"""What a package repo (Hub repo or file store) holds, and the index of its targets.

    aotpack_index.json                  folders -> target, torch series, gpu_arch, versions, model,
                                        files (sha256), dates
    README.md                           model card (see `model_card.py`)
    <target>/torch-<X.Y>/manifest.json  one folder per target and torch series (a package only loads
    <target>/torch-<X.Y>/*.pt2          with the torch series that built it), so pushing for a new
                                        torch release never replaces the packages of the previous one

Repos written before the torch series was part of the layout hold `<target>/manifest.json`
(index key `<target>`); they still load.

The index lets a puller pick a folder and name the alternatives without listing the repo; it
records the manifest's own sha256 too, so a swapped or half-written manifest is caught as well.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from pathlib import Path

from ..errors import ManifestError, PublishError
from .manifest import MANIFEST_NAME, Manifest, sha256_file
from .manifest_schema import check_relative_name

INDEX_NAME = "aotpack_index.json"
CARD_NAME = "README.md"
INDEX_FORMAT = 1
_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SERIES_FOLDER = re.compile(r"torch-[0-9]+\.[0-9]+")


@dataclasses.dataclass
class PushPlan:
    """Everything one push writes: the target's files, the merged index and model card."""

    folder: str
    uploads: dict[str, Path]  # repo path ("h100/manifest.json") -> local file
    index_text: str
    card_text: str
    stale: list[str]  # repo paths the previous push of this target had and this one lacks


@dataclasses.dataclass
class PushResult:
    target: str
    url: str  # web URL of the target folder (Hub), or its file:// URL (file store)
    pr_url: str | None = None
    commit: str | None = None
    relisted: list[str] | None = None  # file store: folders the index was written from (it was missing or repaired)


class DamagedIndexError(PublishError):
    """An index that cannot be read as aotpack's (not one of a newer format: that one is never rewritten)."""


def target_folder(target: str) -> str:
    """The repo folder of a target: its name, which must be one path segment."""
    if not _FOLDER_NAME.fullmatch(target):
        raise PublishError(f"target name {target!r} cannot name a folder in a package repo",
                           "rebuild with a recipe whose `name` uses only letters, digits, '.', '_' and '-'")
    return target


def package_folder(manifest: Manifest) -> str:
    """The repo folder of a package: `<target>/torch-<X.Y>`."""
    from ..machine.compat import torch_series

    return f"{target_folder(manifest.target)}/torch-{torch_series(manifest.versions['torch'])}"


def is_folder_name(name: str) -> bool:
    """An index key: `<target>` (older repos) or `<target>/torch-<X.Y>`; never a path outside the repo."""
    parts = name.split("/")
    return (1 <= len(parts) <= 2 and all(_FOLDER_NAME.fullmatch(p) for p in parts)
            and (len(parts) == 1 or bool(_SERIES_FOLDER.fullmatch(parts[1]))))


def entry_target(name: str, entry: dict) -> str:
    return entry.get("target") or name.split("/")[0]


def entry_series(entry: dict) -> str | None:
    from ..machine.compat import torch_series

    return torch_series(entry["torch"]) if isinstance(entry.get("torch"), str) else None


def package_files(manifest: Manifest) -> list[str]:
    """The files of a package, relative to its directory: the manifest and what it lists."""
    return [MANIFEST_NAME, *manifest.files]


def now_utc() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()


def index_entry(manifest: Manifest, package_dir: Path, pushed_at: str) -> dict:
    files = {MANIFEST_NAME: sha256_file(package_dir / MANIFEST_NAME), **manifest.files}
    from ..machine.compat import torch_series

    return {
        "folder": package_folder(manifest),
        "target": target_folder(manifest.target),
        "torch_series": torch_series(manifest.versions["torch"]),
        "device": manifest.device,
        "gpu_arch": manifest.gpu_arch,
        "torch": manifest.versions.get("torch"),
        "cuda": manifest.versions.get("cuda"),
        "aotpack": manifest.versions.get("aotpack"),
        "model": {k: manifest.model.get(k) for k in ("id", "revision", "fingerprint")},
        "dtype": manifest.dtype,
        "quantization": manifest.quantization.get("method"),
        "attention": manifest.attention,
        "max_rank": manifest.max_rank,
        "layout": manifest.layout,
        "files": files,
        "bytes": sum((package_dir / name).stat().st_size for name in files),
        "built": manifest.build.get("date"),
        "pushed": pushed_at,
    }


def empty_index() -> dict:
    return {"format_version": INDEX_FORMAT, "library": "aotpack", "targets": {}}


def parse_index(text: str | bytes | None, where: str) -> dict:
    """The index read from `where` (its text or bytes); an empty one when the repo has none yet (`text` None)."""
    if text is None:
        return empty_index()
    try:
        data = json.loads(text)
    except ValueError as err:  # not JSON, or bytes that are not UTF-8 text
        raise _damaged(where, f"it is not valid JSON ({err})") from err
    return check_index(data, where)


# What pull, push and the model card read from an index entry, and the JSON types each may hold (None: null).
_TEXT = (str, type(None))
_ENTRY_FIELDS = {"folder": (str,), "files": (dict,), "model": (dict,), "bytes": (int,), "max_rank": (int, type(None)),
                 **dict.fromkeys(("target", "torch_series", "device", "gpu_arch", "torch", "cuda", "aotpack", "dtype",
                                  "quantization", "attention", "layout", "built", "pushed"), _TEXT)}
_ENTRY_REQUIRED = ("folder", "files", "model")
_MODEL_FIELDS = dict.fromkeys(("id", "revision", "fingerprint"), _TEXT)


def check_index(data, where: str) -> dict:
    """`data`, once every field pull, push and the card use has its type and every name stays inside the repo:
    a damaged or hand-edited index is refused with the fix, never half-read."""
    if not isinstance(data, dict):
        raise _damaged(where, f"it holds {_shown(data)}, not an object")
    version = data.get("format_version")
    if type(version) is int and version > INDEX_FORMAT:
        raise PublishError(f"{where} has an {INDEX_NAME} of format {version}; this aotpack reads format {INDEX_FORMAT}",
                           "install the newer aotpack that pushed it")
    if type(version) is not int or version != INDEX_FORMAT:
        raise _damaged(where, f"format_version is {_shown(version)}, expected {INDEX_FORMAT}")
    if not isinstance(data.get("targets"), dict):
        raise _damaged(where, f"targets is {_shown(data.get('targets'))}, expected an object (folder -> entry)")
    for name, entry in data["targets"].items():
        at = f"targets[{name!r}]"
        if not is_folder_name(name):
            raise _damaged(where, f"{at} names a folder that is not <target> or <target>/torch-<X.Y>")
        _check_fields(entry, _ENTRY_FIELDS, at, where)
        missing = [field for field in _ENTRY_REQUIRED if field not in entry]
        if missing:
            raise _damaged(where, f"{at} has no {missing[0]!r}")
        _check_fields(entry["model"], _MODEL_FIELDS, f"{at}.model", where)
        for file_name, digest in entry["files"].items():
            try:  # the names a pull copies: never a path outside the target's folder
                check_relative_name(file_name, f"{at}.files name")
            except ManifestError as err:
                raise _damaged(where, err.problem) from err
            if not isinstance(digest, str):
                raise _damaged(where, f"{at}.files[{file_name!r}] is {_shown(digest)}, expected a sha256 string")
    return data


def _check_fields(record, types: dict, at: str, where: str) -> None:
    if not isinstance(record, dict):
        raise _damaged(where, f"{at} is {_shown(record)}, expected an object")
    for field, kinds in types.items():
        value = record.get(field)
        if field in record and not (isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))):
            expected = " or ".join({str: "a string", int: "an integer", dict: "an object"}.get(kind, "null")
                                   for kind in kinds)
            raise _damaged(where, f"{at}.{field} is {_shown(value)}, expected {expected}")


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _damaged(where: str, what: str) -> DamagedIndexError:
    # pushing merges with the index there, so a damaged one must be rewritten or removed first
    problem = f"the {INDEX_NAME} of {where} is damaged: {what}"
    if where.startswith("file://"):  # a file store holds its packages: the index can be listed from them again
        return DamagedIndexError(problem, f"rewrite it from the package folders in the store: aotpack push PACKAGE "
                                          f"{where} --repair-index (each folder is verified; the damaged file is kept "
                                          f"as {INDEX_NAME}.damaged-<time>); or delete {INDEX_NAME} from {where}, "
                                          "then push a package there (a push into a store without an index lists "
                                          "its package folders again)")
    return DamagedIndexError(problem, f"re-push: delete {INDEX_NAME} from {where}, then push each target's package "
                                      f"there again (aotpack push PACKAGE {where}), or restore its last good version "
                                      "from the repo's history")


def render_index(index: dict) -> str:
    return json.dumps(index, indent=2, sort_keys=True) + "\n"


def merge_index(index: dict, entry: dict) -> dict:
    """`index` with `entry` added or replacing the same target; the other targets are kept as they are."""
    targets = {**index.get("targets", {}), entry["folder"]: entry}
    return {**index, "format_version": INDEX_FORMAT, "library": "aotpack", "targets": dict(sorted(targets.items()))}


def describe_targets(index: dict) -> str:
    """`a100 (sm_80, torch 2.11.0), cpu (cpu, torch 2.13.0)` for error messages."""
    parts = [f"{entry_target(name, entry)} ({entry.get('gpu_arch') or entry.get('device')}, torch {entry.get('torch')})"
             for name, entry in sorted(index["targets"].items())]
    return ", ".join(parts) or "no targets"


def plan_push(package_dir: Path, manifest: Manifest, index: dict, card_text: str | None, store_ref: str,
              pushed_at: str | None = None) -> PushPlan:
    """What to write so the repo holds this package next to the targets already there."""
    from .model_card import render_model_card

    folder = package_folder(manifest)
    entry = index_entry(manifest, package_dir, pushed_at or now_utc())
    merged = merge_index(index, entry)
    previous = index.get("targets", {}).get(folder, {}).get("files", {})
    return PushPlan(
        folder=folder,
        uploads={f"{folder}/{name}": package_dir / name for name in entry["files"]},
        index_text=render_index(merged),
        card_text=render_model_card(merged, store_ref, card_text),
        stale=sorted(f"{folder}/{name}" for name in set(previous) - set(entry["files"])),
    )
