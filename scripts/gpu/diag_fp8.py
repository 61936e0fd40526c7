"""GPU diagnostic: which row-wise FP8 `_scaled_mm` shapes cuBLASLt accepts on this torch build, and
whether a built package runs and how fast (random weights). Writes $OUT/diag.json.

    python3 scripts/gpu/diag_fp8.py PACKAGE_DIR
"""

import json
import os
import sys
import time
import traceback

import torch


def scaled_mm_sweep():
    results = []
    for k, n in [(3072, 3072), (3072, 12288), (12288, 3072), (3072, 18432), (3072, 9216), (15360, 3072)]:
        w = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
        scale_w = torch.rand(1, n, device="cuda") + 0.5
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        for m in [1, 2, 9, 256, 512, 4096, 4608]:
            x = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
            scale_x = torch.rand(m, 1, device="cuda") + 0.5
            for with_bias in (False, True):
                try:
                    torch._scaled_mm(x, w.t(), scale_a=scale_x, scale_b=scale_w, bias=bias if with_bias else None,
                                     out_dtype=torch.bfloat16, use_fast_accum=True)
                    torch.cuda.synchronize()
                    ok = "ok"
                except RuntimeError as err:
                    ok = str(err).split("\n")[0][:80]
                results.append({"m": m, "k": k, "n": n, "bias": with_bias, "result": ok})
    return results


def main(package):
    out = {}
    sweep = scaled_mm_sweep()
    out["scaled_mm_failures"] = [r for r in sweep if r["result"] != "ok"]
    print(f"scaled_mm rowwise: {len(sweep) - len(out['scaled_mm_failures'])}/{len(sweep)} shape cases ok", flush=True)
    for r in out["scaled_mm_failures"][:20]:
        print("  FAIL", r, flush=True)
    from aotpack.bench.loras import write_bench_loras
    from aotpack.bench.timing import time_ms
    from aotpack.models.examples import transformer_inputs
    from aotpack.models.random_weights import make_transformer, preset_config
    from aotpack.runtime.pipeline import load_package

    started = time.perf_counter()
    try:
        served = load_package(package, "random:flux-dev", progress=True)
        out["load_seconds"] = time.perf_counter() - started
        out["peak_after_load_gb"] = torch.cuda.max_memory_allocated() / 2**30
        inputs = transformer_inputs(served.transformer.config, batch=1, image_tokens=4096, text_tokens=512,
                                    dtype=torch.bfloat16, device="cuda", generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out["aotpack_step_no_lora"] = time_ms(lambda: served.transformer(**inputs), "cuda", warmup=3, repeats=10)
            print("aotpack step (zero LoRA):", out["aotpack_step_no_lora"], flush=True)
            loras = write_bench_loras(preset_config("flux-dev"), "/tmp/aotpack-bench-loras", names=["r64-all"])
            switch = served.set_loras([(loras["r64-all"], 1.0)])
            out["switch_from_file_ms"] = switch.seconds * 1000
            switch = served.set_loras([(loras["r64-all"], 0.7)])
            out["switch_cached_ms"] = switch.seconds * 1000
            out["aotpack_step_r64"] = time_ms(lambda: served.transformer(**inputs), "cuda", warmup=2, repeats=10)
            print("aotpack step (r64 LoRA):", out["aotpack_step_r64"], flush=True)
            sample = served.transformer(**inputs, return_dict=False)[0]
            out["output_finite"] = bool(torch.isfinite(sample).all())
    except Exception:
        out["aotpack_error"] = traceback.format_exc()[-3000:]
        print(out["aotpack_error"], flush=True)
    try:
        eager = make_transformer("flux-dev", torch.bfloat16, "cuda")
        inputs = transformer_inputs(eager.config, batch=1, image_tokens=4096, text_tokens=512,
                                    dtype=torch.bfloat16, device="cuda", generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out["eager_bf16_step"] = time_ms(lambda: eager(**inputs), "cuda", warmup=2, repeats=10)
        print("eager bf16 step:", out["eager_bf16_step"], flush=True)
    except Exception:
        out["eager_error"] = traceback.format_exc()[-2000:]
    with open(os.path.join(os.environ.get("OUT", "."), "diag.json"), "w") as handle:
        json.dump(out, handle, indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
