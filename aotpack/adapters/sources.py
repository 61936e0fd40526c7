"""Where an adapter comes from: a local file (or a diffusers LoRA folder) or a file on the Hub.

Hub files go through the huggingface_hub cache (`HF_HOME`, `HF_HUB_OFFLINE`, `HF_TOKEN` honoured),
so a cached adapter loads offline. Pickle files are refused before anything is downloaded.
"""

from __future__ import annotations

import dataclasses
import os
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
            stat = path.stat()
            return ("file", str(path.resolve()), stat.st_size, stat.st_mtime_ns)
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
        return AdapterSource(text.removeprefix("hf://"), weight_name, revision)
    path = Path(text).expanduser()
    looks_local = (path.exists() or text.startswith((".", "/", "~")) or text.count("/") < 2
                   or Path(text.split("/", 1)[0]).is_dir())
    if looks_local and not text.startswith("hf://"):
        return AdapterSource(text, None, revision)
    return _parse_hub_file(text if text.startswith("hf://") else f"hf://{text}", revision)


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
    if not source.is_hub:
        path = Path(source.location).expanduser()
        if path.is_dir():
            return _file_in_folder(path)
        if not path.exists():
            raise AdapterFileError(
                f"adapter file {source.location} does not exist",
                "check the path; a Hub adapter is named owner/repo/file.safetensors")
        return path
    if Path(source.weight_name).suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterFileError(
            f"adapter {source.describe()} is a pickle file; it is neither downloaded nor loaded "
            "(unpickling can run code)", "use the repository's .safetensors file")
    return _download(source)


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
        raise AdapterUnavailableError(
            f"adapter {source.describe()} is not in the local Hugging Face cache and cannot be downloaded "
            f"({type(err).__name__})",
            "connect to the network once (unset HF_HUB_OFFLINE), or point HF_HOME at a cache that holds it") from err
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as err:
        raise AdapterFileError(f"adapter {source.describe()} could not be found on the Hub ({type(err).__name__})",
                               "check the repo id, file name and revision") from err
    except HfHubHTTPError as err:
        raise AdapterUnavailableError(f"adapter {source.describe()} could not be downloaded ({err})",
                               "retry, or check HF_TOKEN and the network") from err
