"""Where `aotpack build` writes: never into a user's folder, never half a package, never two builds mixed.

    with OutputDir(out, overwrite=False) as staging:   # refuses a bad --out before any work
        ... write the package into `staging` ...
        # on a clean exit: staging is renamed to `out` under `out`'s lock file

or, inside a function decorated with `@removes_staging_on_error`: `output = OutputDir(out)`,
`staging = output.open()`, ..., `output.commit()` (the decorator removes the staging folder of
any OutputDir opened in the call that was not committed, on any exception or Ctrl-C).

Each build stages in its own `tempfile.mkdtemp` folder next to `out` (same filesystem, so the
final rename is atomic); concurrent builds into one `out` take turns on an `fcntl.flock` of
`.<name>.aotpack-lock`, which its holder removes before letting go (see `_locked`), and the last one
to finish wins with a complete package. An existing `out` is replaced only when it is an aotpack
package (its manifest.json parses) holding nothing but the files its manifest lists, and
`overwrite` is set; it is moved aside and removed only after the new package is in place. An
exception or SIGINT (KeyboardInterrupt; SIGTERM too under `sigterm_as_interrupt`) removes the
staging folder and leaves `out` as it was. A build holds an flock on its staging folder while it
runs, so the staging folders of builds killed outright (SIGKILL, power loss) are recognised and
removed by the next build into the same `out`.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import functools
import logging
import os
import shutil
import signal
import tempfile
import threading
import uuid
from pathlib import Path

from ..errors import AotpackError
from ..store.local_copy import aotpack_written_files, some_of
from ..store.manifest import MANIFEST_NAME, enclosing_package, is_package_dir

logger = logging.getLogger(__name__)


class OutputDirError(AotpackError):
    """An `--out` that aotpack must not write to (a user's folder, the working directory, ...)."""


def files_aotpack_did_not_write(folder: Path) -> list[str]:
    """Relative paths of the files (and symlinks) under `folder` that aotpack did not write there: those its
    manifest does not list (the pull side's `aotpack_written_files`), nested packages' files included."""
    ours = aotpack_written_files(folder) or {MANIFEST_NAME}
    found = []
    for root, dirs, files in os.walk(folder):  # symlinked folders are listed, never entered
        here = Path(root)
        found += [(here / name).relative_to(folder).as_posix()
                  for name in files + [d for d in dirs if (here / d).is_symlink()]]
    return sorted(name for name in found if name not in ours)


def _not_ours(out: Path) -> tuple[bool, list[str]]:
    """(whether `out` is a package, what in it a build must not delete): files its manifest does not list, or
    every entry of a folder that is not a package."""
    if is_package_dir(out):
        return True, files_aotpack_did_not_write(out)
    return False, sorted(p.name for p in out.iterdir())


def check_output_dir(out: Path, overwrite: bool = False) -> Path:
    """Refuse an `out` that is `.`/`..`, the working directory or one of its parents, inside an aotpack package,
    a file, in a place that cannot be written, or an existing folder that is not an aotpack package, holds files
    its manifest does not list, or is a package and `overwrite` is not set. Returns it absolute.
    `aotpack doctor --out` runs this very check."""
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
    if package := enclosing_package(resolved.parent):
        # its lock file and staging folder would land in the package, which then fails `inspect`
        raise OutputDirError(f"--out {raw!r} is inside the aotpack package {package}",
                             f"pass a folder outside it, e.g. --out {package.parent / resolved.name}")
    if absolute.is_symlink() or (absolute.exists() and not absolute.is_dir()):
        raise OutputDirError(f"--out {raw!r} exists and is not a folder", "pass a new folder for the package")
    base = absolute.parent  # where the staging folder goes: made (with its parents) under the nearest existing one
    while not base.exists() and not base.is_symlink():
        base = base.parent
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK) or shutil.disk_usage(base).total == 0:
        why = ("is not a folder" if not base.is_dir() else "is not writable" if not os.access(base, os.W_OK | os.X_OK)
               else "has no disk space (a pseudo filesystem such as /proc)")
        raise OutputDirError(f"--out {raw!r} cannot be written: {base} {why}",
                             "pass an --out in a folder you can write to")
    if absolute.exists():
        package, not_ours = _not_ours(absolute)
        if not_ours and not package:
            raise OutputDirError(
                f"--out {raw!r} exists and is not an aotpack package (it holds {some_of(not_ours, 5)})",
                "pass a new folder; aotpack only ever replaces a folder it wrote itself (even with --overwrite)")
        if not_ours:
            raise OutputDirError(
                f"--out {raw!r} holds files aotpack did not write there (its manifest does not list them): "
                f"{some_of(not_ours)}",
                "move them out of the package, or pass a new folder; --overwrite never deletes files aotpack "
                "did not write")
        if package and not overwrite:
            raise OutputDirError(f"--out {raw!r} already holds an aotpack package",
                                 "pass --overwrite to replace it, or a new folder")
    return absolute


