#!/usr/bin/env bash
# cuBLASLt's workspace: torch gives cuBLASLt a workspace (CUBLASLT_WORKSPACE_SIZE, KiB) and cuBLASLt zeroes part of
# it with a memset before each FP8 row-wise (`ovscale`) GEMM: 323 memsets a 1024² step of FLUX.1-dev, each a kernel
# and a gap of 1-5 us from CUDA graphs (2026-12-04e, scripts/gpu/probe_step_gaps.py). With CUBLASLT_WORKSPACE_SIZE=0
# they are gone; aotpack's CLI, Ray replicas and benches set it (aotpack/machine/cublaslt.py). torch reads it once per
# process, so this steps the default package (r64 in slots, and no LoRA) in alternating processes, with torch's
# default and with 0, ROUNDS times at each of SIZES (variants bench; CUDA graphs from an idle device and ten steps in
# a row), and prints one line per process. Carry .device and the package tar:
#   PACKAGE_TAR=artifacts/package-rowamax.tar bash scripts/gpu/bench_cublaslt_workspace.sh
source scripts/gpu/env.sh
mkdir -p /tmp/pkg "$OUT"
tar xf "${PACKAGE_TAR:?a default h200 package as a tar}" -C /tmp/pkg || exit 1
for round in $(seq "${ROUNDS:-2}"); do
  for size in ${SIZES:-1024 512}; do
    for workspace in default 0; do
      out="$OUT/$size-ws-$workspace-round$round"
      # default: torch's own workspace (the benches otherwise set 0 as aotpack's CLI does, machine/cublaslt.py)
      if [ "$workspace" = default ]; then unset CUBLASLT_WORKSPACE_SIZE; export AOTPACK_KEEP_CUBLASLT_WORKSPACE=1
      else export CUBLASLT_WORKSPACE_SIZE=$workspace; unset AOTPACK_KEEP_CUBLASLT_WORKSPACE; fi
      timeout "${VARIANTS_TIMEOUT:-150}" python3 -m aotpack.bench.variants --model random:flux-dev --out "$out" \
        --height "$size" --width "$size" --variant default=/tmp/pkg --graph-variant default > "$out.log" 2>&1
      python3 - "$out/variants.json" "$size" "$workspace" "$round" <<'PY'
import json, sys
path, size, workspace, round_ = sys.argv[1:]
v = json.load(open(path))["variants"]["default"]
ms = lambda key: v[key]["median_ms"] if isinstance(v.get(key), dict) and "median_ms" in v[key] else None
print(json.dumps({"size": int(size), "workspace": workspace, "round": int(round_), "slots_plain": ms("step"),
                  "no_lora_plain": ms("step_no_lora"), "slots_graph": ms("step_cuda_graph"),
                  "slots_graph_back_to_back": ms("step_cuda_graph_back_to_back")}))
PY
    done
  done
done | tee "$OUT/summary.jsonl"
