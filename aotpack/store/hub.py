"""The Hugging Face Hub as a package store; huggingface_hub does transport, auth, cache and progress.

Tokens come from `--token`, else HF_TOKEN or the saved login (resolved by huggingface_hub); they
are only ever handed to huggingface_hub, never formatted into a message.
"""

from __future__ import annotations

import contextlib
import functools
import re
from pathlib import Path
from urllib.parse import quote

from .. import __version__
from ..errors import PublishError
from ..progress import Progress
from .local_copy import pull_into
from .package_ref import StoreRef
from .repo_layout import CARD_NAME, INDEX_NAME, PushPlan, PushResult, parse_index

# A concurrent push (CI pushes every target at once) moves the branch between our read of the
# index and our commit; the Hub then refuses the commit (parent_commit) and we merge again.
PUSH_ATTEMPTS = 5
_CONFLICT_STATUSES = (409, 412)
_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


class HubStore:
    def __init__(self, ref: StoreRef, token: str | None = None):
        self.repo_id = ref.location
        self.revision = ref.revision
        self.display = str(ref)
        self._token = token

    @functools.cached_property
    def api(self):
        from huggingface_hub import HfApi

        return HfApi(token=self._token, library_name="aotpack", library_version=__version__)

    def _download_options(self) -> dict:
        return {"token": self._token, "library_name": "aotpack", "library_version": __version__}

    # -- pull --------------------------------------------------------------------------------------
    def open_index(self) -> tuple[dict, str | None]:
        """The index at the revision, and the commit it was read at (so the files come from the same one)."""
        from huggingface_hub import snapshot_download

        with self._errors("read", "read the index of"):
            root = Path(snapshot_download(self.repo_id, revision=self.revision, allow_patterns=[INDEX_NAME],
                                          **self._download_options()))
        path = root / INDEX_NAME
        if not path.is_file():
            raise PublishError(f"{self.display} has no {INDEX_NAME}: no package was pushed there with `aotpack push`",
                               f"push one first (aotpack push PACKAGE {self.repo_id}), or check the repo name; a "
                               "model repo such as black-forest-labs/FLUX.1-dev belongs in --model")
        # snapshot folders are named after their commit (huggingface_hub's cache layout)
        commit = root.name if _COMMIT_HASH.fullmatch(root.name) else self.revision
        return parse_index(path.read_bytes(), self.display), commit

    def fetch_target(self, folder: str, commit: str | None, local_dir: Path | None, check=None,
                     overwrite: bool = False, files: list[str] | None = None) -> Path:
        """The target folder: in the Hugging Face cache, or under `local_dir` after being downloaded
        into a staging folder there and checked with `check(folder_path)` (a damaged download never
        replaces a good local copy, and files aotpack did not write are never touched)."""
        from huggingface_hub import snapshot_download

        # only the files the index lists: an older repo's `<target>/*` would also match `<target>/torch-*/`
        patterns = [f"{folder}/{name}" for name in files] if files else [f"{folder}/*"]
        patterns.append(INDEX_NAME)
        if local_dir is None:
            with self._errors("read", f"download {folder}/ from"):
                root = snapshot_download(self.repo_id, revision=commit, allow_patterns=patterns,
                                         **self._download_options())
            path = Path(root) / folder
            if check is not None:
                check(path)
            return path

        def fill(staging: Path):
            with self._errors("read", f"download {folder}/ from"):
                snapshot_download(self.repo_id, revision=commit, allow_patterns=patterns, local_dir=staging,
                                  **self._download_options())
            index = staging / INDEX_NAME
            return staging / folder, index.read_text() if index.is_file() else None

        return pull_into(Path(local_dir), folder, fill, check, overwrite)

    def repair_hint(self, local_dir: Path | None) -> str:
        """How to get good copies of files that failed verification."""
        if local_dir is not None:
            return f"pull again (nothing in {local_dir} was replaced)"
        # the cache keeps blobs by etag: deleting the snapshot folder alone would bring the bad blob back
        return f"remove the cached copy (hf cache rm hf://models/{self.repo_id}) and pull again"

    # -- push --------------------------------------------------------------------------------------
    def push(self, make_plan, *, commit_message: str, private: bool = False, create_pr: bool = False,
             report: Progress) -> PushResult:
        """Commit the plan `make_plan(index_text, card_text)` makes from the repo's current state."""
        from huggingface_hub.errors import HfHubHTTPError

        with self._errors("write", "push to"):
            self.api.create_repo(self.repo_id, private=private, exist_ok=True)
            for attempt in range(1, PUSH_ATTEMPTS + 1):
                head = self._head(create_branch=not create_pr, report=report)
                plan = make_plan(self._read_bytes(INDEX_NAME, head), self._read_bytes(CARD_NAME, head))
                report.info(f"uploading {len(plan.uploads)} files to {self.display}/{plan.folder}")
                try:
                    info = self.api.create_commit(self.repo_id, self._operations(plan), commit_message=commit_message,
                                                  revision=self.revision, create_pr=create_pr, parent_commit=head)
                except HfHubHTTPError as err:
                    if _status(err) in _CONFLICT_STATUSES and attempt < PUSH_ATTEMPTS:
                        report.info(f"{self.display} moved while pushing (another push?); merging the index again")
                        continue
                    raise
                return PushResult(target=plan.folder, url=self.folder_url(plan.folder), pr_url=info.pr_url,
                                  commit=info.oid)
        raise AssertionError("unreachable")

    def folder_url(self, folder: str) -> str:
        from huggingface_hub import constants

        return f"{constants.ENDPOINT}/{self.repo_id}/tree/{quote(self.revision or 'main', safe='')}/{folder}"

    def _head(self, *, create_branch: bool, report: Progress) -> str:
        """The commit the revision points at; a missing branch is created (as `hf upload` does)."""
        from huggingface_hub.errors import RevisionNotFoundError

        try:
            return self.api.repo_info(self.repo_id, revision=self.revision).sha
        except RevisionNotFoundError:
            if not (create_branch and self.revision):
                raise
        report.info(f"creating branch {self.revision!r} in {self.repo_id}")
        self.api.create_branch(self.repo_id, branch=self.revision, exist_ok=True)
        return self.api.repo_info(self.repo_id, revision=self.revision).sha

    def _read_bytes(self, name: str, commit: str) -> bytes | None:
        """A repo file as bytes (the index's and the card's parsers report bytes that are not text), None if absent."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, RemoteEntryNotFoundError

        try:
            return Path(hf_hub_download(self.repo_id, name, revision=commit, **self._download_options())).read_bytes()
        except (EntryNotFoundError, RemoteEntryNotFoundError):
            return None

    @staticmethod
    def _operations(plan: PushPlan) -> list:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        return ([CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(local))
                 for path, local in plan.uploads.items()]
                + [CommitOperationAdd(path_in_repo=INDEX_NAME, path_or_fileobj=plan.index_text.encode()),
                   CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=plan.card_text.encode())]
                + [CommitOperationDelete(path_in_repo=path) for path in plan.stale])

    # -- errors ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, access: str, action: str):
        """huggingface_hub's exceptions as PublishError naming the repo and the fix."""
        import httpx2
        from huggingface_hub import constants
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            yield
        except GatedRepoError as err:
            raise PublishError(f"{self.repo_id} is gated: cannot {action} it without accepted access",
                               f"accept its conditions on {constants.ENDPOINT}/{self.repo_id} and pass a token "
                               "(--token, HF_TOKEN or `hf auth login`)") from err
        except RepositoryNotFoundError as err:
            raise PublishError(f"Hub repo {self.repo_id!r} does not exist, or is private and the token in use "
                               "cannot see it", self._missing_repo_fix()) from err
        except RevisionNotFoundError as err:
            raise PublishError(f"revision {self.revision!r} does not exist in {self.repo_id}",
                               self._missing_revision_fix()) from err
        except (OfflineModeIsEnabled, LocalEntryNotFoundError) as err:
            if access == "write":
                raise PublishError(f"cannot {action} {self.display}: the Hub is unreachable (HF_HUB_OFFLINE is set or "
                                   "there is no network)", "unset HF_HUB_OFFLINE and check the network") from err
            raise PublishError(f"cannot {action} {self.display}: the Hub is unreachable (HF_HUB_OFFLINE is set or "
                               "there is no network) and the Hugging Face cache does not hold it",
                               f"pull it once with network access (aotpack pull {self.display}); later runs with "
                               "HF_HUB_OFFLINE=1 read it from the cache") from err
        except HfHubHTTPError as err:
            status = _status(err)
            if status in (401, 403):
                raise PublishError(f"the Hub refused to let this token {action} {self.repo_id} (HTTP {status}: "
                                   f"{err.server_message or 'forbidden'})",
                                   f"use a token with {access} access to the repo: --token, HF_TOKEN or "
                                   "`hf auth login`") from err
            raise PublishError(f"the Hub failed to {action} {self.display}: {err}",
                               "retry later; AOTPACK_DEBUG=1 shows the full error") from err
        except httpx2.TransportError as err:
            raise PublishError(f"cannot reach {constants.ENDPOINT} to {action} {self.display} "
                               f"({type(err).__name__})", "check the network, proxy and HF_ENDPOINT") from err

    def _missing_repo_fix(self) -> str:
        owner = self.repo_id.split("/")[0]
        try:
            names = sorted(m.id for m in self.api.list_models(author=owner, filter="aotpack", limit=20))
        except Exception:  # only a hint: the owner may not exist or the Hub may be unreachable
            names = []
        seen = f"aotpack repos visible under {owner}: {', '.join(names)}" if names else \
            f"no aotpack repos are visible under {owner}"
        return f"check the name ({seen}); for a private repo pass --token or set HF_TOKEN (or `hf auth login`)"

    def _missing_revision_fix(self) -> str:
        try:
            refs = self.api.list_repo_refs(self.repo_id)
            existing = (f"branches: {', '.join(b.name for b in refs.branches) or 'none'}; "
                        f"tags: {', '.join(t.name for t in refs.tags) or 'none'}")
        except Exception:  # only a hint (offline, or no access to list refs)
            existing = "see the branches and tags on the repo page"
        return f"pass an existing revision ({existing}) with --revision or hf://{self.repo_id}@REV"


def _status(err) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)
