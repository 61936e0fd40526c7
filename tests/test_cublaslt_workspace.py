"""aotpack's own processes give cuBLASLt no workspace (machine/cublaslt.py): it drops a memset before every FP8 GEMM.
Set before the first GPU matmul; a user's own value, or the opt-out, is kept."""

from __future__ import annotations

import os

import pytest

import torch

from aotpack.errors import EnvironmentSettingError
from aotpack.machine.cublaslt import (
    KEEP_VARIABLE,
    PREFER_LT_VARIABLE,
    WORKSPACE_VARIABLE,
    check_blas_settings,
    use_no_cublaslt_workspace,
    workspace_hint,
)


@pytest.fixture
def clean_environment(monkeypatch):
    """No variable set; whatever a test sets is undone after it."""
    for name in (WORKSPACE_VARIABLE, KEEP_VARIABLE, PREFER_LT_VARIABLE):
        monkeypatch.setenv(name, "x")  # recorded, so the teardown restores the process's own state
        monkeypatch.delenv(name)
    return monkeypatch


def test_sets_no_workspace_unless_the_user_chose(clean_environment):
    assert use_no_cublaslt_workspace() == "0" and os.environ[WORKSPACE_VARIABLE] == "0"
    clean_environment.setenv(WORKSPACE_VARIABLE, "4096")  # the user's value stays
    assert use_no_cublaslt_workspace() == "4096" and os.environ[WORKSPACE_VARIABLE] == "4096"
    clean_environment.delenv(WORKSPACE_VARIABLE)
    clean_environment.setenv(KEEP_VARIABLE, "1")  # torch's default stays
    assert use_no_cublaslt_workspace() is None and WORKSPACE_VARIABLE not in os.environ


def test_cli_entry_sets_it_before_any_command(clean_environment):
    import importlib

    cli_main = importlib.import_module("aotpack.cli.main")  # the module (the package exports its `main` function)
    seen = []
    clean_environment.setattr(cli_main.cli, "main", lambda **kwargs: seen.append(os.environ.get(WORKSPACE_VARIABLE)))
    cli_main.main()
    assert seen == ["0"]


def test_a_library_process_loading_on_cuda_is_told_once_at_load(clean_environment):
    hint = workspace_hint("cuda:0")
    assert WORKSPACE_VARIABLE in hint and "=0" in hint and KEEP_VARIABLE in hint
    assert workspace_hint("cpu") is None  # nothing to say off CUDA
    clean_environment.setenv(WORKSPACE_VARIABLE, "0")  # set (by the user, or aotpack's CLI): nothing to say
    assert workspace_hint("cuda") is None
    clean_environment.delenv(WORKSPACE_VARIABLE)
    clean_environment.setenv(KEEP_VARIABLE, "1")
    assert workspace_hint("cuda") is None


@pytest.fixture
def cublaslt_preferred(monkeypatch):
    """torch reports cuBLASLt as its preferred library (a CPU build refuses to set it; the variable, read at import,
    sets it: the subprocess test below)."""
    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library", lambda: torch._C._BlasBackend.Cublaslt)


def test_a_process_that_prefers_cublaslt_keeps_its_workspace(clean_environment):
    # cuBLASLt's bf16 matmuls need a workspace: with none torch's first one failed on the H200 (2026-12-05)
    clean_environment.setenv(PREFER_LT_VARIABLE, "1")
    assert use_no_cublaslt_workspace() is None and WORKSPACE_VARIABLE not in os.environ
    clean_environment.setenv(WORKSPACE_VARIABLE, "4096")  # a value the user set still stays
    assert use_no_cublaslt_workspace() == "4096"


def test_a_load_refuses_cublaslt_preferred_without_a_workspace(clean_environment, cublaslt_preferred):
    clean_environment.setenv(WORKSPACE_VARIABLE, "0")
    with pytest.raises(EnvironmentSettingError) as caught:
        check_blas_settings("cuda:0")
    assert f"{WORKSPACE_VARIABLE}=0" in str(caught.value) and f"unset {PREFER_LT_VARIABLE}" in str(caught.value)
    check_blas_settings("cpu")  # nothing runs through cuBLASLt off CUDA
    clean_environment.setenv(WORKSPACE_VARIABLE, "1024")  # a workspace: the two settings work together
    check_blas_settings("cuda")
    clean_environment.delenv(WORKSPACE_VARIABLE)
    check_blas_settings("cuda")
    assert workspace_hint("cuda") is None  # and no advice to take cuBLASLt's workspace away


def test_cublas_preferred_with_no_workspace_loads(clean_environment):
    clean_environment.setenv(WORKSPACE_VARIABLE, "0")  # aotpack's default: cuBLAS runs the bf16 matmuls
    check_blas_settings("cuda")


def test_the_variable_itself_trips_the_check_in_a_fresh_process(clean_environment):
    import subprocess
    import sys

    clean_environment.setenv(PREFER_LT_VARIABLE, "1")  # read by torch at import, as a user's environment would be
    clean_environment.setenv(WORKSPACE_VARIABLE, "0")
    code = "from aotpack.machine.cublaslt import check_blas_settings; check_blas_settings('cuda')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "EnvironmentSettingError" in done.stderr and f"{PREFER_LT_VARIABLE}='1'" in done.stderr
