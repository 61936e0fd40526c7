"""Why the first cached switch to r64-all took 398 ms after 2048² steps (2026-12-01 speed run; 8.5 ms at
1024²): the bench's sequence again, each switch with its phases (SwitchResult.phases_ms) and any Python
GC pass that ran inside it. Run on the GPU machine: python3 scripts/gpu/probe_switch.py PKG OUT_JSON
"""

import gc
import json
import sys
import time

import torch

import aotpack
from aotpack.bench.compare import shared_workload
from aotpack.bench.loras import write_bench_loras
from aotpack.bench.timing import kernel_breakdown, time_ms

package, out = sys.argv[1], sys.argv[2]
gc_passes = []
gc_started = {}


def on_gc(phase, info):
    if phase == "start":
        gc_started["t"] = time.perf_counter()
    else:
        gc_passes.append({"generation": info["generation"], "ms": (time.perf_counter() - gc_started["t"]) * 1000,
                          "at": time.perf_counter()})


gc.callbacks.append(on_gc)
served = aotpack.load(package, model="random:flux-dev", cuda_graphs=False)
config = dict(served.transformer.config)
loras = write_bench_loras(config, "/tmp/aotpack-bench-loras", names=["r16-attn", "r64-all"], std=0.15)
result = {}
for size, profile in ((2048, True), (2048, False), (1024, True)):
    inputs = shared_workload(config, height=size, width=size, steps=1, text_tokens=512, dtype=torch.bfloat16,
                             device="cuda")[0]
    served.set_loras([(loras["r64-all"], 1.0)])
    def step(inputs=inputs):
        return served.transformer(**inputs)

    with torch.no_grad():
        time_ms(step, "cuda", warmup=2, repeats=5)
        if profile:
            kernel_breakdown(step, "cuda")
    served.set_loras([(loras["r16-attn"], 1.0)])
    rows = []
    for _ in range(3):
        for name, entries in (("r16-attn", [(loras["r16-attn"], 1.0)]), ("r64-all", [(loras["r64-all"], 1.0)]),
                              ("none", [])):
            torch.cuda.synchronize()
            before = len(gc_passes)
            started = time.perf_counter()
            switch = served.set_loras(entries)
            rows.append({"set": name, "ms": (time.perf_counter() - started) * 1000, "phases_ms": switch.phases_ms,
                         "gc_passes": gc_passes[before:]})
    result[f"{size}{'-profiled' if profile else ''}"] = rows
    print(json.dumps(rows[:3]), flush=True)
with open(out, "w") as file:
    json.dump(result, file, indent=1, default=str)
