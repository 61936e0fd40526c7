"""Files at rest (issue 15 item 1): aotpack writes and deletes only its own output.

`build --out` never replaces a user's folder (or the working directory, or a parent of it); each
build stages in its own folder and swaps under a lock; `push` confines every manifest name to the
package and writes only under its target folder; `pull` verifies in a staging folder and never
deletes or overwrites files it did not write. Real packages (the session's tiny CPU package,
copied), real processes for the concurrency case.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from aotpack.builder.output import (
    OutputDir,
    OutputDirError,
    _locked,
    check_output_dir,
    removes_staging_on_error,
)
from aotpack.cli import cli
from aotpack.errors import ManifestError, PackageIntegrityError, PublishError
from aotpack.store.filestore import STALE_AFTER_S
from aotpack.store.inspect import inspect_package
from aotpack.store.manifest import MANIFEST_NAME, sha256_file
from aotpack.store.publish import pull_package, push_package
from aotpack.store.repo_layout import INDEX_NAME


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes' digest (to prove nothing was touched)."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    (path / "data").mkdir()
    (path / "data" / "results.csv").write_text("1,2,3")
    return path


@pytest.fixture
def package_copy(tiny_package, tmp_path):
    copy = tmp_path / "package"
    shutil.copytree(tiny_package, copy)
    return copy


def edit_manifest(package: Path, edit) -> None:
    path = package / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# -- build --out -------------------------------------------------------------------------------------
def test_build_refuses_a_user_folder_even_with_overwrite(tmp_path):
    folder = user_folder(tmp_path / "mine")
    before = snapshot(folder)
    for overwrite in (False, True):
        with pytest.raises(OutputDirError, match="not an aotpack package") as err:
            check_output_dir(folder, overwrite=overwrite)
        assert "thesis.tex" in err.value.problem and "even with --overwrite" in err.value.fix
    result = CliRunner().invoke(cli, ["build", "--model", "tiny", "--out", str(folder), "--overwrite"])
    assert result.exit_code == 1 and "not an aotpack package" in result.output
    assert "Traceback" not in result.output
    assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging folder left either


@pytest.mark.parametrize("out", [".", "..", "./", "sub/..", "CWD", "PARENT"])
def test_build_refuses_the_working_directory_and_its_parents(tmp_path, monkeypatch, out):
    work = user_folder(tmp_path / "work")
    monkeypatch.chdir(work)
    out = {"CWD": str(work), "PARENT": str(tmp_path)}.get(out, out)
    before = snapshot(tmp_path)
    with pytest.raises(OutputDirError, match="working directory or one of its parents"):
        check_output_dir(Path(out), overwrite=True)
    result = CliRunner().invoke(cli, ["build", "--model", "tiny", "--out", out, "--overwrite"])
    assert result.exit_code == 1 and "working directory" in result.output and "Traceback" not in result.output
    assert snapshot(tmp_path) == before


def test_build_refuses_a_file_a_symlink_and_an_existing_package_without_overwrite(tiny_package, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OutputDirError, match="not a folder"):
        check_output_dir(tmp_path / "file.txt")
    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(OutputDirError):
        check_output_dir(tmp_path / "link", overwrite=True)
    with pytest.raises(OutputDirError, match="already holds an aotpack package") as err:
        check_output_dir(tiny_package)
    assert "--overwrite" in err.value.fix
    assert check_output_dir(tiny_package, overwrite=True) == tiny_package
    assert check_output_dir(tmp_path / "new" / "pkg") == tmp_path / "new" / "pkg"
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty") == tmp_path / "empty"  # an empty folder holds nothing to lose


def test_build_into_an_existing_package_needs_overwrite(package_copy):
    before = snapshot(package_copy)
    result = CliRunner().invoke(cli, ["build", "--model", "tiny", "--out", str(package_copy)])
    assert result.exit_code == 1 and "already holds an aotpack package" in result.output
    assert "--overwrite" in result.output and "Traceback" not in result.output
    assert snapshot(package_copy) == before


@pytest.mark.parametrize("inside", ["sub", "a/b"])
def test_build_refuses_an_out_inside_a_package(package_copy, inside):
    """Its lock file and staging folder would land in the package, which would then fail `inspect`."""
    before = snapshot(package_copy.parent)
    with pytest.raises(OutputDirError, match="inside the aotpack package") as err:
        check_output_dir(package_copy / inside, overwrite=True)
    assert str(package_copy) in err.value.problem and "outside it" in err.value.fix
    result = CliRunner().invoke(cli, ["build", "--model", "tiny", "--out", str(package_copy / inside)])
    assert result.exit_code == 1 and "inside the aotpack package" in result.output
    assert "Traceback" not in result.output and "unexpected" not in result.output
    assert snapshot(package_copy.parent) == before
    assert sorted(p.name for p in package_copy.parent.iterdir()) == ["package"]
    inspect_package(package_copy)  # still verifies: nothing unlisted was added


def test_overwrite_refuses_a_package_holding_files_aotpack_did_not_write(package_copy):
    (package_copy / "NOTES.md").write_text("my notes")
    (package_copy / "images").mkdir()
    (package_copy / "images" / "a.png").write_bytes(b"png")
    before = snapshot(package_copy)
    for overwrite in (False, True):
        with pytest.raises(OutputDirError, match="did not write") as err:
            check_output_dir(package_copy, overwrite=overwrite)
        assert "'NOTES.md', 'images/a.png'" in err.value.problem and "move them out" in err.value.fix
    result = CliRunner().invoke(cli, ["build", "--model", "tiny", "--out", str(package_copy), "--overwrite"])
    assert result.exit_code == 1 and "NOTES.md" in result.output and "images/a.png" in result.output
    assert "Traceback" not in result.output
    assert snapshot(package_copy) == before
    assert sorted(p.name for p in package_copy.parent.iterdir()) == ["package"]


def test_a_broken_manifest_does_not_make_a_folder_replaceable(tmp_path):
    folder = user_folder(tmp_path / "mine")
    (folder / MANIFEST_NAME).write_text("not json")
    with pytest.raises(OutputDirError, match="not an aotpack package"):
        check_output_dir(folder, overwrite=True)


def _build_into(out: str, tag: str, delay: float) -> None:
    """One 'build': stage three files slowly, then swap (run in its own process)."""
    with OutputDir(out, overwrite=True) as staging:
        for name in ("a.pt2", "b.pt2"):
            (staging / name).write_text(tag)
            time.sleep(delay)
        files = {name: sha256_file(staging / name) for name in ("a.pt2", "b.pt2")}
        (staging / MANIFEST_NAME).write_text(json.dumps({"format_version": 1, "target": tag, "files": files}))


def test_concurrent_builds_into_one_out_never_mix(tmp_path):
    out = tmp_path / "pkg"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_build_into, args=(str(out), f"build-{i}", 0.05)) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    tags = {(out / name).read_text() for name in ("a.pt2", "b.pt2")}
    winner = json.loads((out / MANIFEST_NAME).read_text())["target"]
    assert tags == {winner}  # every file of the package comes from the same build
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "pkg"]
    assert leftovers == []  # staging folders, replaced packages and the lock file are all gone


def test_no_lock_file_stays_after_a_build(tiny_package, tmp_path):
    assert sorted(p.name for p in tiny_package.parent.iterdir()) == [tiny_package.name]  # a real build's
    with OutputDir(tmp_path / "pkg") as staging:
        (staging / MANIFEST_NAME).write_text(json.dumps({"format_version": 1, "target": "t", "files": {}}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def _take_turns(out: str, turns: int) -> None:
    """Enter `out`'s lock `turns` times; inside, no other process may be (a marker file tells)."""
    marker = Path(out).with_name("inside")
    for _ in range(turns):
        with _locked(Path(out)):
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # FileExistsError: two holders at once
            os.close(fd)
            time.sleep(0.002)
            marker.unlink()


