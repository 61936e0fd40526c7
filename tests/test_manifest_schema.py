"""Integrity is not optional (issue 15 item 2, issue 14 item 5).

The manifest schema (derived from the dataclasses) is checked before any field is used; every
file of the package must have a sha256 and every program must be one of them; program paths are
confined; the compiled max_rank/slots/inputs come from the program archive itself, so editing
the manifest cannot desynchronise them. Plus a bounded, seeded fuzz over manifest fields, and
the model card / quantization record written with the libraries that define them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import shutil
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import aotpack
from aotpack.cli import cli
from aotpack.errors import (
    AotpackError,
    ManifestError,
    PackageIntegrityError,
    PackageMismatchError,
)
from aotpack.runtime import program as program_files
from aotpack.store.manifest import (
    MANIFEST_NAME,
    Manifest,
    ProgramSpec,
    read_manifest,
    verify_files,
)
from aotpack.store.manifest_schema import FORMAT_VERSION, check_manifest_data
from aotpack.store.program_metadata import METADATA_NAME, read_program_metadata


@pytest.fixture
def package_copy(tiny_package, tmp_path):
    copy_dir = tmp_path / "package"
    shutil.copytree(tiny_package, copy_dir)
    return copy_dir


@pytest.fixture
def nothing_compiled_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a compiled program was opened ({args}): the check came too late")

    monkeypatch.setattr(program_files, "open_program", refuse)


def manifest_data(package: Path) -> dict:
    return json.loads((package / MANIFEST_NAME).read_text())


def write_manifest(package: Path, data) -> None:
    (package / MANIFEST_NAME).write_text(json.dumps(data))


def edit(package: Path, change) -> None:
    data = manifest_data(package)
    change(data)
    write_manifest(package, data)


def refused(package: Path, error=AotpackError) -> AotpackError:
    with pytest.raises(error) as caught:
        aotpack.load(package, model="tiny")
    return caught.value


# -- schema ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(max_rnak=32), "unknown field 'max_rnak'"),
    (lambda d: d["programs"][0].update(fiel="x.pt2"), "manifest.programs[0] has unknown field 'fiel'"),
    (lambda d: d["slots"][0].update(rank=4), "manifest.slots[0] has unknown field 'rank'"),
    (lambda d: d.update(programs=None), "manifest.programs is None"),
    (lambda d: d.update(programs={}), "manifest.programs is {}"),
    (lambda d: d.update(max_rank="32"), "manifest.max_rank is '32'"),
    (lambda d: d.update(max_rank=True), "manifest.max_rank is True"),
    (lambda d: d.update(max_rank=-1), "max_rank is -1"),
    (lambda d: d.update(max_rank=1.5), "manifest.max_rank is 1.5"),
    (lambda d: d["shapes"].update(batch=[4, 1]), "shapes['batch'] is [4, 1]"),
    (lambda d: d["shapes"].update(image_tokens=[0, 16]), "shapes['image_tokens'] is [0, 16]"),
    (lambda d: d["shapes"].update(text_tokens="8-512"), "shapes['text_tokens']"),
    (lambda d: d["shapes"].pop("batch"), "lacks 'batch'"),
    (lambda d: d["slots"][0].update(in_features=0), "features 0x"),
    (lambda d: d["slots"].append(dict(d["slots"][0])), "twice"),
    (lambda d: d.pop("files"), "lacks the field(s) ['files']"),
    (lambda d: d.pop("target"), "lacks the field(s) ['target']"),
    (lambda d: d["files"].update({"prologue.pt2": "abc"}), "expected a sha256"),
    (lambda d: d["files"].pop("prologue.pt2"), "has no sha256 in manifest.files"),
    (lambda d: d.update(merge_program="merge_rows.pt2"), "merge_program 'merge_rows.pt2' has no sha256"),
    (lambda d: d.update(merge_program="../x.pt2"), "not a plain relative path"),
    (lambda d: d.update(merge_program=3), "merge_program is 3"),
    (lambda d: d.update(merge_by_address_program="m.pt2"), "merge_by_address_program 'm.pt2' has no sha256"),
    (lambda d: d.update(merge_by_address_program="../m.pt2"), "not a plain relative path"),
    (lambda d: d["programs"][0].update(file="/etc/passwd"), "not a plain relative path"),
    (lambda d: d["programs"][0].update(file="../prologue.pt2"), "not a plain relative path"),
    (lambda d: d["programs"][0].update(file="sub\\prologue.pt2"), "not a plain relative path"),
    (lambda d: d["programs"][0].update(instances=[]), "instances is empty"),
    (lambda d: d["programs"][0].update(instances=[3]), "instances[0] is 3"),
    (lambda d: d["programs"][0]["inputs"][0].update(dtype="float99"), "not a torch dtype"),
    (lambda d: d["programs"][0]["inputs"][0].update(shape=[-1]), "dimension -1"),
    (lambda d: d.update(programs=[]), "programs is empty"),
    (lambda d: d.update(programs=[d["programs"][0], d["programs"][0]]), "repeats another program"),
    (lambda d: d.update(format_version=FORMAT_VERSION + 1), f"format_version {FORMAT_VERSION + 1}"),  # newer than read
    (lambda d: d.update(format_version=0), "format_version 0"),
    # a lora_tails package of the first form (format 5: its tailed weights a copy) would be bound at another stride
    (lambda d: d.update(format_version=5, recipe={**d["recipe"], "lora_tails": True}), "earlier aotpack whose tailed"),
    (lambda d: d.update(format_version=True), "format_version True"),
    (lambda d: d["quantization"].update(unquantized_linears="*.norm1.linear"), "unquantized_linears is '*.norm1"),
    (lambda d: d["quantization"].update(unquantized_linears=[3]), "unquantized_linears is [3]"),
    (lambda d: d.update(versions={"torch": 2.13}), "versions['torch'] is 2.13"),
    (lambda d: d.update(quantization={}), "quantization lacks its method"),
])
def test_schema_refusals_name_the_field_and_the_fix(package_copy, nothing_compiled_loads, change, message):
    edit(package_copy, change)
    error = refused(package_copy, ManifestError)
    assert message in error.problem
    assert "rebuild" in error.fix or "install" in error.fix


@pytest.mark.parametrize("content", ["[1, 2]", "null", "\"text\"", "42", "{", b"\xff\xfe\x00"])
def test_a_manifest_that_is_not_a_json_object_is_refused(package_copy, nothing_compiled_loads, content):
    path = package_copy / MANIFEST_NAME
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    error = refused(package_copy, ManifestError)
    assert "manifest.json" in error.problem


def test_the_schema_follows_the_dataclasses(tiny_package):
    """A field another change adds to ProgramSpec is type-checked without touching the schema code."""
    @dataclasses.dataclass
    class ProgramSpecPlus(ProgramSpec):
        variant: str = "slots"
        rank: int | None = None

    @dataclasses.dataclass
    class ManifestPlus(Manifest):
        pass

    ManifestPlus.__annotations__ = {"programs": list[ProgramSpecPlus]}  # same fields, richer programs

    data = manifest_data(tiny_package)
    check_manifest_data(copy.deepcopy(data), ManifestPlus)  # a default may be absent
    data["programs"][0]["variant"] = "noslot"
    data["programs"][0]["rank"] = None
    check_manifest_data(copy.deepcopy(data), ManifestPlus)
    data["programs"][0]["variant"] = 7
    with pytest.raises(ManifestError, match=r"programs\[0\]\.variant is 7"):
        check_manifest_data(copy.deepcopy(data), ManifestPlus)
    data["programs"][0].update(variant="noslot", rank="0")
    with pytest.raises(ManifestError, match=r"programs\[0\]\.rank is '0'"):
        check_manifest_data(data, ManifestPlus)


# -- integrity -----------------------------------------------------------------------------------------
def test_an_unlisted_file_in_the_package_is_refused(package_copy, nothing_compiled_loads):
    (package_copy / "extra.so").write_bytes(b"\x7fELF swapped in")
    error = refused(package_copy, PackageIntegrityError)
    assert "extra.so" in error.problem and "no sha256" in error.problem


def test_a_program_missing_from_files_is_refused_even_if_the_file_is_there(package_copy, nothing_compiled_loads):
    edit(package_copy, lambda d: d["files"].pop("single_block.pt2"))
    assert "has no sha256" in refused(package_copy, ManifestError).problem


def test_a_program_outside_the_package_is_refused(package_copy, tmp_path, nothing_compiled_loads):
    outside = tmp_path / "evil.pt2"
    shutil.copy(package_copy / "prologue.pt2", outside)

    def point_outside(d):
        d["files"]["../evil.pt2"] = d["files"]["prologue.pt2"]
        d["programs"][0]["file"] = "../evil.pt2"
    edit(package_copy, point_outside)
    assert "not a plain relative path" in refused(package_copy, ManifestError).problem


def test_a_missing_program_file_is_a_typed_error(package_copy, nothing_compiled_loads):
    (package_copy / "epilogue.pt2").unlink()
    assert "epilogue.pt2 is missing" in refused(package_copy, PackageIntegrityError).problem


def test_a_pt2_that_is_not_a_zip_is_a_typed_error(package_copy, nothing_compiled_loads):
    import hashlib

    (package_copy / "epilogue.pt2").write_bytes(b"not a zip at all" * 100)
    digest = hashlib.sha256(b"not a zip at all" * 100).hexdigest()
    edit(package_copy, lambda d: d["files"].update({"epilogue.pt2": digest}))  # the sha256 even matches
    error = refused(package_copy, PackageIntegrityError)
    assert "not a .pt2 archive" in error.problem
    with pytest.raises(PackageIntegrityError, match="not a .pt2 archive"):
        program_files.ProgramFile(package_copy / "epilogue.pt2")


def test_every_program_records_what_it_was_compiled_for(tiny_package):
    manifest = read_manifest(tiny_package)
    for spec in manifest.programs:
        record = read_program_metadata(tiny_package / spec.file)
        assert record["kind"] == spec.kind and record["inputs"] == spec.inputs
        assert [s["name"] for s in record["slots"]] == spec.slots
        assert record["max_rank"] == (manifest.max_rank if spec.slots else 0)
        with zipfile.ZipFile(tiny_package / spec.file) as archive:  # inside the archive: covered by its sha256
            assert any(n.endswith("/" + METADATA_NAME) for n in archive.namelist())


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(max_rank=64), "compiled for max_rank 32"),
    (lambda d: d.update(max_rank=8), "32"),  # below a program's recorded rank: refused either way
    (lambda d: d["slots"][-1].update(in_features=d["slots"][-1]["in_features"] * 2), "compiled"),
    (lambda d: next(p for p in d["programs"] if len(p["slots"]) > 1)["slots"].reverse(), "in names or order"),
    (lambda d: d["programs"][1]["inputs"][0].update(dtype="float16"), "inputs of"),
])
def test_editing_compiled_facts_in_the_manifest_is_refused(package_copy, nothing_compiled_loads, change, message):
    edit(package_copy, change)
    error = refused(package_copy, (PackageMismatchError, ManifestError))
    assert message in error.problem and "do not edit manifest.json" in error.fix


def test_inspect_verifies_or_says_it_did_not(package_copy):
    ok = CliRunner().invoke(cli, ["inspect", str(package_copy)])
    assert ok.exit_code == 0 and "verified:" in ok.output
    data = bytearray((package_copy / "epilogue.pt2").read_bytes())
    data[500] ^= 0xFF
    (package_copy / "epilogue.pt2").write_bytes(bytes(data))
    bad = CliRunner().invoke(cli, ["inspect", str(package_copy)])
    assert bad.exit_code == 1 and "epilogue.pt2 has sha256" in bad.output and "Traceback" not in bad.output
    skipped = CliRunner().invoke(cli, ["inspect", str(package_copy), "--no-verify"])
    assert skipped.exit_code == 0 and "NOT verified" in skipped.output


# -- fuzz ----------------------------------------------------------------------------------------------
_VALUES = [None, True, False, 0, -1, 1, 2 ** 63, 1.5, float("inf"), "", "x", "../x", "/etc/passwd", "a\\b",
           [], [1], [4, 1], {}, {"k": 1}, [None], "0" * 64]


def _paths(value, prefix=()):
    """Every (path) into nested dicts/lists of the manifest, skipping the big model config."""
    yield prefix
    if isinstance(value, dict) and prefix != ("model", "config") and prefix != ("recipe",):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list) and len(prefix) <= 4:
        for i, item in enumerate(value[:3]):
            yield from _paths(item, prefix + (i,))


def _mutate(data: dict, rng: random.Random) -> str:
    paths = [p for p in _paths(data) if p]
    path = rng.choice(paths)
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    action = rng.choice(["set", "set", "delete", "add"])
    if action == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif action == "add" and isinstance(parent, dict):
        parent[rng.choice(["extra", "max_rnak", "../x", ""])] = rng.choice(_VALUES)
    else:
        parent[path[-1]] = copy.deepcopy(rng.choice(_VALUES))
    return f"{action} {'/'.join(map(str, path))}"


def test_fuzzed_manifests_give_a_typed_error_or_load_and_touch_nothing_outside(package_copy, tmp_path,
                                                                               monkeypatch):
    original = manifest_data(package_copy)
    outside = tmp_path / "outside.txt"
    outside.write_text("untouched")
    (tmp_path / "x").write_text("untouched")
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    rng = random.Random(15)
    outcomes = {"refused": 0, "accepted": 0}
    for case in range(120):
        data = copy.deepcopy(original)
        what = [_mutate(data, rng) for _ in range(rng.randint(1, 3))]
        write_manifest(package_copy, data)
        try:
            manifest = read_manifest(package_copy)
            verify_files(package_copy, manifest)
            outcomes["accepted"] += 1
        except AotpackError as err:
            assert err.fix, what
            outcomes["refused"] += 1
        except Exception as err:  # noqa: BLE001 - the point of the test
            pytest.fail(f"case {case} ({what}) raised {type(err).__name__}: {err}")
    assert outcomes["refused"] > 60 and outcomes["accepted"] > 5, outcomes
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in package_copy.iterdir()) == sorted([MANIFEST_NAME, *original["files"]])


def test_a_fuzz_survivor_still_loads_and_runs(package_copy):
    """Fields the runtime does not depend on may change; the package still loads and produces finite output."""
    import torch

    edit(package_copy, lambda d: d.update(build={"date": "x"}, validation={}, inductor_configs={}))
    served = aotpack.load(package_copy, model="tiny")
    latents = served("a fox", num_inference_steps=1, height=64, width=64, max_sequence_length=16,
                     output_type="latent").images
    assert torch.isfinite(latents).all()


# -- model card and quantization record (issue 14 item 5) ----------------------------------------------
def test_a_crlf_card_keeps_the_users_metadata_in_one_front_matter_block():
    from huggingface_hub import ModelCard

    from aotpack.store.model_card import render_model_card

    index = {"targets": {"cpu": {"model": {"id": "black-forest-labs/FLUX.1-schnell", "fingerprint": "ab" * 32},
                                 "device": "cpu", "gpu_arch": "", "torch": "2.13.0", "bytes": 1}}}
    existing = "---\r\nlicense: mit\r\ntags:\r\n- mine\r\n---\r\n\r\n# My card\r\nHand-written.\r\n"
    card = render_model_card(index, "hf://me/flux-aot", existing)
    assert card.count("---\n") == 2 and card.startswith("---\n") and "\r" not in card
    data = ModelCard(card).data
    assert data.license == "mit" and data.tags[0] == "mine" and "aotpack" in data.tags
    assert data.pipeline_tag == "text-to-image" and data.library_name == "aotpack"
    assert data.base_model == "black-forest-labs/FLUX.1-schnell"
    assert "Hand-written." in card and "license: mit" not in card.split("---\n", 2)[2]
    assert render_model_card(index, "hf://me/flux-aot", card) == card  # stable across pushes
    fresh = ModelCard(render_model_card(index, "hf://me/flux-aot", None)).data
    assert fresh.license == "apache-2.0" and fresh.tags.count("aotpack") == 1


def test_quantization_record_is_torchaos_dict_and_rebuilds_the_config():
    pytest.importorskip("torchao")
    from torchao.core.config import config_from_dict

    from aotpack.models.quant import _fp8_config, quantization_record

    record = quantization_record("fp8_rowwise")
    assert isinstance(record["config"], dict) and record["config"]["_type"] == "Float8DynamicActivationFloat8WeightConfig"
    assert json.loads(json.dumps(record)) == record  # JSON-safe, as the manifest needs
    assert config_from_dict(record["config"]) == _fp8_config()
    assert quantization_record("none") == {"method": "none"}


def test_a_manifest_is_written_in_the_format_its_fields_need(tiny_package):
    """The format is derived when the manifest is written, not set by its writer: a manifest that keeps linears
    out of the quantization never claims format 1, which an older aotpack would read and misbind."""
    manifest = read_manifest(tiny_package)
    assert manifest.format_version == 1 and manifest.to_json()["format_version"] == 1
    manifest.quantization = {**manifest.quantization, "unquantized_linears": ["*.norm1.linear"]}
    assert manifest.format_version == 1 and manifest.to_json()["format_version"] == 2
    manifest.recipe = {**manifest.recipe, "fp8_attention_min_tokens": 4096}  # its programs call aotpack::bf16_sdpa
    assert manifest.to_json()["format_version"] == 3
    manifest.recipe = {**manifest.recipe, "batched_modulation": True}  # its blocks take rows, not temb
    assert manifest.to_json()["format_version"] == 4
    manifest.recipe = {**manifest.recipe, "joined_qkv": True}  # its double blocks read q/k/v weights joined
    assert manifest.to_json()["format_version"] == 5
    manifest.recipe = {**manifest.recipe, "lora_tails": True}  # its single blocks read base weights as strided views
    assert manifest.to_json()["format_version"] == 6
