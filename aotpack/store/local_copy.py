"""Putting a pulled package into `--local-dir`: verified first, then swapped in, never over a user's files.

A pull downloads (or copies) into a fresh staging folder inside `local_dir`, verifies it there, and
only then renames it to `local_dir/<folder>`. The folder it replaces must be one aotpack wrote:
files that its manifest does not list (a user's notes, another tool's output) are never deleted
or overwritten; the pull is refused with their names unless `overwrite` is set. A damaged store
copy therefore never replaces a good local one.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from pathlib import Path

from ..errors import PublishError
from .manifest import MANIFEST_NAME, enclosing_package, files_of_package
from .repo_layout import INDEX_NAME

STAGING_PREFIX = ".incoming-"
REPLACED_PREFIX = ".replaced-"  # a replaced folder, until the swap that replaced it is done


def staging_dir(parent: Path, folder: str) -> Path:
    """A fresh folder next to the final one (same filesystem, so it can be renamed into place)."""
    staging = parent / f"{STAGING_PREFIX}{folder.replace('/', '--')}-{uuid.uuid4().hex}"
    staging.mkdir()  # not mkdtemp: its 0700 mode would make the published folder unreadable to others
    return staging


@contextlib.contextmanager
def writable(where: Path, action: str):
    """OSError (read-only folder, full disk, permissions) as a PublishError naming the folder and the fix."""
    try:
        yield
    except PermissionError as err:
        raise PublishError(f"cannot {action}: {err.filename or where} is not writable ({err.strerror})",
                           f"pass a folder you can write to (--local-dir), or fix the permissions of {where}") from err
    except FileExistsError as err:  # a file where the folder must go
        path = err.filename or where
        raise PublishError(f"cannot {action}: {path} exists and is not a folder",
                           f"pass the path of a folder (or of one to create), or move {path} away") from err
    except FileNotFoundError as err:  # a folder that cannot be made there (e.g. under /proc)
        raise PublishError(f"cannot {action}: {err.filename or where} does not exist and cannot be created there "
                           f"({err.strerror})", "pass a folder on a writable filesystem") from err
    except OSError as err:
        raise PublishError(f"cannot {action} in {where} ({err.strerror or err})",
                           "check the free space and permissions of that folder") from err


def aotpack_written_files(folder: Path) -> set[str] | None:
    """The relative paths a previous pull wrote into `folder` (its manifest and the files it lists),
    or None when `folder` does not hold a readable aotpack manifest."""
    try:
        data = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        return None
    return {MANIFEST_NAME, *(name for name in files if isinstance(name, str))}


def foreign_files(folder: Path) -> list[str]:
    """Files in `folder` that aotpack did not write there (everything, if it holds no aotpack manifest)."""
    if not folder.exists():
        return []
    if folder.is_symlink() or not folder.is_dir():
        return [folder.name]
    ours = aotpack_written_files(folder) or set()
    return sorted(name for name in files_of_package(folder) if name not in ours)


def some_of(names: list[str], shown: int = 8) -> str:
    """`['a', 'b']`, or the first `shown` and how many more, for a message."""
    return f"{names[:shown]}" + (f" and {len(names) - shown} more" if len(names) > shown else "")


def refuse_foreign(final: Path, overwrite: bool,
                   fix: str = "move them away, pull into another --local-dir, or pass --overwrite to replace the "
                              "folder") -> None:
    """Refuse to replace `final` when it holds files aotpack did not write (unless `overwrite`)."""
    foreign = foreign_files(final)
    if foreign and not overwrite:
        raise PublishError(f"{final} holds files aotpack did not write there: {some_of(foreign)}", fix)


def refuse_package_as_local_dir(local_dir: Path) -> None:
    """A pull writes `<target>/` and the index into `local_dir`: inside a package they would be files its manifest
    does not list, and the package would fail verification."""
    local_dir = local_dir.resolve()
    if package := enclosing_package(local_dir):
        where = "is" if package == local_dir else "is inside"
        outside = enclosing_package(local_dir, outermost=True).parent / "pulled"
        raise PublishError(f"--local-dir {local_dir} {where} the aotpack package {package}",
                           f"pull into a folder outside any package, e.g. --local-dir {outside}")


def swap_in(staging: Path, final: Path, overwrite: bool = False) -> None:
    """Put the verified `staging` at `final` by renames; the previous folder is removed only after."""
    refuse_foreign(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)  # `<target>/` of `<target>/torch-<X.Y>`
    if not final.exists():
        staging.rename(final)
        return
    previous = final.with_name(f"{REPLACED_PREFIX}{final.name}-{uuid.uuid4().hex}")
    final.rename(previous)
    staging.rename(final)
    shutil.rmtree(previous, ignore_errors=True)


def write_index(path: Path, text: str, overwrite: bool = False) -> None:
    """Write the store's index next to the pulled folder, never over a file that is not an aotpack index."""
    if path.exists() and not overwrite:
        try:
            data = json.loads(path.read_text())
            ours = isinstance(data, dict) and data.get("library") == "aotpack"
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise PublishError(f"{path} exists and is not an aotpack index",
                               "move it away, pull into another --local-dir, or pass --overwrite")
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    temporary.write_text(text)
    temporary.replace(path)


def pull_into(local_dir: Path, folder: str, fill, check=None, overwrite: bool = False) -> Path:
    """Put a store's `folder` at `local_dir/folder`, verified before it replaces anything.

    `fill(staging)` downloads or copies into the fresh staging folder and returns (the package
    folder inside it, the store's index text or None); `check(path)` verifies that folder.
    """
    final = local_dir / folder
    refuse_package_as_local_dir(local_dir)  # before downloading gigabytes
    refuse_foreign(final, overwrite)
    action = f"pull {folder} into {local_dir}"
    with writable(local_dir, action):
        local_dir.mkdir(parents=True, exist_ok=True)
        staging = staging_dir(local_dir, folder)
    try:
        with writable(local_dir, action):
            package, index_text = fill(staging)
        if check is not None:
            check(package)
        with writable(local_dir, action):
            swap_in(package, final, overwrite)
            if index_text is not None:
                write_index(local_dir / INDEX_NAME, index_text, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
