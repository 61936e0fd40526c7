"""Where packages live: local directories (push/pull and remote stores extend this)."""

from __future__ import annotations

from pathlib import Path

from .errors import ManifestError


def locate_package(package) -> Path:
    """A local package directory for `package` (a path)."""
    path = Path(package).expanduser()
    if not path.is_dir():
        raise ManifestError(f"package {package} is not a directory",
                            "pass the directory written by `aotpack build` or `aotpack pull`")
    return path
