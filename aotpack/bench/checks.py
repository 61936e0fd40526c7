"""The arguments every bench checks after argparse's usage errors and before any work: an `--out` folder it can
write into and packages that are there. Each refusal is a typed error naming the value and the fix (`aotpack bench`
exits 1) and leaves no trace: nothing is created here."""

from __future__ import annotations

import os
from pathlib import Path

from ..builder.output import OutputDirError
from ..errors import ManifestError
from ..store.manifest import read_manifest
from ..store.package_ref import is_store_ref

PACKAGE_FIX = "pass the directory written by `aotpack build` or `aotpack pull`, or an hf:// or file:// reference"


def output_folder(value) -> Path:
    """Every bench's `--out`: an existing folder, or a path where one can be made."""
    value, path = str(value), Path(value).expanduser()
    if os.path.lexists(path) and not path.is_dir():
        raise OutputDirError(f"--out {value!r} exists and is not a folder",
                             "pass a folder for the results (a missing one is created)")
    parent = path.absolute()
    while not os.path.lexists(parent):  # the nearest existing folder is where the first one is made
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputDirError(f"--out {value!r}: {parent} is not a folder this process can write into",
                             "pass a folder you can write to")
    return path


def package_path(value: str, given: str | None = None) -> str:
    """A bench's `--package`: a local folder holding a readable manifest (an hf:// or file:// reference is resolved
    and verified by the loader). `given`: the argument as the user wrote it."""
    given = given or f"--package {value!r}"
    if is_store_ref(value):
        return value
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ManifestError(f"{given}: {'not a folder' if path.exists() else 'no such folder'}", PACKAGE_FIX)
    try:
        read_manifest(path)
    except ManifestError as err:
        raise ManifestError(f"{given}: {err.problem}", err.fix) from err
    return value


def package_and_output(args) -> None:
    """The `--package` and `--out` of a bench that measures one package."""
    package_path(args.package)
    output_folder(args.out)
