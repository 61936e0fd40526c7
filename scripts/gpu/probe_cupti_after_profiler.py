"""Does a finished torch.profiler session slow what runs after it in the same process?

Kineto leaves CUPTI attached when a profiler session ends unless TEARDOWN_CUPTI=1 (pytorch/pytorch#144455, open),
so every later kernel launch may pay CUPTI's callbacks. Until 2026-12-03 the speed bench profiled a kernel
breakdown per mode and timed the next mode (and the recipe) after it; a recipe whose step sat 50 ms above its kernel
time in some bench processes and not in others would be explained by this.

Per phase (before any profiler, after one profiler session) and per setting (default; TEARDOWN_CUPTI=1; the benches'
`timing.kernel_rows`, which sets it at run time), each in a fresh child process: wall ms of 3000 tiny launches (host
cost per launch), device ms of 2000 small elementwise kernels and of 50 bf16 4096^3 matmuls (CUDA events), wall ms
of a CUDA graph replaying the 2000 kernels; then a second profiler session and a replay (TEARDOWN_CUPTI with CUDA
graphs crashed on CUDA 11/12 per torch's own comment). Prints one JSON line per child.

Run on a GPU machine: source scripts/gpu/env.sh; python3 scripts/gpu/probe_cupti_after_profiler.py [OUT_DIR]
(2026-12-03: benchmarks/results/2026-12-03-h200-clean-timings/cupti_after_profiler.json)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys


def _child() -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from aotpack.bench.timing import kernel_rows, synced_ms, time_ms

    tiny = torch.zeros(256, device="cuda")
    small = torch.zeros(1 << 20, device="cuda")
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def tiny_launches():
        for _ in range(3000):
            tiny.add_(1.0)

    def small_kernels():
        for _ in range(2000):
            small.mul_(1.0001)

    def matmuls():
        for _ in range(50):
            torch.mm(a, a)

    def wall_ms(fn, repeats=7):
        fn()
        return round(statistics.median(synced_ms(fn, "cuda") for _ in range(repeats)), 3)

    def device_ms(fn):
        return round(time_ms(fn, "cuda", warmup=1, repeats=7)["median_ms"], 3)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        small_kernels()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        small_kernels()

    def phase():
        return {"tiny_3000_wall_ms": wall_ms(tiny_launches), "small_2000_device_ms": device_ms(small_kernels),
                "small_2000_wall_ms": wall_ms(small_kernels), "mm_50_device_ms": device_ms(matmuls),
                "graph_replay_wall_ms": wall_ms(graph.replay)}

    def profiled():
        if os.environ.get("PROBE_VIA_KERNEL_ROWS"):  # the benches' profiler, which sets TEARDOWN_CUPTI at run time
            return len(kernel_rows(lambda: (small_kernels(), graph.replay()), "cuda", steps=1))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            small_kernels()
            graph.replay()
            torch.cuda.synchronize()
        return len(prof.key_averages())

    result = {"TEARDOWN_CUPTI": os.environ.get("TEARDOWN_CUPTI"), "via_kernel_rows": bool(os.environ.get(
        "PROBE_VIA_KERNEL_ROWS")), "before": phase()}
    result["profile_rows"] = profiled()
    result["after_one_profile"] = phase()
    result["profile_rows_again"] = profiled()
    result["after_two_profiles"] = phase()
    return result


def main() -> None:
    if os.environ.get("PROBE_CHILD"):
        print(json.dumps(_child()))
        return
    out = sys.argv[1] if len(sys.argv) > 1 else None
    rows = []
    for teardown in (None, "1", "kernel_rows"):
        env = {**os.environ, "PROBE_CHILD": "1"}
        env.pop("TEARDOWN_CUPTI", None)
        if teardown == "kernel_rows":
            env["PROBE_VIA_KERNEL_ROWS"] = "1"
        elif teardown:
            env["TEARDOWN_CUPTI"] = teardown
        done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
        line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        row = json.loads(line) if line.startswith("{") else {"TEARDOWN_CUPTI": teardown, "returncode": done.returncode,
                                                             "stderr_tail": done.stderr[-2000:]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "cupti_after_profiler.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
