"""Whole 28-step images under the merge policy at other sizes, without the eager and recipe runs of the speed bench
(for a call with little device time left): per size, no LoRA / r64-all in slots / the merge policy, switch in and
out included (`aotpack.bench.images`), plus `set_loras(r64, merge=True)` and the unmerge timed three times with the
merge's host phases. Random weights. Results are written after each size.

On the GPU machine: `python3 scripts/gpu/probe_images.py PACKAGE $OUT/images.json 512,2048`
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

import aotpack
from aotpack.bench import images
from aotpack.bench.compare import shared_workload
from aotpack.bench.loras import write_bench_loras
from aotpack.bench.timing import synced_ms
from aotpack.models.checkpoint import load_transformer_config, parse_model_ref

MODEL = os.environ.get("MODEL", "random:flux-dev")  # MODEL=tiny for a CPU smoke test of the script
LORA = "r64-all"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TEXT_TOKENS = int(os.environ.get("TEXT_TOKENS", "512"))


def timed_ms(fn) -> float:
    return round(synced_ms(fn, DEVICE), 2)


def main(package, path, sizes):
    config = load_transformer_config(parse_model_ref(MODEL))
    lora = [(write_bench_loras(config, Path("/tmp/aotpack-bench-loras"), names=[LORA], std=0.02)[LORA], 1.0)]
    started = time.perf_counter()
    served = aotpack.load(package, model=MODEL)  # CUDA graphs and the merge policy as the runtime's defaults
    result = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else None, "torch": torch.__version__,
              "model": MODEL, "lora": LORA, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load_s": round(time.perf_counter() - started, 2), "merges": [], "sizes": {}}
    for _ in range(3):
        served.set_loras([])
        merge_ms = timed_ms(lambda: served.set_loras(lora, merge=True))
        result["merges"].append({"merge_ms": merge_ms, "unmerge_ms": timed_ms(lambda: served.set_loras([])),
                                 "host_seconds": dict(served.transformer.lora_modes.last_merge_seconds)})
    for size in sizes:
        inputs = shared_workload(config, height=size, width=size, steps=1, text_tokens=TEXT_TOKENS, dtype=torch.bfloat16,
                                 device=DEVICE, batch=1)[0]
        measured = images.measure(served, {size: inputs}, DEVICE, lora, repeats=1 if size >= 2048 else 2)
        result["steps"] = measured["steps"]
        result["policy_after_token_steps"] = measured["policy_after_token_steps"]
        result["sizes"][size] = measured["sizes"][size]
        Path(path).write_text(json.dumps(result, indent=1))
        print(json.dumps({size: result["sizes"][size]}), flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(",")])
