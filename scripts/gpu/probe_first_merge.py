"""Where a process's first merge of r64 into all block linears spends its time, against the later ones.

The speed bench measured merge + unmerge of r64-all at 180.5 + 22.8 ms the first time in a process and
101.0 + 22.7 ms the second (H200, 2026-12-02 01:20 UTC, random weights); issue 11's goal is 150 ms. Host
seconds of the two phases (LoRAModes.last_merge_seconds): save 31 vs 16 ms, fold 119 vs 68 ms.

This probe loads the package twice, in two processes (`--profile` off, then on):
- off: slots once (the LoRA file parsed and cached, as in the bench), then merge / unmerge four times,
  each timed to a device sync, with the switch's phases and the merge's host phases;
- on: the same, with the first and second merges under torch.profiler (CPU + CUDA), whose self CPU time
  per op / CUDA runtime call (cudaMalloc, module loads, launches) says what the first merge does more, and whose
  self device time per kernel says where the GPU time of a merge goes.

`--cprofile`: the first two merges under cProfile (host time per Python-visible call).
`--steps N`: N transformer steps at 1024^2 in slots before the merges (the speed bench's order).
`--warm`: `CompiledMerge.warm` (the merge program once per weight shape, on scratch zeros) before the first
merge: does the first merge pay for the program's first calls?

On the GPU machine: `python3 scripts/gpu/probe_first_merge.py PACKAGE $OUT/first_merge[-profile].json [--profile | --cprofile] [--warm] [--steps N]`
"""

import json
import os
import sys
import time

import torch

# later timings follow a profiler session here: let Kineto release CUPTI (aotpack/bench/timing.kernel_rows)
os.environ.setdefault("TEARDOWN_CUPTI", "1")

sys.path.insert(0, ".")


def _timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    started = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1000, result


def main(package: str, out_path: str, profile: bool, warm: bool, python_profile: bool, steps: int) -> None:
    import aotpack
    from aotpack.bench.loras import write_bench_loras

    started = time.perf_counter()
    served = aotpack.load(package, model="random:flux-dev", cuda_graphs=False)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "profile": profile,
              "load_s": round(time.perf_counter() - started, 1), "merges": []}
    if warm:  # CompiledMerge.warm: the merge program once per weight shape before the first merge
        compiled = served.transformer.compiled_merge
        shapes = [(spec.out_features, spec.in_features) for spec in served.manifest.slots]
        report["warm_ms"], _ = _timed(lambda: compiled.warm(shapes, served.manifest.max_rank, "cuda"))
        report["warm_shapes"] = len(set(shapes))
    lora = [(write_bench_loras(served.transformer.config, "/tmp/bench-loras", names=["r64-all"])["r64-all"], 1.0)]
    report["slots_ms"], _ = _timed(lambda: served.set_loras(lora))
    if steps:  # as in the speed bench, where merges come after steps at 1024^2
        from aotpack.models.examples import transformer_inputs

        inputs = transformer_inputs(served.transformer.config, batch=1, image_tokens=4096, text_tokens=512,
                                    dtype=torch.bfloat16, device="cuda", generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            report["step_ms"] = [round(_timed(lambda: served.transformer(**inputs, return_dict=False))[0], 1)
                                 for _ in range(steps)]
    report["clear_ms"], _ = _timed(lambda: served.set_loras([]))
    for i in range(4):
        if profile and i < 2:
            from torch.profiler import ProfilerActivity, profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                merge_ms, result = _timed(lambda: served.set_loras(lora, merge=True))
            averages = prof.key_averages()
            table = (averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
                     + averages.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=60))
            print(f"== merge {i + 1} under the profiler\n{table}", flush=True)
        elif python_profile and i < 2:  # cProfile: which Python-visible call holds the host time
            import cProfile
            import io
            import pstats

            profiler = cProfile.Profile()
            profiler.enable()
            merge_ms, result = _timed(lambda: served.set_loras(lora, merge=True))
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
            table = text.getvalue()
            print(f"== merge {i + 1} under cProfile\n{table}", flush=True)
        else:
            merge_ms, result, table = *_timed(lambda: served.set_loras(lora, merge=True)), None
        unmerge_ms, _ = _timed(lambda: served.set_loras([]))
        entry = {"merge_ms": round(merge_ms, 1), "unmerge_ms": round(unmerge_ms, 1),
                 "switch_phases_ms": {k: round(v, 1) for k, v in result.phases_ms.items()},
                 "merge_host_ms": {k: round(v * 1000, 1)
                                   for k, v in served.transformer.lora_modes.last_merge_seconds.items()},
                 **({"profile_table": table} if table else {})}
        report["merges"].append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k != "profile_table"}), flush=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    flags = sys.argv[3:]
    steps = int(flags[flags.index("--steps") + 1]) if "--steps" in flags else 0
    main(sys.argv[1], sys.argv[2], "--profile" in flags, "--warm" in flags, "--cprofile" in flags, steps)
