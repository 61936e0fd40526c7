"""Folders that loaded programs are unpacked into, and their removal when the process that made them is gone.

A loaded program's folder must live as long as the process (CUDA runners load kernels from it lazily), so it is
removed at exit (`tempfile.TemporaryDirectory`'s finalizer). A process that is killed runs no finalizer: a Ray Serve
replica stopped by Ray, a server stopped with SIGKILL or out of memory, a timed-out worker. Each such load left one
folder per program in the temporary directory (~20 MB for a FLUX.1-dev package, every restart). So every folder
holds a lock file that its process keeps locked (`flock`: the kernel drops the lock when the process dies, also
across PID namespaces), and each new folder first removes this user's folders whose lock is free.
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

PREFIX = "aotpack-programs-"
LOCK_NAME = ".owner.lock"
UNLOCKED_GRACE_S = 3600  # a folder without its lock file yet may be one being made right now: only older ones go


class UnpackFolder:
    """A fresh folder under the temporary directory, locked by this process until `cleanup()` or exit."""

    def __init__(self, label: str, root: str | Path | None = None):
        remove_orphans(root)
        self._folder = tempfile.TemporaryDirectory(prefix=f"{PREFIX}{label}-", dir=root)
        self.path = Path(self._folder.name)
        self._lock = open(self.path / LOCK_NAME, "w")  # noqa: SIM115 -- held open for the folder's lifetime
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def cleanup(self) -> None:
        self._lock.close()
        self._folder.cleanup()


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


def remove_orphans(root: str | Path | None = None) -> list[Path]:
    """Remove this user's unpack folders under `root` (default: the temporary directory) whose process is gone;
    returns them. Folders of other users and of live processes are left alone; errors are logged, never raised
    (a load must not fail over another process's leftovers)."""
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            if not folder.is_dir() or folder.is_symlink() or folder.stat().st_uid != os.getuid():
                continue
            if _owner_gone(folder):
                shutil.rmtree(folder)
                removed.append(folder)
        except OSError as err:  # removed by another process meanwhile, or unreadable: not ours to fix
            logger.debug("left %s: %s", folder, err)
    if removed:
        logger.info("removed %d program folder(s) left by processes that were killed", len(removed))
    return removed