def _lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.aotpack-lock")


def _is_open_at(handle, path: Path) -> bool:
    """Whether `handle` is the file now at `path` (a removed lock file is not)."""
    try:
        here, there = os.fstat(handle.fileno()), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


@contextlib.contextmanager
def _locked(out: Path):
    """Hold the flock of `out`'s lock file; no lock file stays behind.

    The holder removes the file before it lets go. A build that was waiting on the removed file then
    holds a lock nobody else can find, so after each flock it checks that its file is still the one at
    the path, and otherwise opens the path again (a new file) and waits on that: at most one build
    holds the lock of the file at the path at any time."""
    path = _lock_path(out)
    while True:
        handle = open(path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except BaseException:
            handle.close()
            raise
        if _is_open_at(handle, path):
            break
        handle.close()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still holding it: waiters see the file is gone and start over
        handle.close()  # releases the flock


def _staging_prefix(out: Path) -> str:
    return f".{out.name}.aotpack-build-"


def _hold(folder: Path) -> int | None:
    """An flock on `folder` for as long as this process keeps the returned descriptor open (the kernel drops
    it when the process dies however it dies); None where the filesystem cannot lock folders."""
    try:
        handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(handle)
        return None
    return handle


def remove_dead_staging(out: Path) -> list[Path]:
    """Remove the staging folders (`.<name>.aotpack-build-*`) of builds into `out` that no longer run: those
    whose flock nobody holds. Called under `out`'s lock, where no build is between making its staging folder
    and locking it. Anything else next to `out` (files of that name, other folders) is left alone."""
    removed = []
    for entry in sorted(out.parent.iterdir()):
        if not entry.name.startswith(_staging_prefix(out)) or entry.is_symlink() or not entry.is_dir():
            continue
        if (handle := _hold(entry)) is None:
            continue  # a running build holds it (or the filesystem cannot tell): kept
        try:
            shutil.rmtree(entry, ignore_errors=True)
        finally:
            os.close(handle)
        removed.append(entry)
        logger.info("removed %s, the staging folder of a build that no longer runs", entry)
    return removed


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (`timeout`, `kill`, a job scheduler) ends the code inside as Ctrl-C does, with KeyboardInterrupt,
    so a build removes its staging folder. In the main thread only (Python runs signal handlers there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


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
        self._held: int | None = None  # the flock on the staging folder, while the build runs

    def __enter__(self) -> Path:
        return self.open()

    def open(self) -> Path:
        """Create this build's own staging folder next to `out` and return it."""
        parent = self.out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            with _locked(self.out):  # no other build is between its mkdtemp and its flock while dead ones go
                remove_dead_staging(self.out)
                self.staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(self.out), dir=parent))
                self._held = _hold(self.staging)
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
        self._release()

    def _release(self) -> None:
        if self._held is not None:
            os.close(self._held)
            self._held = None

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
                _, not_ours = _not_ours(self.out)
                if not_ours:
                    raise OutputDirError(f"--out {self.out} now holds files aotpack did not write: {some_of(not_ours)}",
                                         "pass a new folder; nothing was replaced")
                previous = self.out.with_name(f".{self.out.name}.aotpack-old-{uuid.uuid4().hex}")
                self.out.rename(previous)
            self.staging.rename(self.out)
        self.staging = None  # committed: nothing left to discard
        self._release()
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        return self.out
