"""Where packages live: local directories, Hub repos (`hf://`) and file stores (`file://`); push and pull.

Both stores share one layout (see `repo_layout.py`). A pulled package is verified (every file
against its manifest's sha256, the manifest against the index) before its path is returned, so
nothing downstream ever loads an unverified file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import (
    ManifestError,
    PackageIntegrityError,
    PackageMismatchError,
    PublishError,
)
from ..progress import Progress
from .manifest import MANIFEST_NAME, read_manifest, sha256_file, verify_files
from .package_ref import StoreRef, is_store_ref, parse_store_ref
from .repo_layout import (
    INDEX_NAME,
    describe_targets,
    entry_series,
    entry_target,
    parse_index,
    plan_push,
)

AUTO = "auto"


@dataclasses.dataclass
class PulledPackage:
    path: Path  # the verified package directory
    target: str  # the repo folder it came from: `<target>/torch-<X.Y>` (or `<target>` in older repos)
    warning: str | None = None  # why it will not load on this machine, if it will not


def open_store(ref: StoreRef, token: str | None = None):
    if ref.kind == "hub":
        from .hub import HubStore

        return HubStore(ref, token)
    from .filestore import FileStore

    return FileStore(ref)


def _report(progress) -> Progress:
    return progress if isinstance(progress, Progress) else Progress(enabled=bool(progress))


# -- locate (the loader's entry point) -------------------------------------------------------------
def locate_package(package) -> Path:
    """A local package directory for `package`: a path, `file:///…` or `hf://owner/repo[@rev][/target]`.

    Remote references are pulled (through the Hugging Face cache for `hf://`, for this machine's
    target unless one is named) and verified; a plain directory is returned as it is (the loader
    verifies it).
    """
    if is_store_ref(package):
        ref = parse_store_ref(package)
        if ref.kind == "file" and ref.target and not (Path(ref.location) / INDEX_NAME).is_file():
            return _verified_directory(Path(ref.location) / ref.target)  # a bare package directory
        return pull_package(package).path
    path = Path(package).expanduser()
    if not path.is_dir():
        raise ManifestError(f"package {package} is not a directory",
                            "pass the directory written by `aotpack build` or `aotpack pull`, or a "
                            "hf://owner/repo or file:///store reference")
    return path


def _verified_directory(path: Path) -> Path:
    verify_files(path, read_manifest(path))
    return path


# -- pull ------------------------------------------------------------------------------------------
def pull_package(repo: str, *, target: str = AUTO, revision: str | None = None, local_dir=None,
                 token: str | None = None, overwrite: bool = False,
                 progress: bool | Progress = False) -> PulledPackage:
    """Download one target's folder from a Hub repo or file store and verify every file.

    `target` is a target name or `auto` (this machine's; see `choose_target`). Without
    `local_dir`, Hub files land in the Hugging Face cache and file-store folders are used in place.
    """
    report = _report(progress)
    ref = parse_store_ref(repo, revision)
    if ref.target and target not in (AUTO, ref.target):
        raise PublishError(f"{repo!r} names target {ref.target!r} but --target is {target!r}",
                           "name the target once: in the reference or with --target")
    store = open_store(ref, token)
    index, commit = store.open_index()
    folder = choose_target(index, ref.target or target, store.display, report)
    report.info(f"pulling {folder} from {store.display}")
    local_dir = Path(local_dir) if local_dir else None
    entry = index["targets"][folder]

    def check(directory: Path) -> None:  # run on the staging copy, before it replaces anything
        try:
            check_pulled_package(directory, entry, store.display)
        except PackageIntegrityError as err:
            raise PackageIntegrityError(err.problem, store.repair_hint(local_dir)) from err

    files = sorted(entry["files"])  # plain names inside the folder (`parse_index` checked them)
    package_dir = store.fetch_target(folder, commit, local_dir, check=check, overwrite=overwrite, files=files)
    return PulledPackage(path=package_dir, target=folder, warning=runs_here_warning(index["targets"][folder]))


def choose_target(index: dict, requested: str, where: str, report: Progress | None = None) -> str:
    """The folder to pull: for a target name (or `auto`: this machine's target, or a published one of
    its GPU arch), the folder built with this machine's torch series; an exact folder name as it is."""
    targets = index["targets"]  # folder names that stay inside the repo (`parse_index` checked them)
    if "/" in requested and requested in targets:
        return requested  # an exact folder: `<target>/torch-<X.Y>`
    if requested != AUTO:
        if _by_target(targets, requested):
            return _pick_series(targets, requested, where)
        raise PublishError(f"{where} has no package for target {requested!r}; it has: {describe_targets(index)}",
                           f"pass --target with one of those, or build and push it: aotpack build --target "
                           f"{requested} && aotpack push PACKAGE {where}")
    from ..machine.compat import auto_target, gpu_arch, gpu_name

    arch = gpu_arch()
    try:
        preferred = auto_target()
    except PackageMismatchError:  # a GPU without a recipe: a package for its arch may still be published
        preferred = None
    if preferred and _by_target(targets, preferred):
        return _pick_series(targets, preferred, where)
    same_arch = sorted({entry_target(name, entry) for name, entry in targets.items()
                        if (entry.get("gpu_arch") or None) == arch})
    if same_arch:
        if report:
            report.info(f"{where} has no {preferred!r} package; using {same_arch[0]!r}, built for the same GPU "
                        f"arch ({arch})")
        return _pick_series(targets, same_arch[0], where)
    machine = f"{gpu_name()} ({arch})" if arch else "no CUDA GPU"
    raise PublishError(f"{where} has no package for this machine ({machine}, target {preferred or '?'}); "
                       f"it has: {describe_targets(index)}",
                       f"run on a machine with one of those GPUs, build and push this one (aotpack build --target "
                       f"{preferred or 'NAME'} && aotpack push PACKAGE {where}), or pass --target NAME to download "
                       "another anyway")


def _by_target(targets: dict, target: str) -> list[str]:
    return sorted(name for name, entry in targets.items() if entry_target(name, entry) == target)


def _pick_series(targets: dict, target: str, where: str) -> str:
    """Among the folders of `target`, the one built with this machine's torch series (older repos'
    single `<target>` folder when none is: it loads, or the loader says why not)."""
    import torch

    from ..machine.compat import torch_series

    here = torch_series(torch.__version__)
    names = _by_target(targets, target)
    matching = [name for name in names if entry_series(targets[name]) == here]
    if matching:
        return min(matching, key=lambda name: "/" not in name)  # the series folder before an old one
    legacy = [name for name in names if "/" not in name]
    if legacy:
        return legacy[0]
    series = sorted({entry_series(targets[name]) or "?" for name in names})
    raise PublishError(
        f"{where} has target {target!r} only for torch {', '.join(series)}; this machine has torch "
        f"{torch.__version__} (series {here}), and a package loads only with the torch series that built it",
        f"install torch=={series[-1]}.* here, or build and push {target} with torch {here} (aotpack build --target "
        f"{target} && aotpack push PACKAGE {where}), or pass --target {names[-1]} to download that one anyway")


def check_pulled_package(package_dir: Path, entry: dict, where: str) -> None:
    """The folder holds what the index promised: its manifest, for that target, with intact files."""
    manifest_path = package_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise PublishError(f"{where} lists target {entry['folder']!r} in {INDEX_NAME}, but its folder has no "
                           f"{MANIFEST_NAME}", f"push the {entry['folder']} package to {where} again")
    expected = entry["files"].get(MANIFEST_NAME)
    if expected and sha256_file(manifest_path) != expected:
        raise PackageIntegrityError(f"{manifest_path} does not match the sha256 {where} records for it in "
                                    f"{INDEX_NAME} (truncated, corrupted or tampered with)")
    manifest = read_manifest(package_dir)
    if manifest.target != entry_target(entry["folder"], entry):
        raise PackageMismatchError(f"folder {entry['folder']!r} of {where} holds a package for target "
                                   f"{manifest.target!r}",
                                   f"pull --target {manifest.target} if that is the one you want, and push the "
                                   f"{entry['folder']} package again to repair the repo")
    verify_files(package_dir, manifest)


def runs_here_warning(entry: dict) -> str | None:
    """Why a package described by an index entry would be refused on this machine (None if it would load)."""
    import torch

    from ..machine.compat import gpu_arch, targets_for_arch, torch_series

    arch = gpu_arch()
    if entry.get("device") == "cuda" and entry.get("gpu_arch") != arch:
        here = f"this machine's GPU is {arch}" if arch else "this machine has no CUDA GPU"
        return (f"target {entry['folder']!r} is built for {entry['gpu_arch']}; {here}, so it will not load here "
                f"(pull --target {' / '.join(targets_for_arch(arch)) or 'NAME'} for this machine)")
    if entry.get("torch") and torch_series(entry["torch"]) != torch_series(torch.__version__):
        return (f"target {entry['folder']!r} was built with torch {entry['torch']}; this is torch "
                f"{torch.__version__}, so it will not load here")
    return None


# -- push ------------------------------------------------------------------------------------------
def push_package(package, repo: str, *, revision: str | None = None, private: bool = False,
                 token: str | None = None, commit_message: str | None = None, create_pr: bool = False,
                 repair_index: bool = False, progress: bool | Progress = False):
    """Publish a package to `repo` (Hub id, `hf://…` or `file:///…`) in the folder named after its target.

    The repo's index and model card are merged with what is there (other targets are kept), and
    the package is verified before anything is uploaded. `repair_index` (file stores): a damaged
    index is written again from the store's verified package folders, the damaged file kept beside it.
    Returns a `PushResult`.
    """
    report = _report(progress)
    package_dir = locate_package(package)
    manifest = read_manifest(package_dir)
    verify_files(package_dir, manifest)  # never publish a package that would be refused at load
    ref = parse_store_ref(repo, revision)
    if ref.target:
        raise PublishError(f"{repo!r} names a folder ({ref.target!r}); push writes the folder named after the "
                           f"package's target ({manifest.target!r})", "pass the repo alone, without /TARGET")
    if ref.kind == "file" and (private or create_pr):
        raise PublishError(f"{'--private' if private else '--create-pr'} is a Hub feature; {ref} is a file store",
                           "drop the flag (file stores are as private as their directory's permissions)")
    if repair_index and ref.kind != "file":  # listing a Hub repo's folders again would download every package
        raise PublishError(f"--repair-index rewrites a file store's index from its folders; {ref} is a Hub repo",
                           f"restore the last good {INDEX_NAME} from the repo's history, or delete it and push each "
                           "target's package there again")
    store = open_store(ref, token)

    def make_plan(index_text: str | bytes | None, card_text: str | bytes | None):
        return plan_push(package_dir, manifest, parse_index(index_text, store.display), card_text, store.display)

    message = commit_message or (f"aotpack push {manifest.target} ({manifest.model['id']}, "
                                 f"torch {manifest.versions['torch']})")
    extra = {"repair_index": True} if repair_index else {}
    return store.push(make_plan, commit_message=message, private=private, create_pr=create_pr, report=report,
                      **extra)
