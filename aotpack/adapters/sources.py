"""Where an adapter comes from: a local file (or a diffusers LoRA folder) or a file on the Hub.

Hub files go through the huggingface_hub cache (`HF_HOME`, `HF_HUB_OFFLINE`, `HF_TOKEN` honoured),
so a cached adapter loads offline. Pickle files are refused before anything is downloaded.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from ..errors import AdapterFileError, AdapterUnavailableError
from .files import PICKLE_SUFFIXES

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes


@dataclasses.dataclass(frozen=True)
class AdapterSource:
    """A local path, or `repo_id` + `weight_name` (+ `revision`) on the Hub."""

    location: str
    weight_name: str | None = None
    revision: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.weight_name is not None

    def describe(self) -> str:
        if not self.is_hub:
            return self.location
        return f"{self.location}/{self.weight_name}" + (f"@{self.revision}" if self.revision else "")

    def cache_key(self) -> tuple:
        """Identity for the adapter cache: a local file changes key when it is rewritten; a Hub file
        is keyed by name and revision (so switching to a cached Hub adapter makes no network call)."""
        if self.is_hub:
            return ("hub", self.location, self.weight_name, self.revision)
        path = Path(self.location).expanduser()
        if path.is_dir():
            path = _file_in_folder(path)
        if path.is_file():
            # inode and ctime too: `cp -p`, `rsync -a`, `tar x` or `os.replace` of a file whose mtime was kept give
            # new bytes with the old size and mtime (a retrained LoRA of the same rank has the same size); ctime
            # cannot be set back, and a replaced file is a new inode
            stat = path.stat()
            return ("file", str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_dev, stat.st_ino,
                    stat.st_ctime_ns)
        return ("file", str(path))


def adapter_source(source, *, weight_name: str | None = None, revision: str | None = None) -> AdapterSource:
    """Interpret `source`: an existing path, `[hf://]owner/repo[@revision]/[sub/]file.safetensors`, or
    `owner/repo` with `weight_name`. A missing path that does not look like a Hub file name is reported
    as missing; so is one whose first folder exists here (`loras/sub/x.safetensors`: a typo in a local
    path, not a Hub repo `loras/sub`; `hf://` says Hub explicitly)."""
    if isinstance(source, AdapterSource):
        return source
    text = os.fspath(source)
    if weight_name is not None:
        if not text.startswith("hf://") and Path(text).expanduser().is_dir():
            # diffusers' load_lora_weights("my_lora_dir", weight_name="x.safetensors") reads the folder's file
            return AdapterSource(str(Path(text) / weight_name), None, None)
        return AdapterSource(text.removeprefix("hf://"), weight_name, revision)
    _refuse_urls(text)
    path = Path(text).expanduser()
    looks_local = (path.exists() or text.startswith((".", "/", "~")) or text.count("/") < 2
                   or Path(text.split("/", 1)[0]).is_dir() or _WINDOWS_PATH.match(text) is not None or "\\" in text)
    if looks_local and not text.startswith("hf://"):
        return AdapterSource(text, None, revision)
    if not text.startswith("hf://"):
        try:
            return _parse_hub_file(f"hf://{text}", revision)
        except AdapterFileError as err:
            from huggingface_hub.errors import HfUriError

            if isinstance(err.__cause__, HfUriError):  # no Hub file is named so (a space or unicode in a repo
                return AdapterSource(text, None, revision)  # id): a local path that does not exist
            raise
    return _parse_hub_file(text, revision)


_WINDOWS_PATH = re.compile(r"^[A-Za-z]:[\\/]")  # C:\... or C:/...: a drive, never a Hub repo
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_HUB_URL = re.compile(r"^https?://(?:www\.)?(?:huggingface\.co|hf\.co)/(?P<repo>[^/]+/[^/]+)/(?:resolve|blob)/"
                      r"(?P<revision>[^/]+)/(?P<path>.+?)(?:\?.*)?$")


def _refuse_urls(text: str) -> None:
    """A URL is not read (aotpack downloads Hub files only, through the HF cache): a typed error naming the hf://
    reference of a Hub file's URL, instead of a Hub-id parse error about 'https:/'."""
    if not _URL.match(text) or text.startswith("hf://"):
        return
    hub = _HUB_URL.match(text)
    if hub:
        from urllib.parse import unquote

        revision = unquote(hub["revision"])
        suggestion = f"hf://{hub['repo']}{'' if revision == 'main' else '@' + revision}/{unquote(hub['path'])}"
        raise AdapterFileError(f"adapter {text!r} is a URL; Hub files are named by reference, not URL",
                               f"write {suggestion}")
    raise AdapterFileError(f"adapter {text!r} is a URL; aotpack reads local files and Hub files only",
                           "download the file and pass its path, or name a Hub file as "
                           "hf://owner/repo[@REVISION]/file.safetensors")


