"""A package store on a filesystem (`file:///path`): the Hub repo layout, for clusters without Hub access.

Pushes hold an exclusive lock on the store while they merge the index, and a target folder is
replaced by a rename, so a reader never sees a half-copied folder under its final name.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from ..errors import AotpackError, PackageIntegrityError, PublishError
from ..progress import Progress
from .local_copy import (
    REPLACED_PREFIX,
    STAGING_PREFIX,
    foreign_files,
    pull_into,
    refuse_foreign,
    some_of,
    staging_dir,
    swap_in,
    writable,
)
from .manifest import MANIFEST_NAME, read_manifest, verify_files
from .package_ref import StoreRef
from .repo_layout import (
    CARD_NAME,
    INDEX_NAME,
    DamagedIndexError,
    PushResult,
    empty_index,
    index_entry,
    is_folder_name,
    package_folder,
    parse_index,
    render_index,
    target_folder,
)

log = logging.getLogger("aotpack.store")
LOCK_NAME = ".aotpack.lock"
STALE_AFTER_S = 6 * 3600  # longer than any push takes; older staging folders belong to killed pushes


class FileStore:
    def __init__(self, ref: StoreRef):
        self.root = Path(ref.location)
        self.display = str(ref)

    # -- pull --------------------------------------------------------------------------------------
    def open_index(self) -> tuple[dict, None]:
        if not self.root.is_dir():
            raise PublishError(f"file store {self.display} does not exist", self._nearby_stores_fix())
        text = _read(self.root / INDEX_NAME)
        if text is None:
            raise PublishError(f"{self.display} has no {INDEX_NAME}: it is not a store written by `aotpack push`",
                               self._nearby_stores_fix())
        return parse_index(text, self.display), None

    def fetch_target(self, folder: str, commit: None, local_dir: Path | None, check=None,
                     overwrite: bool = False, files: list[str] | None = None) -> Path:
        """The target folder: in place (the store is already local), or copied under `local_dir`.

        A copy is made in a staging folder, checked there with `check(folder_path)`, and only then
        swapped in, so a damaged store copy never replaces a good local one.
        """
        source = self.root / folder
        if local_dir is None or not source.is_dir():  # in place (a missing folder is reported by `check`)
            if check is not None:
                check(source)
            return source
        names = files or [p.name for p in sorted(source.iterdir()) if p.is_file()]
        missing = [name for name in names if not (source / name).is_file()]
        if missing:  # before anything is created under local_dir
            raise PackageIntegrityError(f"{source} lacks files the {INDEX_NAME} of {self.display} lists for {folder}: "
                                        f"{some_of(missing)}", self.repair_hint(local_dir))

        def fill(staging: Path):
            copy_with_progress([(source / name, _inside(staging, folder, f"{folder}/{name}")) for name in names],
                               f"copy {folder}")
            return staging, (self.root / INDEX_NAME).read_text()

        return pull_into(Path(local_dir), folder, fill, check, overwrite)

    def repair_hint(self, local_dir: Path | None) -> str:
        """How to get good copies of files that failed verification."""
        if local_dir is not None:
            return (f"the copy in {self.display} is damaged (nothing in {local_dir} was replaced): push the "
                    f"package to {self.display} again, then pull")
        return (f"the copy in {self.display} itself is damaged: pull it there again from where it came from "
                f"(aotpack pull REPO --local-dir {self.root}), or push the package there again")

    # -- push --------------------------------------------------------------------------------------
    def push(self, make_plan, *, commit_message: str, private: bool = False, create_pr: bool = False,
             report: Progress, repair_index: bool = False) -> PushResult:
        """Write the plan `make_plan(index_text, card_text)` makes from the store's current state.

        `commit_message` has nowhere to go in a directory; the flags the Hub alone has are refused
        before this is called. A store without an index (or with a damaged one and `repair_index`) gets
        one listing its verified package folders again, so no published target drops out of it.
        """
        self._refuse_a_user_folder()
        with writable(self.root, f"push to {self.display}"):
            self.root.mkdir(parents=True, exist_ok=True)
            with _locked(self.root / LOCK_NAME):
                remove_stale_staging(self.root, report)
                damaged, relisted = None, None
                index_text = _read(self.root / INDEX_NAME)
                if repair_index and index_text is not None:
                    try:
                        parse_index(index_text, self.display)
                        report.info(f"the {INDEX_NAME} of {self.display} reads well: --repair-index leaves it as it is")
                    except DamagedIndexError as err:  # a newer format is not damaged: never rewritten here
                        report.info(f"{err.problem}; listing the package folders of the store again")
                        damaged, index_text = index_text, None
                if index_text is None:
                    relisted, problems = package_entries(self.root)
                    index_text = render_index({**empty_index(), "targets": relisted})
                plan = make_plan(index_text, _read(self.root / CARD_NAME))
                if relisted is not None:
                    self._check_relisting(plan.folder, relisted, problems, damaged, report)
                refuse_foreign(self.root / plan.folder, overwrite=False,
                               fix=f"move them out of {self.root / plan.folder} (a store's folders hold only what "
                                   "`aotpack push` wrote), then push again")
                report.info(f"copying {len(plan.uploads)} files to {self.display}/{plan.folder}")
                staging = staging_dir(self.root, plan.folder)
                try:
                    copy_with_progress([(local, _inside(staging, plan.folder, path))
                                        for path, local in plan.uploads.items()], f"copy {plan.folder}")
                    verify_files(staging, read_manifest(staging))  # a network filesystem can corrupt a copy too
                    swap_in(staging, self.root / plan.folder, overwrite=True)  # its files were checked above
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
                if damaged is not None:  # kept, never overwritten: what it held may still matter to someone
                    kept = self.root / f"{INDEX_NAME}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
                    _write_atomic(kept, damaged)
                    report.info(f"the damaged {INDEX_NAME} is kept as {kept}")
                _write_atomic(self.root / INDEX_NAME, plan.index_text)
                _write_atomic(self.root / CARD_NAME, plan.card_text)
        return PushResult(target=plan.folder, url=f"file://{self.root / plan.folder}",
                          relisted=None if relisted is None else sorted({*relisted, plan.folder}))

    def _check_relisting(self, folder: str, relisted: dict, problems: dict, damaged: bytes | None,
                         report: Progress) -> None:
        """Refuse to write an index that would leave out a package folder of the store (other than the one this push
        replaces); say which targets of the damaged index have no folder left."""
        problems.pop(folder, None)
        if problems:
            raise PublishError(f"cannot list the package folders of {self.display} again: "
                               + "; ".join(f"{name}: {why}" for name, why in sorted(problems.items())),
                               f"push those targets' packages to {self.display} again, or move their folders out "
                               "of the store, then push this one again (nothing was written)")
        if relisted:
            report.info(f"listing {len(relisted)} package folders found in {self.display}: {sorted(relisted)}")
        gone = sorted(set(_listed_folders(damaged)) - set(relisted) - {folder})
        if gone:
            log.warning("%s: the damaged %s listed %s, which have no package folder in the store: not listed again",
                        self.display, INDEX_NAME, gone)

    def _refuse_a_user_folder(self) -> None:
        """A push writes into a new or empty folder, or a store: a folder of other files without an index is a
        user's (the push would rewrite its README.md and replace its `<target>/` folders)."""
        if not self.root.is_dir() or (self.root / INDEX_NAME).is_file():
            return
        theirs = [name for name in foreign_files(self.root)  # a killed first push's, or a store that lost its index
                  if not name.startswith((LOCK_NAME, STAGING_PREFIX, REPLACED_PREFIX, f"{INDEX_NAME}.damaged-"))
                  and not (name == CARD_NAME and _is_aotpack_card(self.root / CARD_NAME))]
        if theirs:
            raise PublishError(f"{self.root} is not an aotpack store (it has no {INDEX_NAME}) and holds files aotpack "
                               f"did not write: {some_of(theirs)}",
                               "push to a new or empty folder, or to a store written by `aotpack push`; to use this "
                               "folder, move those files away first")

    def _nearby_stores_fix(self) -> str:
        parent = self.root.parent
        stores = sorted(f"file://{p}" for p in parent.iterdir() if (p / INDEX_NAME).is_file()) \
            if parent.is_dir() else []
        seen = f"stores next to it: {', '.join(stores)}" if stores else f"no stores found in {parent}"
        return f"check the path ({seen}), or push a package there first: aotpack push PACKAGE {self.display}"


