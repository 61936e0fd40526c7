"""A package store on a filesystem (`file:///path`): the Hub repo layout, for clusters without Hub access.

Pushes hold an exclusive lock on the store while they merge the index, and a target folder is
replaced by a rename, so a reader never sees a half-copied folder under its final name.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from pathlib import Path

from ..errors import PublishError
from ..progress import Progress
from .manifest import read_manifest, verify_files
from .package_ref import StoreRef
from .repo_layout import CARD_NAME, INDEX_NAME, PushResult, parse_index

LOCK_NAME = ".aotpack.lock"


class FileStore:
    def __init__(self, ref: StoreRef):
        self.root = Path(ref.location)
        self.display = str(ref)

    # -- pull --------------------------------------------------------------------------------------
    def open_index(self) -> tuple[dict, None]:
        if not self.root.is_dir():
            raise PublishError(f"file store {self.display} does not exist", self._nearby_stores_fix())
        text = _read_text(self.root / INDEX_NAME)
        if text is None:
            raise PublishError(f"{self.display} has no {INDEX_NAME}: it is not a store written by `aotpack push`",
                               self._nearby_stores_fix())
        return parse_index(text, self.display), None

    def fetch_target(self, folder: str, commit: None, local_dir: Path | None) -> Path:
        """The target folder: in place (the store is already local), or copied under `local_dir`."""
        source = self.root / folder
        if local_dir is None or not source.is_dir():  # a missing folder is reported by the caller's checks
            return source
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        staging = _staging_dir(local_dir, folder)
        try:
            copy_with_progress([(p, staging / p.name) for p in sorted(source.iterdir()) if p.is_file()],
                               f"copy {folder}")
            _replace_dir(staging, local_dir / folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _write_atomic(local_dir / INDEX_NAME, (self.root / INDEX_NAME).read_text())
        return local_dir / folder

    def repair_hint(self, local_dir: Path | None) -> str:
        """How to get good copies of files that failed verification."""
        if local_dir is not None:
            return f"pull again into {local_dir} (the folder is replaced)"
        return (f"the copy in {self.display} itself is damaged: pull it there again from where it came from "
                f"(aotpack pull REPO --local-dir {self.root}), or push the package there again")

    # -- push --------------------------------------------------------------------------------------
    def push(self, make_plan, *, commit_message: str, private: bool = False, create_pr: bool = False,
             report: Progress) -> PushResult:
        """Write the plan `make_plan(index_text, card_text)` makes from the store's current state.

        `commit_message` has nowhere to go in a directory; the flags the Hub alone has are refused
        before this is called.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with _locked(self.root / LOCK_NAME):
            plan = make_plan(_read_text(self.root / INDEX_NAME), _read_text(self.root / CARD_NAME))
            report.info(f"copying {len(plan.uploads)} files to {self.display}/{plan.folder}")
            staging = _staging_dir(self.root, plan.folder)
            try:
                copy_with_progress([(local, staging / path.split("/", 1)[1]) for path, local in plan.uploads.items()],
                                   f"copy {plan.folder}")
                verify_files(staging, read_manifest(staging))  # a network filesystem can corrupt a copy too
                _replace_dir(staging, self.root / plan.folder)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            _write_atomic(self.root / INDEX_NAME, plan.index_text)
            _write_atomic(self.root / CARD_NAME, plan.card_text)
        return PushResult(target=plan.folder, url=f"file://{self.root / plan.folder}")

    def _nearby_stores_fix(self) -> str:
        parent = self.root.parent
        stores = sorted(f"file://{p}" for p in parent.iterdir() if (p / INDEX_NAME).is_file()) \
            if parent.is_dir() else []
        seen = f"stores next to it: {', '.join(stores)}" if stores else f"no stores found in {parent}"
        return f"check the path ({seen}), or push a package there first: aotpack push PACKAGE {self.display}"


def copy_with_progress(pairs: list[tuple[Path, Path]], label: str) -> None:
    """Copy files with one byte progress bar on stderr (huggingface_hub's, so HF_HUB_DISABLE_PROGRESS_BARS works)."""
    from huggingface_hub.utils import tqdm

    total = sum(src.stat().st_size for src, _ in pairs)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label) as bar:
        for src, dst in pairs:
            dst.parent.mkdir(parents=True, exist_ok=True)
            with open(src, "rb") as reader, open(dst, "wb") as writer:
                while block := reader.read(1 << 22):
                    writer.write(block)
                    bar.update(len(block))
            shutil.copymode(src, dst)


def _read_text(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    temporary.write_text(text)
    os.replace(temporary, path)


def _staging_dir(parent: Path, folder: str) -> Path:
    """A fresh folder next to the final one (same filesystem, so it can be renamed into place)."""
    staging = parent / f".incoming-{folder}-{uuid.uuid4().hex}"
    staging.mkdir()  # not mkdtemp: its 0700 mode would make the published folder unreadable to others
    return staging


def _replace_dir(new: Path, final: Path) -> None:
    """Put `new` at `final` by renames (both on one filesystem); the previous folder is removed after."""
    if not final.exists():
        new.rename(final)
        return
    previous = final.with_name(f".replaced-{final.name}-{uuid.uuid4().hex}")
    final.rename(previous)
    new.rename(final)
    shutil.rmtree(previous, ignore_errors=True)


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # concurrent CI pushes to one store merge the index in turn
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
