#!/usr/bin/env bash
# Issue 11 levers on the full random:flux-dev, one GPU call (carry .device, which holds the
# nvidia-cudnn-frontend wheel, and the default h200 package as a tar: PACKAGE_TAR, by default
# artifacts/h200/package-merge.tar; without that file the default package is built in the same call):
# 1. with fp8attn among LEVERS, the op check: aotpack::fp8_sdpa's CUDA kernel vs its CPU reference, eager and graph-replayed;
# 2. builds variants of h200.toml concurrently (LEVERS, default "fp8attn cdt"; each is base = "h200" plus the fields
#    scripts/gpu/lever_recipes.py gives it):
#    fp8attn: FP8 attention at every length (h200.toml without fp8_attention_min_tokens; the default takes bf16
#      attention below 4096 tokens since 2026-12-04);
#    bf16attn: attention = "cudnn" (bf16 cuDNN attention at every length, the default before 2026-12-04);
#    cdt: [inductor] coordinate_descent_tuning = true (Triton reduction configs tuned at build);
#    gelu: gelu_via_sigmoid = "all" (GELU's tanh form computed as x * sigmoid(2u), models/activations.py;
#      with fused_gelu_quant = false, which it excludes);
#    gelu_ff: gelu_via_sigmoid = "feed_forward" (the double blocks' feed-forward GELUs only; same);
#    unfused: fused_gelu_quant = false (Inductor's own GELU + quantization reductions; the default
#      fuses them in one Triton kernel, models/fused_quant.py, since 2026-12-01m);
#    qk_unfused: fused_qk_norm_rope = false (Inductor's own q/k norm + RoPE kernels; the default runs them as
#      one Triton kernel per tensor, models/qk_norm_rope.py, since 2026-12-01n); the variants bench also steps
#      each package with no LoRA (no-slot programs);
#    norm_unfused: fused_norm_quant = false (Inductor's own norm + modulation + quantization reduction, one copy
#      per linear; the default quantizes each block norm once in one Triton kernel, models/norm_quant.py, since
#      2026-12-03c). unfused, gelu, gelu_ff and qk_unfused turn it off too: it needs both of those levers;
#    rebuilt: h200.toml as it is, built by this checkout (against PACKAGE_TAR, built by an earlier one: a code
#      change that is not a recipe field, e.g. a kernel's launch config, what an op computes or how a
#      reduction is written);
#    fp8_mod: without `unquantized_linears` (the AdaLN modulation linears in FP8 too; the default keeps them in bf16
#      since 2026-12-03j, when this lever was measured the other way round as `bf16_mod`);
#    no_grouped: group_lora_down off (on by default since 2026-12-04d: one LoRA down-projection GEMM for the slots
#      that read one input: q/k/v of each stream, and q/k/v/MLP in the single block; builder/lora_grouping.py);
#    no_fp8down: lora_down_from_fp8 off (on by default since 2026-12-06i: the LoRA down-projections after the MLP
#      GELUs read the FP8 GELU output, so the GELU kernel writes no bf16 copy for them; models/lora_down_fp8.py);
#    down_gemm: lora_down_fp8_gemm = true (those down-projections from the FP8 GELU output as one cuBLASLt FP8 GEMM
#      against A split in the program into FP8 high and low parts, instead of the Triton split-K kernel; 512² +1.2 ms
#      a step from graphs on an H100, 2026-12-08a);
#    tails_paired: lora_tails_paired = true (a single block's four tailed readers in two pairs, each pair's GEMMs
#      reading one `[tail_a | q / H | tail_b]` buffer: the rows kernel writes q / H twice a block instead of four
#      times: 9.2 -> 7.0 us a 512² call, 32.7 -> 22.8 at 1024² (H100, 2026-12-08b); 512² from graphs 32.03 against
#      the default's 31.99 ms, no gain seen; 1024² unmeasured in a package);
#    down_dots_text: lora_down_fp8_text = true (the double blocks' text feed-forwards' down-projections in FP8 dots
#      too, 19 more calls a step of 512 rows; 512² 31.49 against down_dots' 31.41 ms from graphs, H100 2026-12-08b:
#      no gain seen);
#    no_dots: lora_down_fp8_dots off (on by default since 2026-12-08b: those down-projections as FP8 x FP8
#      tensor-core dots against A's FP8 high and low rows, two more program inputs a slot that the runtime writes at
#      each switch; 512² -0.26 to -0.58 ms from graphs, 1024² -0.91, H100);
#    up: group_lora_up = true (each group's LoRA up-projections, and each lone slot's, in one Triton kernel launch
#      instead of a cuBLAS GEMM per slot; models/lora_up.py);
#    gelu_lora: fused_gelu_lora = true (the LoRA up-projection before each MLP GELU and the down-projection after
#      it inside the GELU quantization kernel, two passes over the row block; models/gelu_lora.py);
#    gemm_lora: lora_up_in_gemm = true (each FP8 slot's bias and LoRA up-projection added in the epilogue of one
#      persistent TMA Triton FP8 GEMM instead of cuBLAS + a bf16 up GEMM + the add; models/gemm_lora.py);
#    no_fp8qk: fp8_qk_in_norm_rope off (on by default since 2026-12-06i: under FP8 attention the q/k norm + RoPE
#      kernel writes q/k in e4m3 at the norm-bound scales, so no separate kernel reads bf16 q/k back to quantize
#      them; models/qk_norm_rope.py);
#    no_qkdown: both of those off (the default before 2026-12-06i);
#    no_joined: joined_qkv off (on by default since 2026-12-07a: each double-block stream's q/k/v as one FP8 GEMM over
#      their weights joined along N; models/joined_qkv.py); the levers that turn fused_norm_quant off drop it too;
#    no_tails: lora_tails off (on by default since 2026-12-07j, in h100 since 2026-12-07g: the single blocks'
#      q/k/v/MLP-in LoRA as FP8 tails of their GEMMs' K, a third program set the runtime runs for sets of rank <= 64;
#      models/tail_groups.py); the levers that turn fused_norm_quant off drop it too. Its same-process measure on an
#      H200 is still to come (2026-12-07j's lever run hit the build limit, then 300 s, BUILD_TIMEOUT: two builds at once);
#    tails_mlp: lora_tails_mlp_in (the double blocks' MLP-in as tails too, one more program: double_block.tails;
#      2026-12-07i's run, on an H100, is confounded: its tailed double program lacked the grouped q/k/v
#      down-projections, fixed since);
#    Levers that cannot go with those two defaults drop them: bf16attn, qk_unfused (fp8_qk_in_norm_rope needs FP8
#    attention and the fused q/k kernel), unfused, gelu, gelu_ff, up, gelu_lora, gemm_lora (lora_down_from_fp8);
#    no_batched: batched_modulation off (on by default since 2026-12-05a: the blocks' AdaLN modulation linears in one
#      program run once an image over every timestep, the block programs taking its rows; models/modulation.py). The
#      per-image figure is the variants bench's `image_loop_ms_per_step` (28 timesteps as FluxPipeline passes them,
#      GRAPHS=1);
#    static: [shapes] of one value, batch 1 x 1024^2 x 512 text tokens (programs specialised to that shape,
#      as the recipe's first compile is; tests whether the dynamic token axis costs the ~1.25x slower
#      Triton kernels seen against the recipe; run it with SIZES=1024 only);
# 3. steps the default package and the variants side by side (bench.variants, r64 LoRA in slots) at each
#    of SIZES (default "1024"; e.g. "1024 2048"; SIZES="" builds only), results under $OUT/SIZE/ beyond the first; with GRAPHS=1 each
#    package's step also replayed from the runtime's CUDA graphs, as it runs by default (VARIANTS_TIMEOUT per
#    size, default 240 s);
# 4. with KEEP_PACKAGES=1, each lever's package (and the default, where built here) as $OUT/package-LABEL.tar
#    (to carry as PACKAGE_TAR later);
# 5. with FP8_SPEED=1 (default), the speed bench (no recipe) on the FP8-attention package at the first size;
#    SPEED_LEVER=LABEL: the same on that lever's package (merge + unmerge, cached switches, fidelity; FIDELITY_STDS,
#    e.g. 0.4, adds the fidelity sweep at those LoRA factor stds; SPEED_TIMEOUT, default 200 s).
# LEVER_BASE=h100: the levers (and a default built here) take base = "h100" instead, to step beside a carried h100
# package on an H100; LEVER_TARS=FOLDER: a lever whose FOLDER/package-LABEL.tar exists (KEEP_PACKAGES of an earlier
# call, carried) is unpacked instead of built.
# Results under $OUT; about 6-7 minutes at 1024^2.
# The cuDNN frontend wheel for the GPU machine's python 3.12, fetched on this machine:
#   pip download --no-deps --python-version 3.12 --only-binary=:all: -d .device/wheels nvidia-cudnn-frontend
# (1.32.0 was used; scripts/gpu/env.sh installs it with the others).
source scripts/gpu/env.sh
LEVERS=${LEVERS:-fp8attn cdt}
# before any build: h200.toml's FP8 attention needs the carried cuDNN frontend wheel (the build refuses without it)
if ! python3 -c "import cudnn" 2>/dev/null; then
  echo "h200.toml's FP8 attention needs the nvidia-cudnn-frontend wheel in .device/wheels (cp312): on the CPU machine run" \
    "pip download --no-deps --python-version 3.12 --only-binary=:all: -d .device/wheels nvidia-cudnn-frontend" >&2
  exit 1
