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
"""

from __future__ import annotations

import logging
import os

WORKSPACE_VARIABLE = "CUBLASLT_WORKSPACE_SIZE"  # KiB, read by torch (at::cuda::getCUDABlasLtWorkspaceSize)
KEEP_VARIABLE = "AOTPACK_KEEP_CUBLASLT_WORKSPACE"  # "1": leave the variable to torch's default

log = logging.getLogger(__name__)


def use_no_cublaslt_workspace() -> str | None:
    """Set `CUBLASLT_WORKSPACE_SIZE=0` for this process unless it is set already or `AOTPACK_KEEP_CUBLASLT_WORKSPACE=1`;
    returns the value in force (None: torch's default). Takes effect only before the process's first cuBLASLt call."""
    if os.environ.get(KEEP_VARIABLE) == "1":
        value = os.environ.get(WORKSPACE_VARIABLE)
    else:
        value = os.environ.setdefault(WORKSPACE_VARIABLE, "0")
    log.debug("%s=%s", WORKSPACE_VARIABLE, value if value is not None else "(torch's default)")
    return value


def workspace_hint(device) -> str | None:
    """The line to log when a package loads on a CUDA `device` in a process that left cuBLASLt its workspace (neither
    variable set: a library caller's process, which aotpack does not change); None otherwise."""
    if str(device).split(":")[0] != "cuda" or WORKSPACE_VARIABLE in os.environ or os.environ.get(KEEP_VARIABLE) == "1":
        return None
    return (f"{WORKSPACE_VARIABLE} is not set: cuBLASLt zeroes its workspace before each FP8 GEMM (0.7-1.2 ms a step "
            f"on the H200); set {WORKSPACE_VARIABLE}=0 in this process's environment, before torch's first GPU matmul "
            f"({KEEP_VARIABLE}=1 silences this)")