def _parse_hub_file(uri: str, revision: str | None) -> AdapterSource:
    """`hf://owner/repo[@revision]/path` through huggingface_hub's own parser (revisions such as
    `refs/pr/3` hold slashes: only the Hub's rules can tell them from the path)."""
    from huggingface_hub import parse_hf_uri
    from huggingface_hub.errors import HfUriError

    try:
        parsed = parse_hf_uri(uri)
    except HfUriError as err:
        raise AdapterFileError(f"adapter {uri!r} is not a Hub file reference ({err})",
                               "write hf://owner/repo[@REVISION]/file.safetensors, or a local path") from err
    if parsed.type != "model":
        raise AdapterFileError(f"adapter {uri!r} is in a {parsed.type} repository; adapters are read from model "
                               "repos", f"use hf://{parsed.id}/... of a model repo, or download the file")
    if ".." in parsed.path_in_repo.split("/") or "\\" in parsed.path_in_repo:
        raise AdapterFileError(f"adapter {uri!r} names the file {parsed.path_in_repo!r}, which leaves the repository "
                               "('..' or a backslash)", "name a file inside the repo: hf://owner/repo/sub/file.safetensors")
    if not parsed.path_in_repo.strip("/"):
        raise AdapterFileError(f"adapter {uri!r} names a repository, not a file in it",
                               f"add the file: hf://{parsed.id}/pytorch_lora_weights.safetensors")
    if revision and parsed.revision and revision != parsed.revision:
        raise AdapterFileError(f"adapter {uri!r} names revision {parsed.revision!r} but {revision!r} is also given",
                               "give the revision once")
    return AdapterSource(parsed.id, parsed.path_in_repo.strip("/"), parsed.revision or revision)


def _file_in_folder(folder: Path) -> Path:
    """The adapter file of a folder: diffusers' default name, or its only .safetensors file."""
    if (folder / DIFFUSERS_WEIGHT_NAME).is_file():
        return folder / DIFFUSERS_WEIGHT_NAME
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0]
    raise AdapterFileError(
        f"adapter folder {folder} holds {len(candidates)} .safetensors files ({[c.name for c in candidates][:4]})",
        "pass the file itself")


def local_path(source: AdapterSource) -> Path:
    """A local file for `source`, downloading Hub files into (or reading them from) the HF cache."""
    return resolve_file(source)[0]


def resolve_file(source: AdapterSource) -> tuple[Path, str | None]:
    """(`local_path(source)`, the commit hash of the Hub snapshot that file is in; None for a local file)."""
    if not source.is_hub:
        path = Path(source.location).expanduser()
        if path.is_dir():
            return _file_in_folder(path), None
        if not path.exists():
            raise AdapterFileError(
                f"adapter file {source.location} does not exist",
                "check the path; a Hub adapter is named owner/repo/file.safetensors")
        return path, None
    if Path(source.weight_name).suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterFileError(
            f"adapter {source.describe()} is a pickle file; it is neither downloaded nor loaded "
            "(unpickling can run code)", "use the repository's .safetensors file")
    path = _download(source)
    return path, _commit_hash(source, path)


def _commit_hash(source: AdapterSource, path: Path) -> str:
    """The commit of the cached snapshot `path` (what `hf_hub_download` returned) is part of. huggingface_hub
    says it: a dry run on local files only (no network call) resolves the revision through the cache's refs
    and names the file it maps to. If that is another file (the ref moved between the two calls, or a cache
    that could not be written kept an older ref), the commit is the snapshot folder the cache layout names
    `snapshots/<commit_hash>/<filename>`."""
    from huggingface_hub import hf_hub_download

    try:
        info = hf_hub_download(source.location, source.weight_name, revision=source.revision, dry_run=True,
                               local_files_only=True)
        if Path(info.local_path) == path:
            return info.commit_hash
    except Exception:  # a lookup only (the file itself was found): the layout below says it too
        pass
    return path.parents[len(Path(source.weight_name).parts) - 1].name


def _download(source: AdapterSource) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(hf_hub_download(source.location, source.weight_name, revision=source.revision))
    except GatedRepoError as err:
        raise AdapterFileError(f"adapter {source.describe()} is in a gated repository ({err})",
                               "accept its terms on the Hub and set HF_TOKEN") from err
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        from huggingface_hub import constants

        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
               else "the Hub could not be reached")
        raise AdapterUnavailableError(
            f"adapter {source.describe()} is not in the local Hugging Face cache and cannot be downloaded: {why} "
            f"({type(err).__name__})",
            ("unset HF_HUB_OFFLINE to download it once" if constants.HF_HUB_OFFLINE else
             "check the network or HF_ENDPOINT and retry") +
            f", or point HF_HOME at a cache that holds it (now {constants.HF_HUB_CACHE})") from err
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as err:
        raise AdapterFileError(f"adapter {source.describe()} could not be found on the Hub ({type(err).__name__})",
                               "check the repo id, file name and revision") from err
    except HfHubHTTPError as err:
        raise AdapterUnavailableError(f"adapter {source.describe()} could not be downloaded ({err})",
                               "retry, or check HF_TOKEN and the network") from err
    except ValueError as err:  # huggingface_hub's own checks of the name (e.g. a '..' segment)
        raise AdapterFileError(f"adapter {source.describe()} is not a valid Hub file name ({err})",
                               "name a file inside the repo: hf://owner/repo/sub/file.safetensors") from err
    except OSError as err:  # the HF cache cannot be written (permissions, disk full)
        raise AdapterUnavailableError(f"adapter {source.describe()} could not be stored in the Hugging Face cache "
                                      f"({type(err).__name__}: {err})",
                                      "free disk space or point HF_HOME at a writable folder") from err
