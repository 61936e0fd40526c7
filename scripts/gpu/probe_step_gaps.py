"""Where does a step spend the time between its kernels? (issue 11: slots 100.9 ms from CUDA graphs at 1024² on
94.4 ms of kernels, 2026-12-04d)

Loads a package as the variants bench does (r64 LoRA in slots, or none), steps it plain and replayed from the
runtime's CUDA graphs, and traces a few steps with the profiler (kernels, memsets and copies on the device's
timeline). Per step: kernels, their summed time, the span from the first kernel's start to the last's end, and
the idle time in between, bucketed by gap length, by the category of the kernel that follows, and the longest
gaps with their neighbours. Step times without the profiler (CUDA events) beside them.

On the GPU machine: `python3 scripts/gpu/probe_step_gaps.py PACKAGE_DIR $OUT/step_gaps.json [SIZE ...]`
"""

import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from aotpack.bench.timing import kernel_category, time_ms
from aotpack.bench.variants import _activate, _load
from aotpack.machine.cublaslt import use_no_cublaslt_workspace

STEP_BREAK_US = 2000  # the sleep between traced steps: a gap longer than this starts a new step
BUCKETS_US = (2, 5, 10, 50, 200, STEP_BREAK_US)


def device_events(trace_path: Path) -> list[dict]:
    events = json.loads(trace_path.read_text())["traceEvents"]
    kept = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")]
    return sorted(kept, key=lambda e: float(e["ts"]))


def steps_of(events: list[dict]) -> list[list[dict]]:
    steps, current, end = [], [], 0.0
    for e in events:
        start, stop = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        if current and start - end > STEP_BREAK_US:
            steps.append(current)
            current = []
        end = max(end, stop) if current else stop
        current.append(e)
    if current:
        steps.append(current)
    return steps


def gaps_of(step: list[dict]) -> dict:
    busy, idle = 0.0, []
    end = float(step[0]["ts"])
    for prev, e in zip([None] + step[:-1], step):
        start, dur = float(e["ts"]), float(e["dur"])
        busy += dur
        if prev is not None and start > end:
            idle.append((start - end, prev["name"], e["name"]))
        end = max(end, start + dur)
    span = end - float(step[0]["ts"])
    by_bucket = Counter()
    by_bucket_us = defaultdict(float)
    by_next = defaultdict(float)
    for gap, _, nxt in idle:
        bucket = next(f"<{b}us" for b in BUCKETS_US if gap < b) if gap < BUCKETS_US[-1] else "longer"
        by_bucket[bucket] += 1
        by_bucket_us[bucket] += gap
        by_next[kernel_category(nxt)] += gap
    longest = sorted(idle, reverse=True)[:15]
    # what the memsets and copies sit between (which op issues them), and the kernels by count
    neighbours = Counter()
    for prev, e, nxt in zip([None] + step[:-1], step, step[1:] + [None]):
        if kernel_category(e["name"]) == "other":
            neighbours[(e["name"][:40], (prev or {}).get("name", "")[:70], (nxt or {}).get("name", "")[:70])] += 1
    by_name = defaultdict(lambda: [0, 0.0])
    for e in step:
        by_name[e["name"][:100]][0] += 1
        by_name[e["name"][:100]][1] += float(e["dur"]) / 1000
    return {
        "kernels": len(step), "kernel_ms": busy / 1000, "span_ms": span / 1000,
        "idle_ms": sum(g for g, _, _ in idle) / 1000,
        "idle_by_gap_length": {b: {"gaps": by_bucket[b], "ms": round(by_bucket_us[b] / 1000, 3)} for b in by_bucket},
        "idle_ms_by_next_category": {k: round(v / 1000, 3) for k, v in sorted(by_next.items(), key=lambda kv: -kv[1])},
        "kernel_names": Counter(kernel_category(e["name"]) for e in step),
        "other_between": [{"count": c, "op": k[0], "after": k[1], "before": k[2]}
                          for k, c in neighbours.most_common(12)],
        "kernels_by_count": [{"kernel": k, "count": c, "ms": round(ms, 3)}
                             for k, (c, ms) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:40]],
        "longest_gaps": [{"us": round(g, 1), "after": a[:90], "before": b[:90]} for g, a, b in longest],
    }


def traced(step, steps: int = 3) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                step()
                torch.cuda.synchronize()
                time.sleep(0.01)
        prof.export_chrome_trace(str(path))
        found = steps_of(device_events(path))
    return [gaps_of(s) for s in found]


def main(package: str, out_path: str, sizes: list[int]) -> None:
    workspace = use_no_cublaslt_workspace()  # as aotpack's CLI runs (a value set in the environment is kept)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "package": package, "sizes": {},
              "cublaslt_workspace_kib": workspace}
    lora_dir = Path(tempfile.mkdtemp())
    for size in sizes:
        tokens = (size // 16) ** 2
        served = _load(package, "random:flux-dev")
        _, step, _ = _activate(served, image_tokens=tokens, text_tokens=512, lora_dir=lora_dir)
        result = {}
        with torch.no_grad():
            for mode in ("slots", "no_lora"):
                if mode == "no_lora":
                    served.set_loras([])
                for graphs in (False, True):
                    served.transformer.use_cuda_graphs(graphs)
                    label = f"{mode}_{'graph' if graphs else 'plain'}"
                    timed = time_ms(step, served.device, warmup=3, repeats=10)
                    steps = traced(step)
                    result[label] = {"step_ms": timed, "traced_steps": len(steps), "last_traced": steps[-1]}
                    s = steps[-1]
                    print(f"[gaps] {size} {label}: step {timed['median_ms']:.2f} ms, {s['kernels']} kernels "
                          f"{s['kernel_ms']:.2f} ms, span {s['span_ms']:.2f}, idle {s['idle_ms']:.2f} "
                          f"{json.dumps(s['idle_by_gap_length'])} {json.dumps(s['idle_ms_by_next_category'])}",
                          flush=True)
        report["sizes"][size] = result
        del served, step
        torch.cuda.empty_cache()
    Path(out_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3:]] or [1024])
