"""`manifest.json`: the one source of truth about a package (versioned like a config file)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from ..errors import ManifestError, PackageIntegrityError
from ..models.slots import SlotSpec
from .manifest_schema import OPTIONAL_PROGRAM_FIELDS, check_manifest_data, check_relative_name, format_version_for

MANIFEST_NAME = "manifest.json"


@dataclasses.dataclass
class ProgramSpec:
    """One compiled program (`.pt2`) and where the runtime uses it."""

    name: str  # "prologue", "double_block", ...
    kind: str
    file: str
    instances: list  # block module paths this program runs as, in order; [None] for prologue/epilogue/whole
    inputs: list[dict]  # [{"name", "dtype", "shape": [int | "batch" | "image_tokens" | ...]}]
    slots: list[str]  # slot names relative to the region, in the program's input order
    constants: list[str]  # constant (weight) names the runtime must bind
    attention_kernels: list[str] = dataclasses.field(default_factory=list)  # found in the generated code
    # 0: a no-slot variant (no LoRA inputs; the runtime runs it while no LoRA is live or a set is merged);
    # None: takes the slots at the manifest's max_rank (every program of packages built before variants)
    rank: int | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Manifest:
    target: str
    device: str
    gpu_arch: str
    versions: dict  # torch, cuda, triton, diffusers, aotpack, python
    model: dict  # {"id", "revision", "fingerprint", "config"}
    dtype: str
    lora_dtype: str
    quantization: dict
    attention: str
    max_rank: int
    slot_patterns: list[str]
    slots: list[SlotSpec]
    shapes: dict  # {"batch": [min, max], "image_tokens": [...], "text_tokens": [...]}
    layout: str
    programs: list[ProgramSpec]
    validation: dict
    build: dict
    inductor_configs: dict
    recipe: dict
    files: dict = dataclasses.field(default_factory=dict)  # relative path -> sha256
    format_version: int = 1  # as read; `to_json` writes at least what the package needs (`format_version_for`)
    merge_program: str | None = None  # FP8 packages: merge_layers.pt2 (earlier: merge_rows.pt2), the compiled merge
    # FP8 CUDA packages: merge_and_save_by_address.pt2, the in-place merge (earlier: merge_by_address.pt2)
    merge_by_address_program: str | None = None

    # -- serialisation ---------------------------------------------------------------------------
    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["slots"] = [s.to_json() for s in self.slots]
        data["programs"] = [p.to_json() for p in self.programs]
        for optional in OPTIONAL_PROGRAM_FIELDS:
            if data[optional] is None:  # absent rather than null: older runtimes read such packages
                del data[optional]
        # derived, not set by callers: a manifest never claims an older format than its fields need
        data.pop("format_version")
        return {"format_version": max(self.format_version, format_version_for(self.quantization, self.recipe)), **data}

    @classmethod
    def from_json(cls, data) -> Manifest:
        """A manifest checked against its schema (see `manifest_schema.py`) before any field is used."""

        check_manifest_data(data, cls)
        kwargs = dict(data)
        kwargs["slots"] = [SlotSpec(**s) for s in data["slots"]]
        kwargs["programs"] = [ProgramSpec(**p) for p in data["programs"]]
        return cls(**kwargs)

    def write(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")
        return path

    # -- queries -----------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.model["fingerprint"]

    def run_device(self, requested: str | None = None) -> str:
        """`requested`, or where the package runs by default: "cuda" for GPU packages, else "cpu"."""
        return requested or ("cuda" if self.device == "cuda" else "cpu")

    def program_files(self) -> list[str]:
        """Every compiled program file the package holds: its block programs and the extra ones it names."""
        extra = [getattr(self, field) for field in OPTIONAL_PROGRAM_FIELDS]
        return [p.file for p in self.programs] + [name for name in extra if name]

    def slot_table(self) -> dict[str, SlotSpec]:
        return {s.name: s for s in self.slots}

    def total_bytes(self, directory: Path) -> int:
        return sum((Path(directory) / name).stat().st_size for name in self.files)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: str | Path) -> Manifest:
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{directory} has no {MANIFEST_NAME}: it is not an aotpack package",
            "pass the directory written by `aotpack build` or `aotpack pull`",
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path} is not valid JSON ({err})", "pull or build the package again") from err
    except OSError as err:
        raise ManifestError(f"{path} cannot be read ({err.strerror})", "check its permissions, or pull or build "
                            "the package again") from err
    return Manifest.from_json(data)


def verify_files(directory: str | Path, manifest: Manifest) -> None:
    """The package holds exactly what the manifest lists, every file matches its sha256, and every
    program's own metadata agrees with the manifest (checked before anything loads)."""
    from .program_metadata import check_program_metadata

    directory = Path(directory)
    check_listed_files(directory, manifest)
    for name, expected in manifest.files.items():
        path = confined_path(directory, name)
        if not path.is_file():
            raise PackageIntegrityError(f"package file {path} is missing", "pull or build the package again")
        actual = sha256_file(path)
        if actual != expected:
            raise PackageIntegrityError(
                f"package file {path} has sha256 {actual[:16]}..., the manifest records {expected[:16]}... "
                "(truncated, corrupted or tampered with)",
                "delete the package directory and pull or build it again",
            )
    for spec in manifest.programs:
        check_program_metadata(confined_path(directory, spec.file), spec, manifest)