def test_the_lock_holds_one_build_at_a_time_though_its_file_is_removed(tmp_path):
    """The holder removes the lock file; a waiter that locked the removed file must not enter beside a
    process that locked the new one (`_locked` checks its file is still the one at the path)."""
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_take_turns, args=(str(tmp_path / "pkg"), 40)) for _ in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert list(tmp_path.iterdir()) == []


def test_each_build_stages_in_its_own_folder_next_to_out(tmp_path):
    first, second = OutputDir(tmp_path / "pkg"), OutputDir(tmp_path / "pkg")
    a, b = first.open(), second.open()
    assert a != b and a.parent == b.parent == tmp_path and a.name.startswith(".pkg.aotpack-build-")
    first.discard(), second.discard()
    assert not a.exists() and not b.exists()


def test_a_failed_or_interrupted_build_leaves_out_as_it_was(tiny_package, tmp_path):
    out = tmp_path / "pkg"
    shutil.copytree(tiny_package, out)
    before = snapshot(out)

    @removes_staging_on_error
    def interrupted_build():
        output = OutputDir(out, overwrite=True)
        staging = output.open()
        (staging / "half.pt2").write_text("half")
        raise KeyboardInterrupt  # Ctrl-C in the middle of compiling

    with pytest.raises(KeyboardInterrupt):
        interrupted_build()
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def _open_and_die(out: str) -> None:
    """A build killed outright (SIGKILL, power loss) after it made its staging folder: no cleanup runs."""
    staging = OutputDir(out).open()
    (staging / "prologue.pt2").write_bytes(b"x" * 1000)
    os._exit(0)