fi
SIZES=${SIZES-${SIZE:-1024}}  # set but empty: build (and keep) the packages only
SIZE=${SIZES%% *}
# a warm machine keeps /tmp: only this run's recipes count as levers, its builds would refuse the last run's
# packages (2026-12-06l: "--out /tmp/levers/fp8attn already holds an aotpack package") and a tar would unpack
# into the last default
rm -rf /tmp/recipes /tmp/levers /tmp/pkg
mkdir -p /tmp/recipes /tmp/levers /tmp/pkg "$OUT"
PACKAGE_TAR=${PACKAGE_TAR:-artifacts/h200/package-merge.tar}
if [ -f "$PACKAGE_TAR" ]; then
  tar xf "$PACKAGE_TAR" -C /tmp/pkg || exit 1
else  # no carried default package: build it beside the levers (same call, concurrently)
  echo "no $PACKAGE_TAR: building the default h200 package too"
  BUILD_DEFAULT=1
fi
# every lever as base = "h200" plus the fields it changes; an unknown lever (e.g. renamed: grouped is no_grouped now)
# or a recipe the loader refuses stops here, before any build
python3 scripts/gpu/lever_recipes.py /tmp/recipes $LEVERS || exit 2
build() {  # label; LEVER_TARS=FOLDER: a lever whose FOLDER/package-LABEL.tar exists (KEEP_PACKAGES of an earlier
  # call, carried) is unpacked, not built
  if [ -n "${LEVER_TARS:-}" ] && [ -f "$LEVER_TARS/package-$1.tar" ]; then
    mkdir -p "/tmp/levers/$1" && tar xf "$LEVER_TARS/package-$1.tar" -C "/tmp/levers/$1"
    echo "build $1: unpacked from $LEVER_TARS/package-$1.tar" | tee -a "$OUT/builds.txt"; return
  fi
  timeout "${BUILD_TIMEOUT:-400}" python3 -m aotpack build --model random:flux-dev --target "/tmp/recipes/$1.toml" \
    --workers "${WORKERS:-4}" --out "/tmp/levers/$1" > "$OUT/build-$1.log" 2>&1
  echo "build $1: exit $? after $SECONDS s" | tee -a "$OUT/builds.txt"
}
if [[ " $LEVERS " == *" fp8attn "* ]]; then  # the FP8-attention op check only where that lever is built
# The op's CUDA kernel against its CPU reference (same quantized inputs), eagerly and replayed from a CUDA graph.
python3 - > "$OUT/fp8_op_check.json" <<'PY'
import json, torch
from aotpack.models.fp8_attention import quantize
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 4608, 24, 128, generator=g) for _ in range(3))
(q8, dq), (k8, dk), (v8, dv) = (quantize(t) for t in (q, k, v))
cpu = torch.ops.aotpack.fp8_sdpa(q8, k8, v8, dq, dk, dv).float() * dv
args = [t.cuda() for t in (q8, k8, v8, dq, dk, dv)]
gpu = torch.ops.aotpack.fp8_sdpa(*args)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    replayed = torch.ops.aotpack.fp8_sdpa(*args)
graph.replay(); torch.cuda.synchronize()
rel = lambda a, b: float((a - b).norm() / b.norm())
print(json.dumps({"gpu_vs_cpu_reference": rel(gpu.float().cpu() * dv, cpu),
                  "graph_replay_equals_eager": bool(torch.equal(replayed.view(torch.uint8), gpu.view(torch.uint8)))}))
