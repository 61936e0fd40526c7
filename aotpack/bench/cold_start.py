"""Cold start: a fresh process, weights at hand, until the first image is out.

    python -m aotpack.bench.cold_start --package DIR --model random:flux-dev --out OUT

Three fresh processes, one after another, each timed from spawn to exit by this parent:
1. `aotpack`: load the package, activate a LoRA, generate one image;
2. `recipe`: torchao FP8 + PEFT hotswap + `compile_repeated_blocks(fullgraph=True)` with empty
   inductor/triton caches (a true JIT cold start), then it saves the compile cache
   (`torch.compiler.save_cache_artifacts`);
3. `recipe-warm`: the same with fresh, empty cache folders, warm-started from that saved cache
   (`torch.compiler.load_cache_artifacts`): the strongest JIT competitor.
Each child also reports its own phases. Writes OUT/cold_start.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

KINDS = ("aotpack", "recipe", "recipe-warm")
RESULT_PREFIX = "COLD_START_RESULT "


def _request(config: dict, height: int, width: int, steps: int, text_tokens: int, dtype, device) -> dict:
    from ..random_models import random_prompt_embeds

    embeds, pooled = random_prompt_embeds(config, 1, text_tokens, dtype, device)
    return dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=height, width=width,
                num_inference_steps=steps, guidance_scale=3.5, generator=torch.Generator("cpu").manual_seed(42))


def _child_aotpack(args, phases: dict, lora: Path) -> None:
    from ..serve import load_package
    from .timing import Stopwatch

    with Stopwatch("cuda" if torch.cuda.is_available() else "cpu") as watch:
        served = load_package(args.package, args.model)
    phases["load_package"] = watch.seconds
    with Stopwatch(served.device) as watch:
        served.set_loras([(lora, 1.0)])
    phases["activate_lora"] = watch.seconds
    request = _request(dict(served.transformer.config), args.height, args.width, args.steps, args.text_tokens,
                       served.transformer.dtype, served.device)
    with Stopwatch(served.device) as watch:
        served(**request)
    phases["first_image"] = watch.seconds


def _child_recipe(args, phases: dict, lora: Path, warm: bool) -> None:
    from ..models import parse_model_ref
    from ..random_models import make_pipeline, make_transformer
    from .timing import Stopwatch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    name = parse_model_ref(args.model).location
    if warm:
        with Stopwatch(device) as watch:
            torch.compiler.load_cache_artifacts(Path(args.cache).read_bytes())
        phases["load_cache_artifacts"] = watch.seconds
    with Stopwatch(device) as watch:
        model = make_transformer(name, dtype, device)
        if device == "cuda":
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

            quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        model.enable_lora_hotswap(target_rank=64)
        model.load_lora_adapter(str(lora), adapter_name="default_0", prefix="transformer")
        model.compile_repeated_blocks(fullgraph=True)
        pipe = make_pipeline(name, dtype, model, device)
    phases["load_quantize_lora"] = watch.seconds
    with Stopwatch(device) as watch:
        pipe(**_request(dict(model.config), args.height, args.width, args.steps, args.text_tokens, dtype, device))
    phases["first_image_incl_compile"] = watch.seconds
    if not warm:
        with Stopwatch(device) as watch:
            artifacts = torch.compiler.save_cache_artifacts()
            if artifacts is None:
                raise RuntimeError("torch.compiler.save_cache_artifacts() returned nothing to save")
            Path(args.cache).write_bytes(artifacts[0])
        phases["save_cache_artifacts"] = watch.seconds
        phases["cache_bytes"] = len(artifacts[0])


def child(args) -> None:
    from ..models import load_transformer_config, parse_model_ref
    from .loras import write_bench_loras

    phases: dict = {"imported_seconds": time.perf_counter() - float(os.environ["AOTPACK_SPAWNED_AT"])}
    lora = write_bench_loras(load_transformer_config(parse_model_ref(args.model)), args.lora_dir,
                             names=["r64-all"])["r64-all"]
    if args.kind == "aotpack":
        _child_aotpack(args, phases, lora)
    else:
        _child_recipe(args, phases, lora, warm=args.kind == "recipe-warm")
    if torch.cuda.is_available():
        phases["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print(RESULT_PREFIX + json.dumps(phases), flush=True)


def spawn(kind: str, args, cache: Path, log) -> dict:
    """Run one child in a fresh process with empty inductor/triton caches; wall time from spawn to exit."""
    with tempfile.TemporaryDirectory(prefix=f"aotpack-cold-{kind}-") as caches:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{caches}/inductor", "TRITON_CACHE_DIR": f"{caches}/triton"}
        command = [sys.executable, "-m", "aotpack.bench.cold_start", "--child", kind, "--package", str(args.package),
                   "--model", args.model, "--out", str(args.out), "--cache", str(cache),
                   "--height", str(args.height), "--width", str(args.width), "--steps", str(args.steps),
                   "--text-tokens", str(args.text_tokens), "--lora-dir", str(args.lora_dir)]
        started = time.perf_counter()
        env["AOTPACK_SPAWNED_AT"] = repr(started)
        process = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall = time.perf_counter() - started
    log.write(f"===== {kind} (exit {process.returncode}, {wall:.1f} s)\n{process.stdout}\n")
    lines = [line for line in process.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if process.returncode or not lines:
        return {"failed": f"exit {process.returncode}", "tail": process.stdout[-2000:], "wall_seconds": wall}
    return {"process_to_first_image_seconds": wall, **json.loads(lines[-1][len(RESULT_PREFIX):])}


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache)
    results = {"date": time.strftime("%Y-%m-%d"), "weights": "random", "model": args.model,
               "height": args.height, "width": args.width, "steps": args.steps, "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    with open(out / "cold_start.log", "w") as log:
        for kind in args.kinds:
            results[kind] = spawn(kind, args, cache, log)
            log.flush()
            (out / "cold_start.json").write_text(json.dumps(results, indent=2))
            print(f"[cold start] {kind}: {json.dumps(results[kind])[:300]}", flush=True)
    return results


def main(argv=None) -> None:
    from .serve_demo import workload_parser

    parser = workload_parser(__doc__)
    parser.add_argument("--child", dest="kind", choices=KINDS, default=None)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "aotpack-recipe-cache.bin"))
    args = parser.parse_args(argv)
    if args.kind:
        child(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
