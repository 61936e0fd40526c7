"""Review leftovers: the manifest's shape ranges checked against the programs' own record, a damaged file-store
index repaired from the packages present, one `enclosing_package()` for build and pull, and `GET /v1/adapters`
without the server's file paths. Real packages (the session's tiny CPU build) and a real server on loopback."""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from pathlib import Path, PurePosixPath

import pytest
import torch
from click.testing import CliRunner

import aotpack
from aotpack.cli import cli
from aotpack.errors import PackageMismatchError, PublishError
from aotpack.machine.compat import torch_series
from aotpack.runtime import program as program_files
from aotpack.store.manifest import MANIFEST_NAME, read_manifest, sha256_file, verify_files
from aotpack.store.program_metadata import METADATA_NAME, read_program_metadata
from aotpack.store.publish import pull_package, push_package
from aotpack.store.repo_layout import INDEX_NAME

SERIES = f"torch-{torch_series(torch.__version__)}"
CPU, H100 = f"cpu/{SERIES}", f"h100/{SERIES}"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def files_under(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def package_copy(tiny_package, tmp_path):
    return Path(shutil.copytree(tiny_package, tmp_path / "package"))


def edit_manifest(package: Path, change) -> None:
    data = json.loads((package / MANIFEST_NAME).read_text())
    change(data)
    (package / MANIFEST_NAME).write_text(json.dumps(data, indent=2))


# -- 1. shapes: the manifest's ranges are the ones the programs were compiled for --------------------------------
def test_each_program_records_the_shape_ranges_it_was_compiled_for(tiny_package):
    manifest = read_manifest(tiny_package)
    for spec in manifest.programs:
        assert read_program_metadata(tiny_package / spec.file)["shapes"] == manifest.shapes, spec.file


def _without_shape_records(package: Path) -> None:
    """The package as a build from before shape records: each program's aotpack.json lacks `shapes`."""
    files = {}
    for spec in read_manifest(package).programs:
        path = package / spec.file
        with zipfile.ZipFile(path) as source:
            entries = [(info, source.read(info)) for info in source.infolist()]
        with zipfile.ZipFile(path, "w") as target:
            for info, data in entries:
                if PurePosixPath(info.filename).name == METADATA_NAME:
                    record = json.loads(data)
                    del record["shapes"]
                    data = json.dumps(record).encode()
                target.writestr(info, data)
        files[spec.file] = sha256_file(path)
    edit_manifest(package, lambda d: d["files"].update(files))


@pytest.mark.parametrize("name, bounds", [("image_tokens", [16, 16384]), ("batch", [1, 8]),
                                          ("text_tokens", [8, 256])])
def test_a_manifest_whose_shapes_differ_from_the_programs_is_refused_before_any_program_opens(
        package_copy, monkeypatch, name, bounds):
    compiled = read_manifest(package_copy).shapes[name]
    edit_manifest(package_copy, lambda d: d["shapes"].update({name: bounds}))

    def opened(*args, **kwargs):
        raise AssertionError(f"a compiled program was opened ({args}): the check came too late")

    monkeypatch.setattr(program_files, "open_program", opened)
    with pytest.raises(PackageMismatchError) as caught:
        aotpack.load(package_copy, model="tiny")
    assert f"manifest shapes.{name} is {bounds}" in caught.value.problem
    assert f"compiled for {name} {compiled}" in caught.value.problem
    assert "do not edit manifest.json" in caught.value.fix
    inspected = invoke("inspect", package_copy)
    assert inspected.exit_code == 1 and f"shapes.{name}" in inspected.output and "Traceback" not in inspected.output
    # packages built before the record existed: verified by sha256 only, as for max_rank (docs/reliability.md)
    _without_shape_records(package_copy)
    verify_files(package_copy, read_manifest(package_copy))


# -- 2. a damaged file-store index: repaired from the packages in the store, nothing dropped silently -----------
def retargeted(package: Path, dest: Path) -> Path:
    shutil.copytree(package, dest)
    edit_manifest(dest, lambda d: d.update(target="h100", device="cuda", gpu_arch="sm_90"))
    return dest


@pytest.fixture
def two_target_store(tiny_package, tmp_path):
    store = tmp_path / "store"
    push_package(tiny_package, f"file://{store}")
    push_package(retargeted(tiny_package, tmp_path / "h100-pkg"), f"file://{store}")
    return store


def test_push_with_repair_index_writes_a_damaged_index_again_from_the_store_packages(tiny_package, two_target_store):
    store = two_target_store
    good = json.loads((store / INDEX_NAME).read_text())
    damaged = b'{"format_version": 1, "targets": {"cpu/torch-2.0": nul'
    (store / INDEX_NAME).write_bytes(damaged)
    before = files_under(store)
    refused = invoke("push", tiny_package, f"file://{store}")
    assert refused.exit_code == 1 and "is damaged" in refused.output and "--repair-index" in refused.output
    assert files_under(store) == before
    with pytest.raises(PublishError, match="Hub repo") as hub:  # a Hub repo keeps the index's history instead
        push_package(tiny_package, "owner/name", repair_index=True)
    assert "history" in hub.value.fix

    repaired = invoke("push", tiny_package, f"file://{store}", "--repair-index")
    assert repaired.exit_code == 0, repaired.output
    index = json.loads((store / INDEX_NAME).read_text())
    assert sorted(index["targets"]) == sorted(good["targets"]) == [CPU, H100]
    for folder, entry in good["targets"].items():  # the same entries, but for when they were pushed
        assert {k: v for k, v in index["targets"][folder].items() if k != "pushed"} == \
               {k: v for k, v in entry.items() if k != "pushed"}
    (kept,) = store.glob(f"{INDEX_NAME}.damaged-*")
    assert kept.read_bytes() == damaged
    assert pull_package(f"file://{store}", target="h100").target == H100
    assert pull_package(f"file://{store}").target == CPU


def test_repair_never_leaves_out_a_package_folder_it_cannot_verify(tiny_package, two_target_store, tmp_path):
    store = two_target_store
    (store / INDEX_NAME).write_text("not json")
    program = store / H100 / read_manifest(tiny_package).programs[0].file
    data = bytearray(program.read_bytes())
    data[1000] ^= 0xFF
    program.write_bytes(bytes(data))
    before = files_under(store)
    with pytest.raises(PublishError, match=f"cannot list the package folders .*{H100}: .*sha256") as err:
        push_package(tiny_package, f"file://{store}", repair_index=True)
    assert "nothing was written" in err.value.fix and files_under(store) == before
    # pushing the damaged target itself replaces its folder, and the other target is listed again
    result = push_package(tmp_path / "h100-pkg", f"file://{store}", repair_index=True)
    assert result.relisted == [CPU, H100]
    verify_files(store / H100, read_manifest(store / H100))


def test_a_newer_index_is_not_rewritten_by_repair(tiny_package, two_target_store):
    store = two_target_store
    index = json.loads((store / INDEX_NAME).read_text())
    (store / INDEX_NAME).write_text(json.dumps({**index, "format_version": 2}))
    before = files_under(store)
    with pytest.raises(PublishError, match="of format 2"):
        push_package(tiny_package, f"file://{store}", repair_index=True)
    assert files_under(store) == before


def test_a_store_that_lost_its_index_lists_its_packages_again_on_the_next_push(tiny_package, two_target_store):
    store = two_target_store
    good = json.loads((store / INDEX_NAME).read_text())
    (store / INDEX_NAME).unlink()  # the fix the damaged-index error offers: delete it, then push
    result = invoke("push", tiny_package, f"file://{store}")
    assert result.exit_code == 0, result.output
    assert sorted(json.loads((store / INDEX_NAME).read_text())["targets"]) == sorted(good["targets"])
    assert pull_package(f"file://{store}", target="h100").target == H100


# -- 3. one walk: build and pull agree on which folders are packages ---------------------------------------------
@pytest.mark.parametrize("manifest, is_package", [
    (None, True),  # the real package
    ({"format_version": 1, "target": "cpu"}, True),  # aotpack's, though damaged: never write inside it
    ({"name": "my web app", "files": {"index.html": "x"}}, False),  # another tool's manifest.json
])
def test_build_and_pull_ask_one_enclosing_package(tiny_package, tmp_path, manifest, is_package):
    from aotpack.builder.output import OutputDirError, check_output_dir
    from aotpack.store.local_copy import refuse_package_as_local_dir
    from aotpack.store.manifest import enclosing_package

    folder = Path(shutil.copytree(tiny_package, tmp_path / "outer"))
    if manifest is not None:
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    inner = folder / "cpu"  # a package inside it, as an older repo's <target>/ holds torch-X.Y/
    shutil.copytree(tiny_package, inner / SERIES)
    below = inner / SERIES / "sub" / "deeper"
    assert enclosing_package(below) == inner / SERIES
    assert enclosing_package(below, outermost=True) == (folder if is_package else inner / SERIES)
    assert enclosing_package(inner) == (folder if is_package else None)
    refusals = []
    for check in (lambda p: check_output_dir(p, overwrite=True), refuse_package_as_local_dir):
        try:
            check(inner / "new")
            refusals.append(None)
        except (OutputDirError, PublishError) as err:
            refusals.append(err.problem.split(" is ")[-1])
    expected = f"inside the aotpack package {folder}" if is_package else None
    assert refusals == [expected, expected]


# -- 4. GET /v1/adapters names no server path ---------------------------------------------------------------------
def test_the_adapter_listing_shows_no_server_path_and_the_log_keeps_it(tiny_package, demo_loras, tmp_path, caplog):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from aotpack.serve.server import BackgroundServer, build_service
    from aotpack.serve.service import ServeOptions

    caplog.set_level(logging.INFO, logger="aotpack.serve")
    served = tmp_path / "srv" / "loras"
    (served / "charlora").mkdir(parents=True)
    (served / "spare").mkdir()
    outside = tmp_path / "private" / "team-a"
    outside.mkdir(parents=True)
    shutil.copy(demo_loras["tiny-style-attn"], served / "style.safetensors")
    shutil.copy(demo_loras["tiny-style-mlp"], served / "charlora" / "pytorch_lora_weights.safetensors")
    shutil.copy(demo_loras["tiny-style-all"], served / "spare" / "later.safetensors")
    shutil.copy(demo_loras["tiny-style-all"], outside / "extra-v3.safetensors")
    (served / "linked.safetensors").symlink_to(outside / "extra-v3.safetensors")  # named by its link
    (served / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    (outside / "broken-too.safetensors").write_bytes(b"not a safetensors file")
    token = "leftover-token"
    service = build_service(tiny_package, "tiny", adapter_dirs=[served],
                            adapters=[f"extra={outside / 'extra-v3.safetensors'}",
                                      f"broken2={outside / 'broken-too.safetensors'}"],
                            options=ServeOptions(warm_up=False, prefetch=False, token=token))
    server = BackgroundServer(service)
    with server as url:
        server.wait_ready(timeout=300)
        source = str(served / "spare" / "later.safetensors")
        created = httpx.post(f"{url}/v1/adapters", json={"name": "later", "source": source},
                             headers={"Authorization": f"Bearer {token}"}, timeout=120)
        assert created.status_code == 201, created.text
        assert created.json()["source"] == source  # the client's own words, nothing more
        listing = httpx.get(f"{url}/v1/adapters", timeout=30)
        # a parse error names the file it read: as the client knows it, in the answer and in the listing
        refused = [httpx.post(f"{url}/v1/images/generations", timeout=120,
                              json={"prompt": "x", "size": "64x64", "steps": 1, "loras": [{"name": name}]})
                   for name in ("broken", "broken2")]
    assert [r.status_code for r in refused] == [422, 422], [r.text for r in refused]
    assert "broken.safetensors" in refused[0].text and "broken-too.safetensors" in refused[1].text
    for answer in refused:
        assert str(tmp_path) not in answer.text, answer.text
    assert listing.status_code == 200
    shown = {a["name"]: a["source"] for a in listing.json()["data"]}
    assert shown == {"style": "style.safetensors", "charlora": "charlora", "linked": "linked.safetensors",
                     "extra": "extra-v3.safetensors", "later": "spare/later.safetensors",
                     "broken": "broken.safetensors", "broken2": "broken-too.safetensors",
                     "spare": "spare"}  # a folder of one LoRA file is an adapter of its own
    assert str(tmp_path) not in listing.text
    for path in (served / "style.safetensors", served / "charlora", outside / "extra-v3.safetensors"):
        assert str(path) in caplog.text  # the operator still sees where each adapter comes from