PY
cat "$OUT/fp8_op_check.json"
fi
SECONDS=0
for label in ${BUILD_DEFAULT:+default} $LEVERS; do build "$label" & done
wait
[ -n "${BUILD_DEFAULT:-}" ] && { tail -2 "$OUT/build-default.log"; rm -rf /tmp/pkg; ln -s /tmp/levers/default /tmp/pkg; }
args=(--variant default=/tmp/pkg)
[ "${GRAPHS:-0}" = 1 ] && args+=(--graph-variant default)
for label in $LEVERS; do
  grep -m3 -n -E "Error|error:" "$OUT/build-$label.log"; tail -4 "$OUT/build-$label.log"
  # a lever whose build failed (e.g. its validation refused it) is reported above and left out
  if [ -f "/tmp/levers/$label/manifest.json" ]; then
    args+=(--variant "$label=/tmp/levers/$label")
    [ "${GRAPHS:-0}" = 1 ] && args+=(--graph-variant "$label")
  fi
done
cp /tmp/levers/fp8attn/manifest.json "$OUT/manifest-fp8attn.json" 2>/dev/null
if [ "${KEEP_PACKAGES:-0}" = 1 ]; then
  for label in ${BUILD_DEFAULT:+default} $LEVERS; do [ -d "/tmp/levers/$label" ] && tar cf "$OUT/package-$label.tar" -C "/tmp/levers/$label" . ; done
