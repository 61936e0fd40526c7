"""Short requests against the merge, and where `set_loras(..., merge=True)` spends its time: what the merge
policy's threshold (runtime/merge_policy.py) is set from. Random weights.

1. `set_loras(r64, merge=True)` from no LoRA, device-synced, three times, with the call's phases (`phases_ms`), host
   milliseconds inside each runtime function it calls (wrapped timers), and one torch.profiler table.
2. Whole requests (switch in, N steps, switch out, device-synced) at 1024² and 512² for several N: no LoRA, the set in
   slots, and the set merged before its first step (merge policy "always": the policy's own path, bank write
   included). Best of `REPEATS` after one warm-up request per mode and size (CUDA graphs captured there).

On the GPU machine: `python3 scripts/gpu/probe_short_requests.py PACKAGE $OUT/short.json`
(`MODEL=tiny TEXT_TOKENS=8 REQUESTS=64:1,2` for a CPU smoke test of the script).
"""

import collections
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

import aotpack
import aotpack.runtime.address_merge as address_merge_module
import aotpack.runtime.pipeline as pipeline_module
from aotpack.bench import images
from aotpack.bench.compare import shared_workload
from aotpack.bench.loras import write_bench_loras
from aotpack.bench.timing import synced_ms
from aotpack.models.checkpoint import load_transformer_config, parse_model_ref

MODEL = os.environ.get("MODEL", "random:flux-dev")
LORA = "r64-all"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TEXT_TOKENS = int(os.environ.get("TEXT_TOKENS", "512"))
REQUESTS = os.environ.get("REQUESTS", "1024:1,2,4,8;512:4,8,16,28")  # size:steps,... ; ...
REPEATS = int(os.environ.get("REPEATS", "3"))


def timed_ms(fn) -> float:
    return round(synced_ms(fn, DEVICE), 2)


def wrap_timers(served) -> dict:
    """Host ms per runtime function during a switch (wrapped in place; `totals` is cleared per call)."""
    totals = collections.defaultdict(float)

    def wrap(owner, name, label):
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                totals[label] += (time.perf_counter() - started) * 1000

        setattr(owner, name, timed)

    modes = served.transformer.lora_modes
    wrap(pipeline_module, "stack_adapters", "stack_adapters")
    wrap(served.text_encoder_lora, "activate", "text_encoder_activate")
    wrap(modes, "_merge_targets", "merge_targets (module lookups)")
    wrap(modes, "_keep_device", "keep_device (mem_get_info)")
    wrap(modes, "_save", "save via CopyPlan (rest)")
    wrap(modes, "leave", "leave")
    wrap(served.transformer.bank, "write", "bank.write")
    wrap(address_merge_module, "stacked_factors", "stacked_factors")
    by_address = getattr(served.transformer, "address_merge", None)
    if by_address is not None:
        wrap(by_address, "save", "address save (groups)")
        wrap(by_address, "fold", "address fold (factors + program)")
        wrap(by_address, "_address_tables", "address tables")
    return totals


def switch_phases(served, lora) -> dict:
    totals = wrap_timers(served)
    runs = []
    for _ in range(3):
        served.set_loras([])
        totals.clear()
        result = {}
        result["merge_ms"] = timed_ms(lambda: result.setdefault("switch", served.set_loras(lora, merge=True)))
        result["phases_ms"] = {k: round(v, 2) for k, v in result.pop("switch").phases_ms.items()}
        result["host_ms"] = {k: round(v, 2) for k, v in totals.items()}
        result["merge_host_seconds"] = dict(served.transformer.lora_modes.last_merge_seconds)
        totals.clear()
        result["unmerge_ms"] = timed_ms(lambda: served.set_loras([]))
        result["unmerge_host_ms"] = {k: round(v, 2) for k, v in totals.items()}
        runs.append(result)
    profile = None
    if DEVICE == "cuda":
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            served.set_loras(lora, merge=True)
            torch.cuda.synchronize()
        averages = prof.key_averages()
        profile = {"by_cuda_time": averages.table(sort_by="self_cuda_time_total", row_limit=20),
                   "by_cpu_time": averages.table(sort_by="cpu_time_total", row_limit=25)}
        served.set_loras([])
    return {"runs": runs, "profile": profile}


def short_requests(served, config, lora) -> dict:
    rows = {}
    for spec in REQUESTS.split(";"):
        size, steps_list = spec.split(":")
        size = int(size)
        inputs = shared_workload(config, height=size, width=size, steps=1, text_tokens=TEXT_TOKENS,
                                 dtype=torch.bfloat16, device=DEVICE, batch=1)[0]
        tokens = inputs["hidden_states"].shape[1] + inputs["encoder_hidden_states"].shape[1]
        images.measure(served, {size: inputs}, DEVICE, lora, policy="always", steps=1, repeats=1)  # warm-up
        for steps in (int(s) for s in steps_list.split(",")):
            measured = images.measure(served, {size: inputs}, DEVICE, lora, policy="always", steps=steps,
                                      repeats=REPEATS)["sizes"][size]
            row = {mode: {"best_ms": round(r["best_ms"], 2), "all_ms": [round(x, 2) for x in r["all_ms"]],
                          "merged": r["merged"]} for mode, r in measured.items()}
            row["token_steps"] = tokens * steps
            row["merge_gain_ms"] = round(row["slots"]["best_ms"] - row["merge_policy"]["best_ms"], 2)
            rows[f"{size}x{steps}"] = row
            print(json.dumps({f"{size}x{steps}": row}), flush=True)
    return rows


def main(package, path):
    config = load_transformer_config(parse_model_ref(MODEL))
    lora = [(write_bench_loras(config, Path("/tmp/aotpack-bench-loras"), names=[LORA], std=0.02)[LORA], 1.0)]
    started = time.perf_counter()
    served = aotpack.load(package, model=MODEL)  # CUDA graphs and the merge policy as the runtime's defaults
    result = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else None, "torch": torch.__version__,
              "model": MODEL, "lora": LORA, "text_tokens": TEXT_TOKENS,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load_s": round(time.perf_counter() - started, 2)}
    served.set_loras(lora)  # parsed once: every switch below is a cached one
    served.set_loras([])
    result["requests"] = short_requests(served, config, lora)
    Path(path).write_text(json.dumps(result, indent=1))
    result["switch"] = switch_phases(served, lora)
    Path(path).write_text(json.dumps(result, indent=1))
    for run in result["switch"]["runs"]:
        print(json.dumps(run), flush=True)
    if result["switch"]["profile"]:
        print(result["switch"]["profile"]["by_cuda_time"])
        print(result["switch"]["profile"]["by_cpu_time"])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