def test_the_next_build_removes_staging_folders_of_dead_builds_only(tmp_path):
    out = tmp_path / "pkg"
    worker = multiprocessing.get_context("fork").Process(target=_open_and_die, args=(str(out),))
    worker.start()
    worker.join(30)
    (dead,) = [p for p in tmp_path.iterdir() if p.name.startswith(".pkg.aotpack-build-")]
    running = OutputDir(out)
    live = running.open()  # a build still running holds its staging folder's flock
    user_file = tmp_path / ".pkg.aotpack-build-notes.txt"  # not a folder: not ours
    user_file.write_text("mine")
    other = tmp_path / ".other.aotpack-build-abc"  # another --out's: left to builds into that one
    other.mkdir()
    mine = tmp_path / "pkg.aotpack-build-x"
    mine.mkdir()
    staging = OutputDir(out).open()
    assert not dead.exists() and live.exists() and staging.exists()
    assert user_file.read_text() == "mine" and other.exists() and mine.exists()
    running.discard()


def test_sigterm_mid_build_removes_the_staging_folder(tmp_path):
    """`timeout 60 aotpack build ...`: SIGTERM ends the build as Ctrl-C does, its staging folder removed."""
    work, log = tmp_path / "work", tmp_path / "build.log"
    work.mkdir()
    with open(log, "w") as output:
        build = subprocess.Popen([sys.executable, "-m", "aotpack", "build", "--model", "tiny", "--out", "x8"],
                                 cwd=work, env={**os.environ, "AOTPACK_DEBUG": ""}, stdout=output, stderr=output)
    try:
        deadline = time.monotonic() + 180
        while not any(p.name.startswith(".x8.aotpack-build-") for p in work.iterdir()):
            assert build.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        time.sleep(3)  # exporting and compiling by now
        build.send_signal(signal.SIGTERM)
        build.wait(timeout=120)
    finally:
        build.kill()
    printed = log.read_text()
    assert build.returncode == 130 and "interrupted" in printed and "Traceback" not in printed, printed
    assert list(work.iterdir()) == []  # no staging folder, no package, no lock file


def test_replacing_a_package_swaps_it_whole(tiny_package, tmp_path):
    out = tmp_path / "pkg"
    shutil.copytree(tiny_package, out)
    (out / "stale.pt2").write_text("from the previous build")  # a file the previous build wrote and listed
    edit_manifest(out, lambda d: d["files"].update({"stale.pt2": sha256_file(out / "stale.pt2")}))
    with OutputDir(out, overwrite=True) as staging:
        (staging / MANIFEST_NAME).write_text(json.dumps({"format_version": 1, "target": "new"}))
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pkg.aotpack-old")] == []


# -- push ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_name", ["/ABS/victim.txt", "../outside.txt", "sub/../../outside.txt", "a\\..\\b",
                                      "./prologue.pt2", ""])
def test_push_refuses_manifest_names_outside_the_package_before_reading_anything(package_copy, tmp_path,
                                                                                  bad_name):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "outside.txt").write_text("precious too")
    name = bad_name.replace("/ABS", str(tmp_path))
    edit_manifest(package_copy, lambda d: d["files"].update({name: "0" * 64}))
    store = tmp_path / "store"
    before = snapshot(tmp_path)
    with pytest.raises(ManifestError, match="manifest.files name") as err:
        push_package(package_copy, f"file://{store}")
    assert "rebuild" in err.value.fix
    assert snapshot(tmp_path) == before and not store.exists()