fi
for size in $SIZES; do
  out="$OUT"; [ "$size" = "$SIZE" ] || out="$OUT/$size"
  timeout "${VARIANTS_TIMEOUT:-240}" python3 -m aotpack.bench.variants --model random:flux-dev --out "$out" --height "$size" --width "$size" \
    "${args[@]}" 2>&1 | grep "^\[variants\]" | cut -c1-400
done
speed_lever=${SPEED_LEVER:-}
[ -z "$SIZE" ] && exit 0  # no size: nothing to step
[ "${FP8_SPEED:-1}" = 1 ] && [[ " $LEVERS " == *" fp8attn "* ]] && speed_lever=fp8attn
if [ -n "$speed_lever" ]; then
  timeout "${SPEED_TIMEOUT:-200}" python3 -m aotpack.bench.speed --package "/tmp/levers/$speed_lever" \
    --model random:flux-dev --out "$OUT/$speed_lever" --sizes "$SIZE" --skip-recipe --lora-std 0.15 \
    ${FIDELITY_STDS:+--fidelity-stds $FIDELITY_STDS} > "$OUT/$speed_lever-speed.log" 2>&1
  echo "speed bench $speed_lever: exit $?"
  head -40 "$OUT/$speed_lever/speed.md" 2>/dev/null
fi
