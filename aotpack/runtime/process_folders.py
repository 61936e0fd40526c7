"""Temporary folders that live as long as the process that made them, and their removal once it is gone.

A loaded program's folder must live as long as the process (CUDA runners load kernels from it lazily); a
context-parallel run's folder holds the ranks' results until the run ends. Both go at exit or at the end of their
`with` (`tempfile.TemporaryDirectory`'s cleanup). A process that is killed runs no cleanup: a Ray Serve replica
stopped by Ray, a server stopped with SIGKILL or out of memory, a timed-out worker. Each such load left one folder
per program in the temporary directory (~20 MB for a FLUX.1-dev package, every restart). So every folder holds a
lock file that its process keeps locked (`flock`: the kernel drops the lock when the process dies, also across PID
namespaces), and each new folder of a kind first removes this user's folders of that kind whose lock is free.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_NAME = ".owner.lock"
UNLOCKED_GRACE_S = 3600  # a folder without its lock file yet may be one being made right now: only older ones go
_swept: set[tuple] = set()  # (kind, root) swept by this process


def prefix(kind: str) -> str:
    """The name every folder of `kind` starts with ("programs": `aotpack-programs-`). Kinds are named apart from the
    folders of aotpack versions without locks (`aotpack-<program>-`, `aotpack-ranks-`): a sweep must not take a
    live one of those for an orphan."""
    return f"aotpack-{kind}-"


class ProcessFolder:
    """A fresh folder of `kind` under `root` (default: the temporary directory), locked by this process until
    `cleanup()` (or the end of its `with`) or exit."""

    def __init__(self, kind: str, label: str = "", root: str | Path | None = None):
        if (kind, root) not in _swept:  # once per process and place: a load opens one folder per program
            _swept.add((kind, root))
            remove_orphans(kind, root)
        self._folder = tempfile.TemporaryDirectory(prefix=prefix(kind) + (f"{label}-" if label else ""), dir=root)
        self.path = Path(self._folder.name)
        self._lock = open(self.path / LOCK_NAME, "w")  # noqa: SIM115 -- held open for the folder's lifetime
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def cleanup(self) -> None:
        self._lock.close()
        self._folder.cleanup()

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        self.cleanup()


def _owner_gone(folder: Path) -> bool:
    """Whether no live process holds `folder`'s lock (a folder that never got one counts once it is old)."""
    try:
        lock = open(folder / LOCK_NAME)  # noqa: SIM115 -- closed below; opening never blocks
    except FileNotFoundError:
        return time.time() - folder.stat().st_mtime > UNLOCKED_GRACE_S
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def remove_orphans(kind: str, root: str | Path | None = None) -> list[Path]:
    """Remove this user's folders of `kind` under `root` (default: the temporary directory) whose process is gone;
    returns them. Folders of other users and of live processes are left alone; errors are logged, never raised
    (a load must not fail over another process's leftovers)."""
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(prefix(kind) + "*"):
        try:
            if not folder.is_dir() or folder.is_symlink() or folder.stat().st_uid != os.getuid():
                continue
            if _owner_gone(folder):
                shutil.rmtree(folder)
                removed.append(folder)
        except OSError as err:  # removed by another process meanwhile, or unreadable: not ours to fix
            logger.debug("left %s: %s", folder, err)
    if removed:
        logger.info("removed %d %s folder(s) left by processes that were killed", len(removed), kind)
    return removed
