"""What do adapter provenance (sha256) and the per-image non-finite checks add on a GPU machine? (issue 11:
nothing regresses)

1. The rank-64 all-linears benchmark LoRA read to the GPU with (`read_safetensors`) and without
   (`load_safetensors`) its sha256, alternated, five of each (since 2026-12-06 the hash runs on a background
   thread: `read_safetensors` returns before it ends, and `..._until_sha256_s` waits for it); and
   `hashlib.sha256` of the bytes alone.
2. File switches to fresh copies of that file (new inodes: the adapter cache parses each), then cached switches;
   `then_provenance_ms`: from the switch's return until the live set's provenance (sha256 included) is read.
3. One 1024² 28-step image through `AotpackPipeline.__call__` (the VAE decoder's NaN/Inf hooks, the latents
   check) against the same call on `served.pipeline` (diffusers' own, no checks), alternated, three of each.
Random weights (random:flux-dev), random prompt embeddings.

On the GPU machine:
`source scripts/gpu/env.sh && python3 scripts/gpu/probe_provenance_cost.py PACKAGE_DIR $OUT/provenance.json`
"""

import hashlib
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from aotpack.adapters.files import load_safetensors, read_safetensors
from aotpack.bench.loras import write_bench_loras
from aotpack.models.checkpoint import load_transformer_config, parse_model_ref
from aotpack.models.prepare import torch_dtype
from aotpack.models.random_weights import random_prompt_embeds
from aotpack.runtime.jobs import adapters_used
from aotpack.runtime.pipeline import load_package

MODEL = "random:flux-dev"


def seconds(fn):
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def main(package: str, out: str):
    config = load_transformer_config(parse_model_ref(MODEL))
    lora = write_bench_loras(config, "/tmp/aotpack-bench-loras", names=["r64-all"])["r64-all"]
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "model": MODEL, "weights": "random",
               "lora_file_mb": lora.stat().st_size / 1e6}
    data = lora.read_bytes()
    results["sha256_alone_s"] = min(seconds(lambda: hashlib.sha256(data).hexdigest()) for _ in range(5))
    with_hash, without, until_hash = [], [], []
    for _ in range(5):
        without.append(seconds(lambda: load_safetensors(lora, device="cuda")))
        with_hash.append(seconds(lambda: read_safetensors(lora, device="cuda")))
        until_hash.append(seconds(lambda: read_safetensors(lora, device="cuda")[2].result()))
    results["read_to_gpu_without_sha256_s"] = without
    results["read_to_gpu_with_sha256_s"] = with_hash
    results["read_to_gpu_until_sha256_s"] = until_hash
    results["read_median_difference_s"] = statistics.median(with_hash) - statistics.median(without)
    print(json.dumps(results, indent=1), flush=True)

    served = load_package(package, MODEL)
    switches = []
    for i in range(3):
        copy = Path(f"/tmp/provenance-copy-{i}.safetensors")
        shutil.copyfile(lora, copy)
        switch = served.set_loras([(copy, 1.0)], merge=False)
        returned = time.perf_counter()
        adapters_used(served)
        switches.append({"file": copy.name, "ms": switch.seconds * 1000, "parsed": switch.parsed,
                         "then_provenance_ms": (time.perf_counter() - returned) * 1000})
    for i in range(3):
        switch = served.set_loras([(Path(f"/tmp/provenance-copy-{i}.safetensors"), 1.0)], merge=False)
        switches.append({"file": f"provenance-copy-{i} (cached)", "ms": switch.seconds * 1000,
                         "parsed": switch.parsed})
    results["switches"] = switches
    print(json.dumps(switches, indent=1), flush=True)

    dtype = torch_dtype(served.manifest.dtype)
    embeds, pooled = random_prompt_embeds(config, 1, 512, dtype, served.device)
    kwargs = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=1024, width=1024,
                  num_inference_steps=28, guidance_scale=3.5)
    with torch.no_grad():
        served(**kwargs, generator=torch.Generator("cpu").manual_seed(0))  # warm-up (graphs captured)
        checked, plain = [], []
        for seed in range(3):
            checked.append(seconds(lambda: served(**kwargs, generator=torch.Generator("cpu").manual_seed(seed))))
            plain.append(seconds(lambda: served.pipeline(**kwargs, generator=torch.Generator("cpu").manual_seed(seed))))
    results["image_checked_s"] = checked
    results["image_diffusers_call_s"] = plain
    Path(out).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: results[k] for k in ("image_checked_s", "image_diffusers_call_s")}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
