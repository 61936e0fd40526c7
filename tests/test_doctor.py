"""`aotpack doctor` and the toolchain checks: the static-libstdc++ trap is caught before and after a build."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from packaging.specifiers import SpecifierSet

from aotpack.cli import cli, main
from aotpack.errors import ToolchainError
from aotpack.machine import compat as machine
from aotpack.machine import doctor
from aotpack.machine import toolchain as cxx_probe
from aotpack.machine.dependencies import InstalledVersion, supported_range
from aotpack.machine.elf import elf_needed_and_exports, static_libstdcxx_evidence
from aotpack.machine.toolchain import check_package_shared_objects

SYSTEM_GXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(SYSTEM_GXX is None, reason="needs g++ (inductor needs it too)")


@pytest.fixture
def use_compiler(monkeypatch):
    """Point inductor at a compiler as a fresh process with CXX set would (inductor reads CXX only at import)."""
    import torch._inductor.config as inductor_config

    with contextlib.ExitStack() as patches:
        def use(cxx: str) -> None:
            monkeypatch.setenv("CXX", cxx)
            patches.enter_context(inductor_config.patch({"cpp.cxx": (None, cxx)}))

        yield use


@pytest.fixture
def static_cxx(tmp_path, use_compiler) -> str:
    """A compiler wrapper that links libstdc++ statically, like the GPU machine's /opt/gcc g++."""
    wrapper = tmp_path / "static-g++"
    wrapper.write_text(f'#!/bin/sh\nexec {SYSTEM_GXX} "$@" -static-libstdc++ -static-libgcc\n')
    wrapper.chmod(0o755)
    use_compiler(str(wrapper))
    return str(wrapper)


# -- the compiler checks -------------------------------------------------------------------------

def test_the_compiler_here_passes(use_compiler):
    use_compiler(SYSTEM_GXX)
    compiler, linkage = doctor.check_compiler(), doctor.check_compiler_linkage()
    assert compiler.status == "ok" and SYSTEM_GXX in compiler.detail and "g++" in compiler.detail
    assert linkage.status == "ok" and linkage.fix is None
    assert doctor.require_working_toolchain() == SYSTEM_GXX


def test_a_compiler_linking_libstdcxx_statically_fails_with_the_fix(static_cxx):
    result = doctor.check_compiler_linkage()
    assert result.status == "fail"
    assert static_cxx in result.detail and "statically" in result.detail and "aoti_load_package" in result.detail
    assert f"export CXX={SYSTEM_GXX}" in result.fix  # a compiler checked to link dynamically
    with pytest.raises(ToolchainError, match="links libstdc.. statically") as caught:
        doctor.require_working_toolchain()
    assert "export CXX=" in caught.value.fix


def test_a_missing_compiler_fails_both_ways(use_compiler, tmp_path):
    use_compiler(str(tmp_path / "no-such-g++"))
    result = doctor.check_compiler()
    assert result.status == "fail" and "no-such-g++" in result.detail and "CXX" in result.fix
    with pytest.raises(ToolchainError, match="no C\\+\\+ compiler"):
        doctor.require_working_toolchain()
    assert "compiler-linkage" not in [r.name for r in doctor.run_checks()]


def test_the_probe_is_compiled_once_per_compiler(monkeypatch, use_compiler, static_cxx):
    calls = []
    original = cxx_probe.build_probe_library
    monkeypatch.setattr(cxx_probe, "build_probe_library", lambda *a: calls.append(a[0]) or original(*a))
    wrapper = static_cxx + "-cached"  # a path no earlier test probed
    shutil.copy(static_cxx, wrapper)
    use_compiler(wrapper)
    for _ in range(3):
        with pytest.raises(ToolchainError):
            doctor.require_working_toolchain()
    assert calls.count(wrapper) == 1


# -- the ELF reader --------------------------------------------------------------------------------

