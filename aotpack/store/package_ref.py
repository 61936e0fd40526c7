"""Names of package repos: `owner/name` and `hf://owner/name[@rev][/target]` on the Hub, `file:///store[/target]`."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from urllib.parse import unquote

from ..errors import PublishError
from .manifest import MANIFEST_NAME
from .repo_layout import INDEX_NAME

# Where `aotpack build` writes when no --out is given (relative to the working directory).
DEFAULT_OUT = Path("artifacts") / "packages"

_SERIES = re.compile(r"torch-[0-9]+\.[0-9]+")

HUB_SCHEME = "hf://"
FILE_SCHEME = "file://"


@dataclasses.dataclass(frozen=True)
class StoreRef:
    kind: str  # "hub" or "file"
    location: str  # Hub repo id, or the store directory (absolute)
    revision: str | None = None
    target: str | None = None  # a target folder named in the reference itself

    def __str__(self) -> str:
        if self.kind == "file":
            return f"{FILE_SCHEME}{self.location}"
        return f"{HUB_SCHEME}{self.location}" + (f"@{self.revision}" if self.revision else "")


def is_store_ref(text) -> bool:
    """True for `hf://…` and `file://…` (a plain path stays a local package directory)."""
    return isinstance(text, str) and text.startswith((HUB_SCHEME, FILE_SCHEME))


def parse_store_ref(text: str, revision: str | None = None) -> StoreRef:
    """`text` as a repo reference; `revision` is `--revision` (it may not contradict `@rev`)."""
    text = str(text)
    if text.startswith(FILE_SCHEME):
        return _parse_file_ref(text, revision)
    if text.startswith(HUB_SCHEME):
        return _parse_hub_uri(text, revision)
    if Path(text).expanduser().is_dir():
        raise PublishError(f"{text!r} is a local directory, not a repo",
                           f"for a file store write it as {FILE_SCHEME}{Path(text).expanduser().resolve()}")
    _check_repo_id(text)
    return StoreRef("hub", text, revision)


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if repo_id.count("/") != 1:
            raise HFValidationError("it must be 'owner/name'")
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PublishError(f"{repo_id!r} is not a Hub repo id ({err})",
                           "pass owner/name (e.g. my-org/flux-dev-aotpack), hf://owner/name or file:///path") from err


def _parse_hub_uri(text: str, revision: str | None) -> StoreRef:
    from huggingface_hub import parse_hf_uri
    from huggingface_hub.errors import HfUriError

    try:
        uri = parse_hf_uri(text)
    except HfUriError as err:
        raise PublishError(f"{text!r} is not a Hub reference ({err})",
                           "write hf://owner/name[@REVISION][/TARGET], e.g. hf://my-org/flux-aot@v1/h100") from err
    if uri.type != "model":
        raise PublishError(f"{text!r} names a {uri.type}; aotpack packages live in model repos",
                           f"use hf://{uri.id} (a model repo)")
    if revision and uri.revision and revision != uri.revision:
        raise PublishError(f"{text!r} names revision {uri.revision!r} but --revision is {revision!r}",
                           "give the revision once: either @REV in the reference or --revision")
    target = uri.path_in_repo.strip("/") or None
    if target and (target.count("/") > 1 or ("/" in target and not _SERIES.fullmatch(target.split("/")[1]))):
        raise PublishError(f"{text!r} names {target!r} inside the repo; only a target folder can be named there",
                           f"use hf://{uri.id}[@REV]/TARGET or .../TARGET/torch-X.Y, e.g. hf://{uri.id}/h100")
    return StoreRef("hub", uri.id, revision or uri.revision, target)


def _parse_file_ref(text: str, revision: str | None) -> StoreRef:
    rest = unquote(text[len(FILE_SCHEME):])
    if rest.startswith("localhost/"):
        rest = rest[len("localhost"):]
    path = Path(rest).expanduser().resolve()  # `file://store` (no third slash) is taken as a relative path
    if revision:
        raise PublishError(f"file store {text!r} has no revisions (got revision {revision!r})",
                           "drop --revision/@REV; keep one store directory per release, e.g. file:///stores/v1.2")
    if (path / MANIFEST_NAME).is_file():  # file:///store/h100[/torch-X.Y]: a target folder (or any package)
        if _SERIES.fullmatch(path.name) and (path.parent.parent / INDEX_NAME).is_file():
            return StoreRef("file", str(path.parent.parent), None, f"{path.parent.name}/{path.name}")
        return StoreRef("file", str(path.parent), None, path.name)
    return StoreRef("file", str(path))