def test_push_refuses_a_symlink_that_leaves_the_package(package_copy, tmp_path):
    secret = tmp_path / "secret.key"
    secret.write_text("key")
    (package_copy / "epilogue.pt2").unlink()
    (package_copy / "epilogue.pt2").symlink_to(secret)
    with pytest.raises(PackageIntegrityError, match="outside the package"):
        push_package(package_copy, f"file://{tmp_path / 'store'}")
    assert secret.read_text() == "key" and not (tmp_path / "store").exists()


def test_push_removes_stale_incoming_folders_of_killed_pushes_only(tiny_package, tmp_path):
    store = tmp_path / "store"
    push_package(tiny_package, f"file://{store}")
    stale, fresh = store / ".incoming-cpu-dead", store / ".incoming-cpu-live"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "prologue.pt2").write_bytes(b"x" * 1000)
    old = time.time() - STALE_AFTER_S - 60
    os.utime(stale, (old, old))
    user = store / ".incoming-notes.txt"  # a file, not a staging folder: never touched
    user.write_text("mine")
    os.utime(user, (old, old))
    push_package(tiny_package, f"file://{store}")
    assert not stale.exists() and fresh.exists() and user.read_text() == "mine"


# -- pull ------------------------------------------------------------------------------------------------
def test_pull_refuses_to_replace_a_folder_with_files_it_did_not_write(tiny_package, tmp_path):
    store = tmp_path / "store"
    push_package(tiny_package, f"file://{store}")
    local = tmp_path / "local"
    final = pull_package(f"file://{store}", local_dir=local).path
    (final / "my-notes.md").write_text("mine")
    before = snapshot(local)
    with pytest.raises(PublishError, match="did not write") as err:
        pull_package(f"file://{store}", local_dir=local)
    assert "my-notes.md" in err.value.problem and "--overwrite" in err.value.fix
    assert snapshot(local) == before
    result = CliRunner().invoke(cli, ["pull", f"file://{store}", "--local-dir", str(local)])
    assert result.exit_code == 1 and "my-notes.md" in result.output and "Traceback" not in result.output
    pulled = pull_package(f"file://{store}", local_dir=local, overwrite=True)
    assert not (pulled.path / "my-notes.md").exists()


def test_pull_into_a_user_folder_without_a_manifest_is_refused(tiny_package, tmp_path):
    store = tmp_path / "store"
    push_package(tiny_package, f"file://{store}")
    local = tmp_path / "local"
    final = local / "cpu" / f"torch-{_series_here()}"
    user_folder(final)
    (local / INDEX_NAME).write_text("my own json")
    before = snapshot(local)
    with pytest.raises(PublishError, match="thesis.tex"):
        pull_package(f"file://{store}", local_dir=local)
    assert snapshot(local) == before
    shutil.rmtree(final)
    with pytest.raises(PublishError, match="not an aotpack index"):  # the index is not overwritten either
        pull_package(f"file://{store}", local_dir=local)
    assert (local / INDEX_NAME).read_text() == "my own json"


def test_a_damaged_store_copy_never_replaces_a_good_local_copy(tiny_package, tmp_path):
    store = tmp_path / "store"
    push_package(tiny_package, f"file://{store}")
    local = tmp_path / "local"
    pull_package(f"file://{store}", local_dir=local)
    good = snapshot(local)
    program = store / "cpu" / f"torch-{_series_here()}" / "double_block.pt2"
    data = bytearray(program.read_bytes())
    data[1000] ^= 0xFF
    program.write_bytes(bytes(data))
    with pytest.raises(PackageIntegrityError, match="double_block.pt2") as err:
        pull_package(f"file://{store}", local_dir=local)
    assert "nothing in" in err.value.fix
    assert snapshot(local) == good
    assert [p.name for p in local.iterdir() if p.name.startswith(".")] == []  # staging removed