def check_listed_files(directory: Path, manifest: Manifest) -> None:
    """Every file in the package directory (besides the manifest) has a sha256 in the manifest: an
    unlisted file is unverified, so a package holding one is refused rather than half-trusted."""

    listed = set(manifest.files) | {MANIFEST_NAME}
    unlisted = [name for name in files_of_package(directory) if name not in listed]
    if unlisted:
        raise PackageIntegrityError(
            f"{directory} holds files the manifest has no sha256 for: {unlisted[:8]}"
            + (f" and {len(unlisted) - 8} more" if len(unlisted) > 8 else ""),
            "remove them (a package directory holds only what `aotpack build` wrote), or pull or build the "
            "package again")


def confined_path(directory: Path, name: str) -> Path:
    """`directory / name` for a manifest file name, refusing one that resolves outside the directory."""

    check_relative_name(name, "a package file name")
    path = directory / name
    root = directory.resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents and not _hub_cache_blob(root, resolved):
        raise PackageIntegrityError(f"package file {name!r} is a link to {resolved}, outside the package {directory}",
                                    "pull or build the package again; a package never links outside itself")
    return path


def _hub_cache_blob(root: Path, resolved: Path) -> bool:
    """True for the Hugging Face cache's own links: `<repo>/snapshots/<commit>/...` -> `<repo>/blobs/<etag>`."""
    for ancestor in root.parents:
        if ancestor.name == "snapshots":
            return resolved.parent == ancestor.parent / "blobs"
    return False


def recorded_model(manifest: Manifest) -> tuple[str, str | None]:
    """(model reference, revision) recorded in a package's manifest, in the form `--model` takes: the
    default model of `aotpack run` and `aotpack.load` (a package is bound to the weights it was built for)."""
    from ..models import tiny

    model_id, revision = manifest.model.get("id"), manifest.model.get("revision")
    if model_id == tiny.TINY_MODEL_ID:
        return "tiny", None
    if isinstance(model_id, str) and model_id.startswith("random:"):
        return model_id, None
    return model_id, revision


def is_package_dir(path: Path) -> bool:
    """A directory aotpack wrote: it holds a manifest.json that parses as a JSON object with a target."""
    try:
        data = json.loads((Path(path) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "format_version" in data and "target" in data


def enclosing_package(path: Path, *, outermost: bool = False) -> Path | None:
    """The package folder that is `path` or holds it (resolved), nearest first, or the outermost one (an older
    repo's `<target>/` package holds `torch-X.Y/` packages); None outside any package. Build and pull ask this
    before writing: a file added inside a package makes it fail verification."""
    path = Path(path).resolve()
    found = None
    for folder in (path, *path.parents):
        if is_package_dir(folder):
            if not outermost:
                return folder
            found = folder
    return found


def files_of_package(folder: Path) -> list[str]:
    """Relative paths of the files under `folder`, leaving out nested packages (an older repo's
    `<target>/` package folder holds the `<target>/torch-<X.Y>/` folders of later pushes)."""
    import os

    found = []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not (here / d / MANIFEST_NAME).is_file())
        found += [(here / f).relative_to(folder).as_posix() for f in files]
        found += [(here / d).relative_to(folder).as_posix() for d in dirs if (here / d).is_symlink()]
    return sorted(found)