def loaded_library(prefix: str) -> Path:
    """Path of a system library this process has mapped (torch needs libstdc++ and libc)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if Path(path).name.startswith(prefix):
            return Path(path)
    pytest.skip(f"{prefix} is not mapped in this process")


def test_elf_reader_on_system_libraries():
    needed, exported = elf_needed_and_exports(loaded_library("libstdc++.so").read_bytes())
    assert "libc.so.6" in needed
    assert {"__cxa_throw", "__cxa_begin_catch"} <= set(exported)
    needed, exported = elf_needed_and_exports(loaded_library("libc.so.6").read_bytes())
    assert "malloc" in exported and not any(lib.startswith("libstdc++") for lib in needed)


def test_elf_reader_rejects_what_is_not_elf():
    with pytest.raises(ValueError, match="not a 64-bit ELF"):
        elf_needed_and_exports(b"PK\x03\x04 a zip, not a shared object")


def test_elf_reader_tells_static_from_dynamic_libstdcxx(tmp_path, static_cxx):
    dynamic = cxx_probe.build_probe_library(SYSTEM_GXX, (tmp_path / "dynamic").mkdir() or tmp_path / "dynamic")
    static = cxx_probe.build_probe_library(static_cxx, (tmp_path / "static").mkdir() or tmp_path / "static")
    needed, _ = elf_needed_and_exports(dynamic.read_bytes())
    assert any(lib.startswith("libstdc++.so") for lib in needed)
    assert static_libstdcxx_evidence(dynamic.read_bytes()) is None
    needed, exported = elf_needed_and_exports(static.read_bytes())
    assert not any(lib.startswith("libstdc++") for lib in needed)
    assert any(symbol.startswith("__cxa_") for symbol in exported)  # the runtime is inside the .so
    assert "no libstdc++.so among DT_NEEDED" in static_libstdcxx_evidence(static.read_bytes())


# -- the check after every compile ---------------------------------------------------------------

def test_a_package_whose_wrapper_links_libstdcxx_statically_is_refused(tiny_package, tmp_path, static_cxx):
    real = tiny_package / "epilogue.pt2"
    check_package_shared_objects(real)  # the package built here passes
    static_so = cxx_probe.build_probe_library(static_cxx, tmp_path).read_bytes()
    tampered = tmp_path / "epilogue.pt2"
    with zipfile.ZipFile(real) as source, zipfile.ZipFile(tampered, "w") as target:
        replaced = 0
        for info in source.infolist():
            replaced += info.filename.endswith(".so")
            target.writestr(info, static_so if info.filename.endswith(".so") else source.read(info))
    assert replaced >= 1
    with pytest.raises(ToolchainError) as caught:
        check_package_shared_objects(tampered)
    assert "epilogue.pt2" in caught.value.problem and "statically" in caught.value.problem
    assert "export CXX=" in caught.value.fix


# -- the other checks ------------------------------------------------------------------------------

def test_supported_ranges_come_from_pyproject():
    assert supported_range("diffusers") == SpecifierSet(">=0.42,<0.43")
    assert supported_range("torchao") == SpecifierSet(">=0.18,<0.19")  # from the fp8 extra
    assert supported_range("torch") == SpecifierSet(">=2.11,<2.14")  # capped at the tested series


def test_a_dependency_outside_its_range_fails(monkeypatch):
    monkeypatch.setattr(doctor, "installed_version",
                        lambda name: InstalledVersion(name, "0.41.0", SpecifierSet(">=0.42,<0.43")))
    result = doctor.check_package("diffusers")
    assert result.status == "fail" and "0.41.0" in result.detail
    assert result.fix == "pip install 'diffusers<0.43,>=0.42'"


@pytest.mark.parametrize("target, status", [("h100", "fail"), (None, "warn"), ("cpu", "ok")])
def test_torchao_is_required_only_by_fp8_targets(monkeypatch, target, status):
    monkeypatch.setitem(sys.modules, "torchao", None)  # makes `import torchao` raise ImportError
    result = doctor.check_torchao(doctor.resolve_target(target))
    assert result.status == status
    assert (result.fix is None) == (status == "ok")


@pytest.mark.parametrize("runtime, driver, status", [
    ("13.0", "13.0", "ok"), ("12.8", "13.0", "ok"), ("13.0", "12.8", "fail"), ("12.8", "12.4", "warn"),
    ("13.0", None, "warn"),
])
def test_cuda_runtime_against_driver(monkeypatch, runtime, driver, status):
    monkeypatch.setattr(torch.version, "cuda", runtime)
    monkeypatch.setattr(machine, "cuda_driver_version", lambda: driver)
    result = doctor.check_cuda(None)
    assert result.status == status and runtime in result.detail


def test_gpu_check_names_the_recipes_for_the_gpu(monkeypatch):
    monkeypatch.setattr(machine, "gpu_arch", lambda device_index=0: "sm_89")
    monkeypatch.setattr(machine, "gpu_name", lambda device_index=0: "NVIDIA L40S")
    result = doctor.check_gpu(None)
    assert result.status == "ok" and "sm_89" in result.detail and "l40s, rtx4090" in result.detail
    monkeypatch.setattr(machine, "gpu_arch", lambda device_index=0: "sm_75")
    assert doctor.check_gpu(None).status == "warn"


@pytest.mark.parametrize("free_gb, status", [(200, "ok"), (5, "warn"), (0.5, "fail")])
def test_low_disk_warns_then_fails(monkeypatch, tmp_path, free_gb, status):
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(0, 0, int(free_gb * 1e9)))
    result = doctor.check_disk("disk-output", tmp_path / "not" / "made" / "yet", "pass --out elsewhere")
    assert result.status == status and str(tmp_path) in result.detail


def test_attention_ops_are_checked_before_a_build_spends_its_compile(monkeypatch, tmp_path):
    """cudnn_fp8 without the cuDNN frontend on a CUDA machine: doctor fails naming the pip fix, and so does
    build_package, before it loads a weight or makes its --out folder."""
    from aotpack.builder import build as build_module
    from aotpack.errors import PackageMismatchError
    from aotpack.recipes.recipe import load_recipe

    fp8 = load_recipe("h200")  # FP8 attention from 4096 tokens by default
    assert fp8.attention == "cudnn_fp8"
    assert doctor.check_attention(fp8.replace(attention="cudnn", fp8_attention_min_tokens=0)).status == "ok"
    assert doctor.check_attention(fp8).status == "warn"  # this CPU machine cannot check the GPU's frontend
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "cudnn", None)  # makes `import cudnn` raise ImportError
    result = doctor.check_attention(fp8)
    assert result.status == "fail" and "cudnn_fp8" in result.detail and "nvidia-cudnn-frontend" in result.fix
    recipe_file = tmp_path / "fp8.toml"
    recipe_file.write_text((Path(build_module.__file__).parents[1] / "recipes" / "cpu.toml").read_text()
                           .replace('attention = "sdpa"', 'attention = "cudnn_fp8"'))
    monkeypatch.setattr(build_module, "load_transformer", lambda *a, **k: pytest.fail("a weight was loaded"))
    with pytest.raises(PackageMismatchError, match="cudnn_fp8"):
        build_module.build_package("tiny", str(recipe_file), out=tmp_path / "pkg", progress=False)
    assert not (tmp_path / "pkg").exists()


# -- the command -----------------------------------------------------------------------------------

def test_doctor_command_prints_a_table_and_exits_0_here(monkeypatch, use_compiler):
    use_compiler(SYSTEM_GXX)
    monkeypatch.setattr(machine, "gpu_arch", lambda device_index=0: None)  # a CPU machine, whatever runs the tests
    result = CliRunner().invoke(cli, ["doctor", "--target", "cpu"])
    assert result.exit_code == 0, result.output
    assert "ok    compiler-linkage" in result.output and "FAIL" not in result.output


def test_doctor_for_a_gpu_target_on_a_cpu_machine_fails(monkeypatch):
    monkeypatch.setattr(machine, "gpu_arch", lambda device_index=0: None)
    result = CliRunner().invoke(cli, ["doctor", "--target", "h100"])
    assert result.exit_code == 1
    assert "FAIL  gpu" in result.output and "sm_90" in result.output and "--target cpu" in result.output


def test_doctor_json_through_main_exits_1_on_a_static_compiler(static_cxx, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["aotpack", "doctor", "--json"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 1
    report = json.loads(capsys.readouterr().out)
    checks = {check["name"]: check for check in report["checks"]}
    assert report["ok"] is False
    assert checks["compiler-linkage"]["status"] == "fail" and "export CXX=" in checks["compiler-linkage"]["fix"]
    assert set(checks) >= {"compiler", "python", "torch", "diffusers", "peft", "transformers", "triton", "torchao",
                           "cuda", "gpu", "disk-inductor-cache", "disk-output"}


def test_doctor_checks_out_with_builds_own_check(tiny_package, tmp_path, monkeypatch):
    """What `build --out` refuses, `doctor --out` fails with the same words: a file, a user's folder, a folder
    inside a package, a package holding files aotpack did not write, a place that cannot be written."""
    from aotpack.builder import output
    from aotpack.builder.output import OutputDirError, check_output_dir

    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    package = tmp_path / "package"
    shutil.copytree(tiny_package, package)
    noted = tmp_path / "noted"
    shutil.copytree(tiny_package, noted)
    (noted / "NOTES.md").write_text("mine")
    refused = [tmp_path / "file.txt", tmp_path / "mine", package / "sub", noted]
    if Path("/proc").is_dir():
        refused.append(Path("/proc/nonexist/x"))
    for out in refused:
        with pytest.raises(OutputDirError) as err:
            check_output_dir(out, overwrite=True)
        result = doctor.check_output(out)
        assert (result.status, result.detail, result.fix) == ("fail", err.value.problem, err.value.fix)
        assert "disk-output" not in [r.name for r in doctor.run_checks(out_dir=out)]  # no "0.0 GB free"
    assert doctor.check_output(package).status == "warn"  # build replaces it with --overwrite only
    assert doctor.check_output(tmp_path / "new" / "pkg").status == "ok"
    result = CliRunner().invoke(cli, ["doctor", "--out", str(tmp_path / "mine")])
    assert result.exit_code == 1 and "FAIL  output" in result.output and "thesis.tex" in result.output
    def refuse(out, overwrite=False):
        raise OutputDirError("build's own check said no")

    monkeypatch.setattr(output, "check_output_dir", refuse)
    assert doctor.check_output(tmp_path / "new").detail == "build's own check said no"  # the same function


def test_doctor_refuses_a_recipe_file_that_is_not_text_or_has_a_nan_tolerance(tmp_path):
    recipe = tmp_path / "binary.toml"
    recipe.write_bytes(b"\xff\xfe")
    result = CliRunner().invoke(cli, ["doctor", "--target", str(recipe)])
    assert result.exit_code == 1 and f"{recipe} is not a TOML recipe" in result.output and "UTF-8" in result.output
    assert "unexpected" not in result.output and "Traceback" not in result.output
    cpu = Path(doctor.__file__).parents[1] / "recipes" / "cpu.toml"
    recipe = tmp_path / "nan.toml"
    recipe.write_text(cpu.read_text().replace("tolerance = 1e-4", "tolerance = nan"))
    result = CliRunner().invoke(cli, ["doctor", "--target", str(recipe)])
    assert result.exit_code == 1 and "validation.tolerance = nan is not a finite number" in result.output
    assert "unexpected" not in result.output and "Traceback" not in result.output
