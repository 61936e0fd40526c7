#!/usr/bin/env bash
# GPU call 2 of the benchmark (carry .device and artifacts/h200): fresh processes, one at a time,
# nothing else running: the eager bf16+PEFT reference output, aotpack cold start (the package from
# call 1, carried as artifacts/h200/package.tar), the JIT recipe with empty compile caches (then,
# in the same process, its step/hotswap/recompile/error figures), and the recipe warm-started from
# its saved compile cache (KINDS="recipe recipe-warm" runs only those; DETAILS= skips the recipe's
# steady-state figures after its cold start). TORCH_LOGS=recompiles puts
# dynamo's recompile reasons in cold_start.log.
source scripts/gpu/env.sh
mkdir -p /tmp/pkg && tar xf artifacts/h200/package.tar -C /tmp/pkg || exit 1
export TORCH_LOGS=recompiles
python3 -m aotpack.bench.cold_start --package /tmp/pkg --model random:flux-dev --out "$OUT" ${DETAILS---details} \
  --kinds ${KINDS:-eager-reference aotpack recipe recipe-warm} --child-timeout "${CHILD_TIMEOUT:-400}" 2>&1 | cut -c1-600
