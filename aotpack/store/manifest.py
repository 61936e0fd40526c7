"""`manifest.json`: the one source of truth about a package (versioned like a config file)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from ..errors import ManifestError, PackageIntegrityError
from ..models.slots import SlotSpec

FORMAT_VERSION = 1
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
    format_version: int = FORMAT_VERSION

    # -- serialisation ---------------------------------------------------------------------------
    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["slots"] = [s.to_json() for s in self.slots]
        data["programs"] = [p.to_json() for p in self.programs]
        return {"format_version": data.pop("format_version"), **data}

    @classmethod
    def from_json(cls, data: dict) -> "Manifest":
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"manifest format_version {version!r} is not supported by this aotpack (reads {FORMAT_VERSION})",
                "rebuild the package with this aotpack version, or install the aotpack version that built it "
                f"({data.get('versions', {}).get('aotpack', 'unknown')})",
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(fields - set(data) - {"files"})
        if missing:
            raise ManifestError(f"manifest lacks the fields {missing}", "rebuild the package")
        kwargs = {k: v for k, v in data.items() if k in fields}
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
    return Manifest.from_json(data)


def verify_files(directory: str | Path, manifest: Manifest) -> None:
    """Every file the manifest lists exists and matches its sha256 (checked before anything loads)."""
    directory = Path(directory)
    for name, expected in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise PackageIntegrityError(f"package file {path} is missing", "pull or build the package again")
        actual = sha256_file(path)
        if actual != expected:
            raise PackageIntegrityError(
                f"package file {path} has sha256 {actual[:16]}..., the manifest records {expected[:16]}... "
                "(truncated, corrupted or tampered with)",
                "delete the package directory and pull or build it again",
            )
