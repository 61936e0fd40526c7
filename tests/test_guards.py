"""Guards: a package for another GPU arch, torch series or model is refused, with the fix, before any
compiled code is loaded; a GPU target is not built on a machine without that GPU."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import aotpack
from aotpack.errors import PackageMismatchError
from aotpack.machine import compat as machine
from aotpack.models.checkpoint import (
    config_fingerprint,
    load_transformer_config,
    parse_model_ref,
)
from aotpack.runtime import program as program_files
from aotpack.store.manifest import MANIFEST_NAME, read_manifest


@pytest.fixture
def nothing_compiled_loads(monkeypatch):
    """Fails the test if a compiled program is loaded: refusals must come before any .so is opened."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a compiled program was opened ({args}): the guard came too late")

    monkeypatch.setattr(program_files, "open_program", refuse)


@pytest.fixture
def package_copy(tiny_package, tmp_path):
    """An editable copy of the real CPU package (the manifest is not among its hashed files)."""
    copy = tmp_path / "package"
    shutil.copytree(tiny_package, copy)
    return copy


def edit_manifest(package, **changes) -> None:
    """Change top-level manifest fields; dict values are merged into the existing dict field."""
    path = package / MANIFEST_NAME
    data = json.loads(path.read_text())
    for key, value in changes.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    path.write_text(json.dumps(data))


def claim_h100(package) -> None:
    edit_manifest(package, device="cuda", gpu_arch="sm_90", target="h100")


def refusal(package) -> PackageMismatchError:
    with pytest.raises(PackageMismatchError) as caught:
        aotpack.load(package, model="tiny")
    return caught.value


def test_the_unedited_copy_passes_the_guards(package_copy):
    fingerprint = config_fingerprint(load_transformer_config(parse_model_ref("tiny", None)))
    machine.check_package_runs_here(read_manifest(package_copy), fingerprint)  # no error: the edits below matter


def test_a_gpu_package_is_refused_on_a_cpu_machine(package_copy, monkeypatch, nothing_compiled_loads):
    monkeypatch.setattr(machine, "gpu_arch", lambda device_index=0: None)
    claim_h100(package_copy)
    error = refusal(package_copy)
    assert "sm_90" in error.problem and "h100" in error.problem and "none is visible" in error.problem
    assert "--target cpu" in error.fix


def test_a_package_for_another_arch_suggests_the_targets_of_this_gpu(package_copy, monkeypatch,
                                                                      nothing_compiled_loads):
    monkeypatch.setattr(machine, "gpu_arch", lambda device_index=0: "sm_89")
    claim_h100(package_copy)
    error = refusal(package_copy)
    assert "built for sm_90 (h100); this GPU is sm_89" in error.problem
    assert "--target l40s / rtx4090" in error.fix


def test_the_matching_arch_passes_the_arch_guard(package_copy, monkeypatch):
    monkeypatch.setattr(machine, "gpu_arch", lambda device_index=0: "sm_90")
    claim_h100(package_copy)
    machine.check_package_runs_here(read_manifest(package_copy), None)


def test_a_package_for_another_torch_series_is_refused(package_copy, nothing_compiled_loads):
    here = machine.torch_series(torch.__version__)
    claimed = "2.11.0+cu130" if here != "2.11" else "2.10.0+cu128"
    edit_manifest(package_copy, versions={"torch": claimed})
    error = refusal(package_copy)
    built = machine.torch_series(claimed)
    assert claimed in error.problem and torch.__version__ in error.problem
    assert f"install torch=={built}.*" in error.fix and f"rebuild/pull a package built with torch {here}" in error.fix


def test_a_package_for_another_model_is_refused(package_copy, nothing_compiled_loads):
    edit_manifest(package_copy, model={"id": "black-forest-labs/FLUX.1-dev", "fingerprint": "0" * 64})
    error = refusal(package_copy)
    assert "FLUX.1-dev" in error.problem and "fingerprint 000000000000" in error.problem
    assert "aotpack inspect" in error.fix


def test_a_gpu_target_is_not_built_on_a_cpu_machine(monkeypatch, tmp_path):
    monkeypatch.setattr(machine, "gpu_arch", lambda device_index=0: None)
    with pytest.raises(PackageMismatchError) as caught:
        aotpack.build("tiny", "h100", out=tmp_path / "pkg", progress=False)
    assert "'h100'" in caught.value.problem and "sm_90" in caught.value.problem
    assert "no CUDA GPU is visible" in caught.value.problem and "--target cpu" in caught.value.fix
    assert list(tmp_path.iterdir()) == []  # refused before any folder (package or staging) was made


def test_a_gpu_target_for_another_arch_names_the_right_targets(monkeypatch):
    monkeypatch.setattr(machine, "gpu_arch", lambda device_index=0: "sm_89")
    monkeypatch.setattr(machine, "gpu_name", lambda device_index=0: "NVIDIA L40S")
    with pytest.raises(PackageMismatchError) as caught:
        machine.check_can_build("h100", "cuda", "sm_90")
    assert "this GPU (NVIDIA L40S) is sm_89" in caught.value.problem
    assert "l40s / rtx4090" in caught.value.fix
    machine.check_can_build("cpu", "cpu", "")  # the cpu target builds anywhere
