"""The version ranges aotpack supports (from its package metadata, i.e. pyproject) vs what is installed."""

from __future__ import annotations

import dataclasses
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

_PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"  # aotpack/machine/ -> the repo root


def _declared_requirements() -> list[str]:
    """Requirement strings of aotpack, extras included (`torchao>=0.18; extra == "fp8"`)."""
    try:
        return metadata.requires("aotpack") or []
    except metadata.PackageNotFoundError:  # a source checkout on PYTHONPATH: read pyproject itself
        project = tomllib.loads(_PYPROJECT.read_text())["project"]
        extras = [f'{req}; extra == "{extra}"' for extra, reqs in project.get("optional-dependencies", {}).items()
                  for req in reqs]
        return list(project.get("dependencies", [])) + extras


def supported_python() -> SpecifierSet:
    """`requires-python` of aotpack."""
    try:
        text = metadata.metadata("aotpack")["Requires-Python"]
    except metadata.PackageNotFoundError:
        text = tomllib.loads(_PYPROJECT.read_text())["project"].get("requires-python")
    return SpecifierSet(text or "")


def supported_range(package: str) -> SpecifierSet:
    """The range aotpack declares for `package` (base dependencies first, then extras)."""
    wanted = package.lower().replace("_", "-")
    for text in _declared_requirements():
        requirement = Requirement(text)
        if requirement.name.lower().replace("_", "-") == wanted:
            return requirement.specifier
    return SpecifierSet()


@dataclasses.dataclass(frozen=True)
class InstalledVersion:
    package: str
    version: str | None  # None: not installed
    supported: SpecifierSet

    @property
    def in_range(self) -> bool:
        if self.version is None:
            return False
        try:
            return self.supported.contains(Version(self.version), prereleases=True)
        except InvalidVersion:
            return False

    def describe_range(self) -> str:
        return str(self.supported) or "any version"

    def install_hint(self) -> str:
        return f"pip install '{self.package}{self.supported}'"


def installed_version(package: str) -> InstalledVersion:
    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:
        version = None
    return InstalledVersion(package, version, supported_range(package))
