"""A Hugging Face Hub stand-in at the HTTP boundary: huggingface_hub's own client code runs unchanged.

Installed with `huggingface_hub.set_client_factory` as an `httpx2.MockTransport`, so the real
HfApi / snapshot_download / hf_hub_download code (cache, offline mode, refs, pagination, ndjson
commits) talks to it. It serves the routes aotpack uses; files are uploaded in "regular" mode
(base64 inside the commit) because the LFS path goes through hf_xet's native client.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import itertools
import json
from urllib.parse import parse_qs, unquote

import httpx2
import yaml

ENDPOINT = "https://huggingface.co"


def _sha(*parts: bytes) -> str:
    return hashlib.sha1(b"\0".join(parts)).hexdigest()


@dataclasses.dataclass
class Commit:
    sha: str
    files: dict[str, bytes]
    message: str
    parent: str | None
    operations: list[dict]  # the ndjson lines of the commit (header excluded)


@dataclasses.dataclass
class Repo:
    private: bool
    refs: dict[str, str]  # branch or "refs/pr/N" -> commit sha
    tags: dict[str, str]
    commits: dict[str, Commit]


@dataclasses.dataclass
class Request:
    method: str
    path: str
    query: dict
    authorization: str | None


class FakeHub:
    def __init__(self, write_token: str):
        self.write_token = write_token
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.before_commit = None  # hook(repo_id, revision): simulates a concurrent push
        self._counter = itertools.count()

    # -- state helpers for tests -----------------------------------------------------------------
    def commit_log(self, repo_id: str) -> list[Commit]:
        """Commits other than the repo's initial one, oldest first."""
        return [c for c in self.repos[repo_id].commits.values() if c.parent is not None]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.refs.get(revision) or repo.tags[revision]].files

    def transport(self) -> httpx2.MockTransport:
        return httpx2.MockTransport(self.handle)

    # -- HTTP ------------------------------------------------------------------------------------
    def handle(self, request: httpx2.Request) -> httpx2.Response:
        raw = request.url.raw_path.decode()
        path, _, query = raw.partition("?")
        segments = [unquote(s) for s in path.strip("/").split("/")]
        self.requests.append(Request(request.method, path, parse_qs(query), request.headers.get("authorization")))
        route = self._route(request.method, segments)
        if route is None:
            return httpx2.Response(404, json={"error": f"fake hub has no route {request.method} {path}"})
        handler, args = route
        return handler(request, *args)

    def _route(self, method: str, s: list[str]):
        if method == "POST" and s == ["api", "repos", "create"]:
            return self._create_repo, ()
        if method == "POST" and s == ["api", "validate-yaml"]:
            return self._validate_yaml, ()
        if method == "GET" and s == ["api", "models"]:
            return self._list_models, ()
        if s[:2] == ["api", "models"] and len(s) >= 4:
            repo_id, action, rest = f"{s[2]}/{s[3]}", (s[4] if len(s) > 4 else "revision"), s[5:]
            if action == "revision" and method == "GET":
                return self._repo_info, (repo_id, rest[0] if rest else "main")
            if action == "tree" and method == "GET":
                return self._tree, (repo_id, rest[0])
            if action == "refs" and method == "GET":
                return self._refs, (repo_id,)
            if action == "branch" and method == "POST":
                return self._create_branch, (repo_id, "/".join(rest))
            if action == "preupload" and method == "POST":
                return self._preupload, (repo_id,)
            if action == "commit" and method == "POST":
                return self._commit, (repo_id, "/".join(rest))
        if len(s) >= 5 and s[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve, (f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]))
        return None

    # -- errors ------------------------------------------------------------------------------------
    @staticmethod
    def _error(status: int, code: str | None, message: str, headers: dict | None = None, **body) -> httpx2.Response:
        headers = {"X-Error-Message": message, **(headers or {})}
        if code:
            headers["X-Error-Code"] = code
        return httpx2.Response(status, json={"error": message, **body}, headers=headers)

    def _authorized(self, request) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.write_token}"

    def _repo(self, repo_id: str):
        return self.repos.get(repo_id)

    def _commit_of(self, repo: Repo, revision: str) -> str | None:
        if revision in repo.commits:
            return revision
        return repo.refs.get(revision) or repo.tags.get(revision)

    def _lookup(self, repo_id: str, revision: str):
        repo = self._repo(repo_id)
        if repo is None:
            return None, self._error(404, "RepoNotFound", "Repository not found")
        sha = self._commit_of(repo, revision)
        if sha is None:
            return None, self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo.commits[sha], None

    # -- routes --------------------------------------------------------------------------------------
    def _create_repo(self, request):
        if not self._authorized(request):
            return self._error(401, None, "Invalid credentials in Authorization header")
        body = json.loads(request.content)
        repo_id = f"{body['organization']}/{body['name']}"
        if repo_id in self.repos:
            return self._error(409, None, "You already created this model repo", url=f"{ENDPOINT}/{repo_id}")
        initial = Commit(_sha(repo_id.encode()), {".gitattributes": b"*.pt2 filter=lfs\n"}, "initial commit",
                         None, [])
        self.repos[repo_id] = Repo(private=body.get("visibility") == "private", refs={"main": initial.sha},
                                   tags={}, commits={initial.sha: initial})
        return httpx2.Response(200, json={"url": f"{ENDPOINT}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, request):
        content = json.loads(request.content)["content"]
        yaml.safe_load(content.split("---")[1])  # the front matter must parse
        return httpx2.Response(200, json={"errors": [], "warnings": []})

    def _list_models(self, request):
        author = parse_qs(request.url.query.decode()).get("author", [""])[0]
        return httpx2.Response(200, json=[{"id": r, "modelId": r} for r, repo in self.repos.items()
                                          if r.startswith(f"{author}/") and not repo.private])

    def _repo_info(self, request, repo_id, revision):
        commit, error = self._lookup(repo_id, revision)
        if error:
            return error
        return httpx2.Response(200, json={"id": repo_id, "sha": commit.sha, "private": self.repos[repo_id].private,
                                          "siblings": [{"rfilename": p} for p in sorted(commit.files)]})

    def _tree(self, request, repo_id, revision):
        commit, error = self._lookup(repo_id, revision)
        if error:
            return error
        return httpx2.Response(200, json=[{"type": "file", "path": p, "size": len(data),
                                           "oid": _sha(b"blob", data)} for p, data in sorted(commit.files.items())])

    def _refs(self, request, repo_id):
        repo = self._repo(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")

        def refs(names: dict, prefix: str):
            return [{"name": n, "ref": f"{prefix}{n}", "targetCommit": sha} for n, sha in names.items()
                    if not n.startswith("refs/")]

        return httpx2.Response(200, json={"branches": refs(repo.refs, "refs/heads/"),
                                          "tags": refs(repo.tags, "refs/tags/"), "converts": []})

    def _create_branch(self, request, repo_id, branch):
        if not self._authorized(request):
            return self._error(401, None, "Invalid credentials in Authorization header")
        repo = self._repo(repo_id)
        if branch in repo.refs:
            return self._error(409, None, "Reference already exists")
        body = json.loads(request.content or b"{}")
        repo.refs[branch] = self._commit_of(repo, body.get("startingPoint") or "main")
        return httpx2.Response(200, json={})

    def _preupload(self, request, repo_id):
        files = json.loads(request.content)["files"]
        return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                    for f in files]})

    def _commit(self, request, repo_id, revision):
        if not self._authorized(request):
            return self._error(403, None, "You don't have the rights to push to this repo")
        if self.before_commit:
            hook, self.before_commit = self.before_commit, None
            hook(repo_id, revision)
        repo = self._repo(repo_id)
        lines = [json.loads(line) for line in request.content.decode().splitlines() if line.strip()]
        header, operations = lines[0]["value"], lines[1:]
        head = self._commit_of(repo, revision)
        if head is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        if header.get("parentCommit") and header["parentCommit"] != head:
            return self._error(412, None, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[head].files)
        for op in operations:
            if op["key"] == "file":
                files[op["value"]["path"]] = base64.b64decode(op["value"]["content"])
            elif op["key"] == "deletedFile":
                files.pop(op["value"]["path"])
            else:
                raise AssertionError(f"fake hub does not handle {op['key']}")
        commit = Commit(_sha(head.encode(), str(next(self._counter)).encode()), files, header["summary"], head,
                        operations)
        repo.commits[commit.sha] = commit
        body = {"commitUrl": f"{ENDPOINT}/{repo_id}/commit/{commit.sha}", "commitOid": commit.sha}
        if "create_pr" in parse_qs(request.url.query.decode()):
            number = 1 + sum(ref.startswith("refs/pr/") for ref in repo.refs)
            repo.refs[f"refs/pr/{number}"] = commit.sha
            body["pullRequestUrl"] = f"{ENDPOINT}/{repo_id}/discussions/{number}"
        else:
            repo.refs[revision] = commit.sha
        return httpx2.Response(200, json=body)

    def _resolve(self, request, repo_id, revision, filename):
        commit, error = self._lookup(repo_id, revision)
        if error:
            return error
        if filename not in commit.files:
            return self._error(404, "EntryNotFound", f"{filename} does not exist",
                               headers={"X-Repo-Commit": commit.sha})
        data = commit.files[filename]
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{_sha(b"blob", data)}"', "Content-Length": str(len(data))}
        return httpx2.Response(200, headers=headers, content=b"" if request.method == "HEAD" else data)
