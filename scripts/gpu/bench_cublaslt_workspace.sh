#!/usr/bin/env bash
# cuBLASLt's workspace: torch gives cuBLASLt a workspace (CUBLASLT_WORKSPACE_SIZE, KiB) and cuBLASLt zeroes part of
# it with a memset before each FP8 row-wise (`ovscale`) GEMM: 323 memsets a 1024² step of FLUX.1-dev, each a kernel
# and a gap of 1-5 us from CUDA graphs (2026-12-04e, scripts/gpu/probe_step_gaps.py). With CUBLASLT_WORKSPACE_SIZE=0
# they are gone; aotpack's CLI, Ray replicas and benches set it (aotpack/machine/cublaslt.py). torch reads it once per
# process, so this steps the default package in alternating processes (bench_env_ab.sh), with torch's default
# ("default": the benches otherwise set 0, as aotpack's CLI does) and with 0. Carry .device and the package tar:
#   PACKAGE_TAR=artifacts/package-rowamax.tar bash scripts/gpu/bench_cublaslt_workspace.sh
# (2026-12-04h ran it before it called bench_env_ab.sh: its summary lines name the side `workspace`, not `side`.)
ENV_A="-u CUBLASLT_WORKSPACE_SIZE AOTPACK_KEEP_CUBLASLT_WORKSPACE=1" LABEL_A=ws-default \
  ENV_B="-u AOTPACK_KEEP_CUBLASLT_WORKSPACE CUBLASLT_WORKSPACE_SIZE=0" LABEL_B=ws-0 exec bash scripts/gpu/bench_env_ab.sh
