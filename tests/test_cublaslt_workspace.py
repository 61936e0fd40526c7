"""aotpack's own processes give cuBLASLt no workspace (machine/cublaslt.py): it drops a memset before every FP8 GEMM.
Set before the first GPU matmul; a user's own value, or the opt-out, is kept."""

from __future__ import annotations

import os

import pytest

from aotpack.machine.cublaslt import KEEP_VARIABLE, WORKSPACE_VARIABLE, use_no_cublaslt_workspace


@pytest.fixture
def clean_environment(monkeypatch):
    """Neither variable set; whatever a test sets is undone after it."""
    for name in (WORKSPACE_VARIABLE, KEEP_VARIABLE):
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
    from aotpack.machine.cublaslt import workspace_hint

    hint = workspace_hint("cuda:0")
    assert WORKSPACE_VARIABLE in hint and "=0" in hint and KEEP_VARIABLE in hint
    assert workspace_hint("cpu") is None  # nothing to say off CUDA
    clean_environment.setenv(WORKSPACE_VARIABLE, "0")  # set (by the user, or aotpack's CLI): nothing to say
    assert workspace_hint("cuda") is None
    clean_environment.delenv(WORKSPACE_VARIABLE)
    clean_environment.setenv(KEEP_VARIABLE, "1")
    assert workspace_hint("cuda") is None