def test_read_only_destinations_give_a_typed_error(tiny_package, tmp_path, monkeypatch):
    store = tmp_path / "store"
    push_package(tiny_package, f"file://{store}")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root ignores directory permissions (CI runs as root): the kernel's EACCES, simulated
        real_mkdir = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if locked in self.parents:
                raise PermissionError(13, "Permission denied", str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    try:
        with pytest.raises(PublishError, match="not writable") as err:
            pull_package(f"file://{store}", local_dir=locked / "sub")
        assert "--local-dir" in err.value.fix
        with pytest.raises(PublishError, match="not writable"):
            push_package(tiny_package, f"file://{locked / 'store'}")
    finally:
        locked.chmod(0o755)


def test_read_only_destination_as_root_via_a_file_in_the_way(tiny_package, tmp_path):
    """Root ignores permissions; a file where a folder must go fails the same way on every machine."""
    store = tmp_path / "store"
    push_package(tiny_package, f"file://{store}")
    (tmp_path / "blocked").write_text("a file")
    with pytest.raises(PublishError) as err:
        pull_package(f"file://{store}", local_dir=tmp_path / "blocked" / "sub")
    assert "blocked" in str(err.value)
    assert (tmp_path / "blocked").read_text() == "a file"


# -- layout by torch series (issue 14 item 2) -------------------------------------------------------
def _series_here() -> str:
    import torch

    from aotpack.machine.compat import torch_series

    return torch_series(torch.__version__)


def _built_with_torch(package: Path, dest: Path, version: str) -> Path:
    shutil.copytree(package, dest)
    edit_manifest(dest, lambda d: d["versions"].update(torch=version))
    return dest


def test_each_torch_series_gets_its_own_folder_and_pull_picks_the_local_one(tiny_package, tmp_path):
    store = tmp_path / "store"
    older = _built_with_torch(tiny_package, tmp_path / "older", "2.9.1+cu128")
    push_package(older, f"file://{store}")
    with pytest.raises(PublishError) as err:  # only another series is published: say which
        pull_package(f"file://{store}")
    here = _series_here()
    assert "only for torch 2.9" in err.value.problem and f"series {here}" in err.value.problem
    assert "install torch==2.9.*" in err.value.fix and "--target cpu/torch-2.9" in err.value.fix

    result = push_package(tiny_package, f"file://{store}")
    assert result.url == f"file://{store}/cpu/torch-{here}"
    assert (store / "cpu" / "torch-2.9" / MANIFEST_NAME).is_file()  # the older series is kept
    index = json.loads((store / INDEX_NAME).read_text())
    assert sorted(index["targets"]) == sorted(["cpu/torch-2.9", f"cpu/torch-{here}"])
    assert index["targets"]["cpu/torch-2.9"]["torch_series"] == "2.9"
    assert pull_package(f"file://{store}").path == store / "cpu" / f"torch-{here}"
    assert pull_package(f"file://{store}", target="cpu/torch-2.9").target == "cpu/torch-2.9"
    from aotpack.store.publish import locate_package

    assert locate_package(f"file://{store}/cpu/torch-{here}") == store / "cpu" / f"torch-{here}"


def test_an_older_repo_layout_still_loads(tiny_package, tmp_path):
    """Repos pushed before the series was in the layout hold `<target>/manifest.json`, indexed as `<target>`."""
    from aotpack.store.repo_layout import index_entry, now_utc, render_index

    store = tmp_path / "store"
    shutil.copytree(tiny_package, store / "cpu")
    from aotpack.store.manifest import read_manifest

    entry = index_entry(read_manifest(store / "cpu"), store / "cpu", now_utc())
    entry = {k: v for k, v in entry.items() if k not in ("target", "torch_series")} | {"folder": "cpu"}
    (store / INDEX_NAME).write_text(render_index({"format_version": 1, "library": "aotpack",
                                                  "targets": {"cpu": entry}}))
    assert pull_package(f"file://{store}").path == store / "cpu"
    local = pull_package(f"file://{store}", local_dir=tmp_path / "local").path
    assert local == tmp_path / "local" / "cpu"
    push_package(tiny_package, f"file://{store}")  # a new push adds the series folder beside the old one
    here = _series_here()
    assert pull_package(f"file://{store}").path == store / "cpu" / f"torch-{here}"
    assert pull_package(f"file://{store}", target="cpu").path == store / "cpu" / f"torch-{here}"
    assert pull_package(f"file://{store}/cpu").path == store / "cpu" / f"torch-{here}"
    from aotpack.store.manifest import verify_files

    verify_files(store / "cpu", read_manifest(store / "cpu"))  # the old package ignores the nested new one
