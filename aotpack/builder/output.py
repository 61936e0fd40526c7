"""Where `aotpack build` writes: never into a user's folder, never half a package, never two builds mixed.

    with OutputDir(out, overwrite=False) as staging:   # refuses a bad --out before any work
        ... write the package into `staging` ...
        # on a clean exit: staging is renamed to `out` under `out`'s lock file

or, inside a function decorated with `@removes_staging_on_error`: `output = OutputDir(out)`,
`staging = output.open()`, ..., `output.commit()` (the decorator removes the staging folder of
any OutputDir opened in the call that was not committed, on any exception or Ctrl-C).

Each build stages in its own `tempfile.mkdtemp` folder next to `out` (same filesystem, so the
final rename is atomic); concurrent builds into one `out` take turns on an `fcntl.flock`, and the
last one to finish wins with a complete package. An existing `out` is replaced only when it is
an aotpack package (its manifest.json parses) and `overwrite` is set; it is moved aside and
removed only after the new package is in place. An exception or SIGINT (KeyboardInterrupt)
removes the staging folder and leaves `out` as it was.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import functools
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from ..errors import AotpackError
from ..store.manifest import MANIFEST_NAME


class OutputDirError(AotpackError):
    """An `--out` that aotpack must not write to (a user's folder, the working directory, ...)."""


def is_package_dir(path: Path) -> bool:
    """A directory aotpack wrote: it holds a manifest.json that parses as a JSON object with a target."""
    try:
        data = json.loads((Path(path) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "format_version" in data and "target" in data


def check_output_dir(out: Path, overwrite: bool = False) -> Path:
    """Refuse an `out` that is `.`/`..`, the working directory or one of its parents, a file, or an
    existing folder that is not an aotpack package (or is one, without `overwrite`). Returns it absolute."""
    raw = str(out)
    out = Path(out).expanduser()
    absolute = Path(os.path.abspath(out))
    cwd = Path.cwd().resolve()
    resolved = absolute.resolve()
    if Path(raw).name in ("", ".", "..") or resolved == cwd or resolved in cwd.parents:
        raise OutputDirError(f"--out {raw!r} is the working directory or one of its parents ({resolved})",
                             "pass a new folder for the package, e.g. --out artifacts/packages/my-package")
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve():
        raise OutputDirError(f"--out {raw!r} is {resolved}", "pass a new folder for the package")
    if absolute.is_symlink() or (absolute.exists() and not absolute.is_dir()):
        raise OutputDirError(f"--out {raw!r} exists and is not a folder", "pass a new folder for the package")
    if absolute.exists():
        if not is_package_dir(absolute):
            entries = sorted(p.name for p in absolute.iterdir())
            if entries:
                raise OutputDirError(
                    f"--out {raw!r} exists and is not an aotpack package (it holds {entries[:5]}"
                    + (f" and {len(entries) - 5} more" if len(entries) > 5 else "") + ")",
                    "pass a new folder; aotpack only ever replaces a folder it wrote itself (even with --overwrite)")
        elif not overwrite:
            raise OutputDirError(f"--out {raw!r} already holds an aotpack package",
                                 "pass --overwrite to replace it, or a new folder")
    return absolute


def _lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.aotpack-lock")


@contextlib.contextmanager
def _locked(out: Path):
    path = _lock_path(out)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_OPEN = contextvars.ContextVar("aotpack_open_outputs", default=None)


def removes_staging_on_error(function):
    """Any `OutputDir` opened during `function` and not committed is removed when it raises (SIGINT too)."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        opened: list = []
        token = _OPEN.set(opened)
        try:
            return function(*args, **kwargs)
        except BaseException:
            for output in opened:
                output.discard()
            raise
        finally:
            _OPEN.reset(token)
    return wrapper


class OutputDir:
    """Context manager: a private staging folder for one build, swapped into `out` on success."""

    def __init__(self, out, overwrite: bool = False):
        self.overwrite = overwrite
        self.out = check_output_dir(Path(out), overwrite)
        self.staging: Path | None = None

    def __enter__(self) -> Path:
        return self.open()

    def open(self) -> Path:
        """Create this build's own staging folder next to `out` and return it."""
        parent = self.out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.aotpack-build-", dir=parent))
        except OSError as err:
            raise OutputDirError(f"cannot write the package next to {self.out} ({err.strerror})",
                                 "pass an --out in a folder you can write to") from err
        os.chmod(self.staging, 0o755)  # mkdtemp's 0700 would make the package unreadable to others
        if (opened := _OPEN.get()) is not None:
            opened.append(self)
        return self.staging

    def discard(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)

    def __exit__(self, kind, error, trace) -> bool:
        if kind is not None:  # KeyboardInterrupt included: no half-written package stays behind
            self.discard()
            return False
        try:
            self.commit()
        except BaseException:
            self.discard()
            raise
        return False

    def commit(self) -> Path:
        """Rename the staging folder to `out` under the lock, re-checking `out` (another build may have
        written it meanwhile, which is fine only if we may replace a package)."""
        with _locked(self.out):
            previous = None
            if self.out.exists():
                if not is_package_dir(self.out) and any(self.out.iterdir()):
                    raise OutputDirError(f"--out {self.out} now holds files that are not an aotpack package",
                                         "pass a new folder; nothing was replaced")
                previous = self.out.with_name(f".{self.out.name}.aotpack-old-{uuid.uuid4().hex}")
                self.out.rename(previous)
            self.staging.rename(self.out)
        self.staging = None  # committed: nothing left to discard
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        return self.out