def package_folders(root: Path) -> list[str]:
    """The package folders of the store layout under `root`: `<target>/torch-<X.Y>` and older repos' `<target>`."""
    found = []
    for target in sorted(root.iterdir()):
        if target.is_symlink() or not target.is_dir() or not is_folder_name(target.name):
            continue
        if (target / MANIFEST_NAME).is_file():
            found.append(target.name)
        for series in sorted(target.iterdir()):
            name = f"{target.name}/{series.name}"
            if is_folder_name(name) and series.is_dir() and not series.is_symlink() \
                    and (series / MANIFEST_NAME).is_file():
                found.append(name)
    return found


def package_entries(root: Path) -> tuple[dict, dict]:
    """Index entries of the package folders under `root` that verify, and why each other one does not."""
    entries, problems = {}, {}
    for folder in package_folders(root):
        path = root / folder
        try:
            manifest = read_manifest(path)
            verify_files(path, manifest)  # an index lists nothing a pull would refuse
            expected = package_folder(manifest) if "/" in folder else target_folder(manifest.target)
            if expected != folder:
                raise PublishError(f"it holds the package of {expected}")
        except AotpackError as err:
            problems[folder] = err.problem
            continue
        pushed = datetime.datetime.fromtimestamp((path / MANIFEST_NAME).stat().st_mtime, datetime.UTC)
        entry = index_entry(manifest, path, pushed.replace(microsecond=0).isoformat())  # a push wrote the manifest
        if "/" not in folder:  # an older repo's `<target>/` folder: keyed by the target alone, no series
            entry["folder"] = folder
            entry.pop("torch_series")
        entries[folder] = entry
    return entries, problems


