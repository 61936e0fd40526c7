"""cuBLASLt's workspace in aotpack's own processes: none (`CUBLASLT_WORKSPACE_SIZE=0`).

torch hands cuBLASLt a workspace, and cuBLASLt zeroes part of it with a memset before every row-wise FP8 GEMM
(`nvjet_..._ovscale`): 323 memsets a FLUX.1-dev step, each a kernel plus a gap of 1-5 us from CUDA graphs. With no
workspace they are gone and the FP8 GEMMs take as long as before: on the H200 (torch 2.11, 2026-12-04, random
weights, default h200 package, `scripts/gpu/bench_cublaslt_workspace.sh`, processes alternated), r64 in slots ten
steps in a row from CUDA graphs 1024² 99.52 -> 98.37 ms and 512² 36.06 -> 35.36 ms
(`benchmarks/results/2026-12-04h-h200-cublaslt-workspace/`).

torch reads the variable once, at the process's first cuBLASLt call, so the entry points aotpack owns set it first
(the CLI, the Ray Serve replicas, the benches). A library caller's process is theirs: `README.md` says how to set it
there, and a package loaded on CUDA without it logs one line that says so (`workspace_hint`, from the compiled
transformer every load path builds). A value the user set is kept, and `AOTPACK_KEEP_CUBLASLT_WORKSPACE=1` leaves
torch's default in place.

`TORCH_BLAS_PREFER_CUBLASLT=1` (or `torch.backends.cuda.preferred_blas_library("cublaslt")`) sends torch's bf16
matmuls through cuBLASLt too, and those need a workspace: with none, the first one fails ("OOM trying to allocate
workspace for cublaslt", H200, torch 2.11, 2026-12-05, `benchmarks/results/2026-12-05b-h200-split-build/`). So a
process that asks for it keeps torch's workspace, and a load refuses the two settings together with a typed error.
"""

from __future__ import annotations

import logging
import os

from ..errors import EnvironmentSettingError

WORKSPACE_VARIABLE = "CUBLASLT_WORKSPACE_SIZE"  # KiB, read by torch (at::cuda::getCUDABlasLtWorkspaceSize)
KEEP_VARIABLE = "AOTPACK_KEEP_CUBLASLT_WORKSPACE"  # "1": leave the variable to torch's default
PREFER_LT_VARIABLE = "TORCH_BLAS_PREFER_CUBLASLT"  # "1": torch's matmuls through cuBLASLt (read once, at import)

log = logging.getLogger(__name__)


def use_no_cublaslt_workspace() -> str | None:
    """Set `CUBLASLT_WORKSPACE_SIZE=0` for this process unless it is set already or `AOTPACK_KEEP_CUBLASLT_WORKSPACE=1`;
    returns the value in force (None: torch's default). Takes effect only before the process's first cuBLASLt call.
    A process that prefers cuBLASLt for every matmul (`TORCH_BLAS_PREFER_CUBLASLT=1`) keeps torch's workspace."""
    if os.environ.get(KEEP_VARIABLE) == "1" or (
            WORKSPACE_VARIABLE not in os.environ and os.environ.get(PREFER_LT_VARIABLE) == "1"):
        value = os.environ.get(WORKSPACE_VARIABLE)
    else:
        value = os.environ.setdefault(WORKSPACE_VARIABLE, "0")
    log.debug("%s=%s", WORKSPACE_VARIABLE, value if value is not None else "(torch's default)")
    return value


def _on_cuda(device) -> bool:
    return str(device).split(":")[0] == "cuda"


def _prefers_cublaslt() -> bool:
    import torch

    return torch.backends.cuda.preferred_blas_library() == torch._C._BlasBackend.Cublaslt


def check_blas_settings(device) -> None:
    """Refuse, before the first matmul of a load on a CUDA `device`, a process that routes every matmul through
    cuBLASLt and gives cuBLASLt no workspace: torch's first bf16 matmul would fail with an allocator message."""
    if not _on_cuda(device) or os.environ.get(WORKSPACE_VARIABLE) != "0" or not _prefers_cublaslt():
        return
    raise EnvironmentSettingError(
        f"{WORKSPACE_VARIABLE}=0 and cuBLASLt preferred for every matmul ({PREFER_LT_VARIABLE}="
        f"{os.environ.get(PREFER_LT_VARIABLE, '(not set)')!r}, torch.backends.cuda.preferred_blas_library() is "
        "cuBLASLt): "
        "cuBLASLt's bf16 matmuls need a workspace, so torch's first one would fail",
        f"unset {PREFER_LT_VARIABLE} (and do not call preferred_blas_library('cublaslt')), or unset {WORKSPACE_VARIABLE} "
        "or give it a size in KiB")


def workspace_hint(device) -> str | None:
    """The line to log when a package loads on a CUDA `device` in a process that left cuBLASLt its workspace (neither
    variable set: a library caller's process, which aotpack does not change); None otherwise, and None where every
    matmul goes through cuBLASLt (it needs the workspace)."""
    if (not _on_cuda(device) or WORKSPACE_VARIABLE in os.environ or os.environ.get(KEEP_VARIABLE) == "1"
            or _prefers_cublaslt()):
        return None
    return (f"{WORKSPACE_VARIABLE} is not set: cuBLASLt zeroes its workspace before each FP8 GEMM (0.7-1.2 ms a step "
            f"on the H200); set {WORKSPACE_VARIABLE}=0 in this process's environment, before torch's first GPU matmul "
            f"({KEEP_VARIABLE}=1 silences this)")