def _listed_folders(damaged: bytes | None) -> list[str]:
    """The folder keys a damaged index still shows, as far as it parses (for the warning only)."""
    try:
        targets = json.loads(damaged).get("targets") if damaged else None
    except (ValueError, AttributeError):
        return []
    return [name for name in targets if isinstance(name, str)] if isinstance(targets, dict) else []


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


def _is_aotpack_card(path: Path) -> bool:
    from .model_card import BEGIN

    try:
        return BEGIN.encode() in path.read_bytes()
    except OSError:
        return False


def _read(path: Path) -> bytes | None:
    # the index and the card as bytes: `parse_index` and the card's parse report bytes that are not text
    return path.read_bytes() if path.is_file() else None


def _write_atomic(path: Path, text: str | bytes) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    if isinstance(text, bytes):
        temporary.write_bytes(text)
    else:
        temporary.write_text(text)
    os.replace(temporary, path)


def _inside(staging: Path, folder: str, repo_path: str) -> Path:
    """Where an upload lands: `folder/NAME` of the plan, confined to the staging folder."""
    from .manifest_schema import check_relative_name

    check_relative_name(repo_path, "an upload path")
    if not repo_path.startswith(folder + "/"):
        raise PublishError(f"push would write {repo_path!r} outside the target folder {folder!r}",
                           "report this: a push writes only under its target folder")
    name = repo_path[len(folder) + 1:]
    check_relative_name(name, "a package file name")
    return staging / name


def remove_stale_staging(root: Path, report: Progress | None = None, max_age_s: float = STALE_AFTER_S) -> list[str]:
    """Remove `.incoming-*` / `.replaced-*` folders left by killed pushes (older than a push's lifetime).

    Called under the store lock: a live push holds the lock, so only dead pushes' folders are old.
    """
    now = time.time()
    removed = []
    for path in sorted(root.glob(".incoming-*")) + sorted(root.glob(".replaced-*")):
        try:
            if path.is_dir() and not path.is_symlink() and now - path.stat().st_mtime > max_age_s:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        except FileNotFoundError:
            continue
    if removed and report is not None:
        report.info(f"removed {len(removed)} folders left by interrupted pushes: {removed}")
    return removed


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # concurrent CI pushes to one store merge the index in turn
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
