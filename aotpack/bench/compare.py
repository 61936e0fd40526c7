"""aotpack vs what users run today, in one process on one GPU, same random weights and LoRAs.

    python -m aotpack.bench.compare --package DIR --out OUT [--model random:flux-dev]

1. diffusers eager bf16 + PEFT LoRA (`load_lora_adapter`, `set_adapters`);
2. the published fast recipe: torchao FP8 row-wise + PEFT hotswap (`enable_lora_hotswap`,
   `load_lora_adapter(..., hotswap=True)`) + `compile_repeated_blocks(fullgraph=True)` (regional:
   the whole-model compile does not fit one 10-minute command on the H200), cuDNN SDPA;
3. the aotpack package (loaded through `serve_demo`, which also generates the images).

Writes OUT/bench.json progressively, so a run cut short still reports what it measured. The top kernels
(profiler) come last, once every contender is timed: a profiler session slows what follows it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..models.checkpoint import load_transformer_config, parse_model_ref
from ..models.examples import relative_error, transformer_inputs
from ..models.random_weights import (
    make_pipeline,
    make_transformer,
    random_prompt_embeds,
)
from ..runtime.pipeline import load_package
from . import serve_demo
from .checks import package_and_output
from .loras import write_bench_loras
from .timing import (
    Profiles,
    Stopwatch,
    bench_device,
    free_memory,
    kernel_profiles_on,
    peak_memory_gb,
    reset_peak_memory,
    time_ms,
    top_kernels,
)


class Report:
    def __init__(self, path: Path):
        self.path, self.data = path, {"date": time.strftime("%Y-%m-%d"), "weights": "random"}

    def __setitem__(self, key, value):
        self.data[key] = value
        self.save()
        print(f"[bench] {key}: {json.dumps(value, default=str)[:400]}", flush=True)


    def save(self) -> None:
        """Write the report as it stands (also after entries were filled in place)."""
        self.path.write_text(json.dumps(self.data, indent=2, default=str))


def _dynamo_graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def image_seconds(name: str, dtype, device, transformer, request: dict) -> float:
    """One full image through a stock `FluxPipeline` (random VAE, prompt embeddings) around `transformer`."""
    pipe = make_pipeline(name, dtype, transformer, device)
    with torch.no_grad(), Stopwatch(device) as watch:
        pipe(**request, generator=torch.Generator("cpu").manual_seed(42))
    return watch.seconds


def eager_peft(name: str, dtype, device, inputs: dict, loras: dict, request: dict) -> tuple[dict, torch.Tensor]:
    """diffusers eager + PEFT: step time with a rank-64 LoRA, switch times, output for error checks."""
    reset_peak_memory(device)
    model = make_transformer(name, dtype, device)
    result = {}
    with Stopwatch(device) as watch:
        model.load_lora_adapter(str(loras["r64-all"]), adapter_name="r64", prefix="transformer")
    result["switch_from_file_ms"] = watch.seconds * 1000
    model.load_lora_adapter(str(loras["r16-attn"]), adapter_name="r16", prefix="transformer")
    with Stopwatch(device) as watch:
        model.set_adapters(["r64"], [1.0])
    result["switch_loaded_ms"] = watch.seconds * 1000
    with torch.no_grad():
        result["step"] = time_ms(lambda: model(**inputs), device, warmup=2, repeats=10)
        output = model(**inputs, return_dict=False)[0].float()
    result["image_seconds"] = image_seconds(name, dtype, device, model, request)
    result["peak_gpu_gb"] = peak_memory_gb(device)
    del model
    free_memory()
    return result, output


def recipe_transformer(name: str, dtype, device, lora, compile_mode: str | None = None) -> torch.nn.Module:
    """The published fast recipe, set up: torchao FP8 row-wise (on a GPU) + PEFT hotswap with the first
    LoRA + `compile_repeated_blocks(fullgraph=True)`. Compiling happens at the first call. `compile_mode`
    is torch.compile's `mode` (None: its default; "reduce-overhead" adds CUDA graphs per compiled block)."""
    model = make_transformer(name, dtype, device)
    if torch.device(device).type == "cuda":
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            quantize_,
        )

        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    model.enable_lora_hotswap(target_rank=64)  # the largest rank swapped in later
    model.load_lora_adapter(str(lora), adapter_name="default_0", prefix="transformer")
    model.compile_repeated_blocks(fullgraph=True, **({"mode": compile_mode} if compile_mode else {}))
    return model


def recipe_measurements(model, name: str, dtype, device, inputs: dict, loras: dict, request: dict,
                        profiles: Profiles, into: dict | None = None) -> dict:
    """Step time, hotswaps from file and the recompiles they cause, a pipeline image (into `into`, or a new dict);
    its top kernels queued on `profiles`, which keeps `model` alive until they run."""
    result = {} if into is None else into
    graphs_before = _dynamo_graph_count()
    with torch.no_grad():
        result["step"] = time_ms(lambda: model(**inputs), device, warmup=2, repeats=10)
        switches = []
        for adapter in ("r16-attn", "r64-all"):
            with Stopwatch(device) as watch:
                model.load_lora_adapter(str(loras[adapter]), adapter_name="default_0", prefix="transformer",
                                        hotswap=True)
            with Stopwatch(device) as after:
                model(**inputs)
            switches.append({"adapter": adapter, "hotswap_from_file_ms": watch.seconds * 1000,
                             "next_step_ms": after.seconds * 1000})
        result["hotswaps"] = switches
    result["recompiles_during_switches"] = _dynamo_graph_count() - graphs_before
    result["image_seconds"] = image_seconds(name, dtype, device, model, request)
    result["recompiles_in_pipeline_image"] = _dynamo_graph_count() - graphs_before - result["recompiles_during_switches"]
    result["peak_gpu_gb"] = peak_memory_gb(device)
    if kernel_profiles_on(device):
        profiles.queue(result, "top_kernels", lambda: _top_kernels(lambda: model(**inputs), device))
    return result


def _top_kernels(step, device) -> list[dict]:
    with torch.no_grad():
        return top_kernels(step, device)


def aotpack_top_kernels(package: str, model: str, lora, inputs: dict) -> list[dict]:
    """The aotpack step's top kernels, on the package loaded again as `serve_demo` loads it, `lora` in slots as when
    its step was timed. Loaded again rather than kept: kept, its weights (~12 GB for FLUX.1-dev) would sit under
    eager's and the recipe's timings and peak memory."""
    with load_package(package, model) as served:  # closed after: a dropped package keeps its weights (docs/gpu.md)
        served.set_loras([(lora, 1.0)], merge=False)
        return _top_kernels(lambda: served.transformer(**inputs, return_dict=False), served.device)


def compiled_recipe(name: str, dtype, device, inputs: dict, loras: dict, request: dict,
                    profiles: Profiles) -> tuple[dict, torch.Tensor]:
    """torchao FP8 + PEFT hotswap + regional torch.compile: compile time, step, hotswap, recompiles; its top kernels
    queued on `profiles`."""
    reset_peak_memory(device)
    torch._dynamo.reset()
    started = time.perf_counter()
    model = recipe_transformer(name, dtype, device, loras["r64-all"])
    with torch.no_grad(), Stopwatch(device) as first:
        output = model(**inputs, return_dict=False)[0].float()
    result = {"first_call_seconds_incl_compile": first.seconds,
              "setup_to_first_output_seconds": time.perf_counter() - started}
    recipe_measurements(model, name, dtype, device, inputs, loras, request, profiles, into=result)
    return result, output  # `model` stays alive in its queued profile until `profiles.run()`


def shared_workload(config: dict, *, height: int, width: int, steps: int, text_tokens: int, dtype, device,
                    batch: int = 1):
    """The transformer inputs (seed 5) and the pipeline request every contender gets."""
    inputs = transformer_inputs(config, batch=batch, image_tokens=(height // 16) * (width // 16),
                                text_tokens=text_tokens, dtype=dtype, device=device,
                                generator=torch.Generator().manual_seed(5))
    request = dict(zip(("prompt_embeds", "pooled_prompt_embeds"),
                       random_prompt_embeds(config, batch, text_tokens, dtype, device)),
                   height=height, width=width, num_inference_steps=steps, guidance_scale=3.5)
    return inputs, request


def run(package: str, model: str, out: Path, *, height: int, width: int, steps: int, text_tokens: int,
        lora_dir: Path, skip_recipe: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out / "bench.json")
    ref = parse_model_ref(model)
    config = load_transformer_config(ref)
    device, dtype = bench_device()
    report["setup"] = {"model": model, "height": height, "width": width, "steps": steps, "text_tokens": text_tokens,
                       "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if device == "cuda" else None}
    loras = write_bench_loras(config, lora_dir, names=["r16-attn", "r64-all", "r128-mlp"])
    inputs, request = shared_workload(config, height=height, width=width, steps=steps, text_tokens=text_tokens,
                                      dtype=dtype, device=device)
    profiles = Profiles()  # run once every contender is timed

    # 3. aotpack first: load, switch, images (serve_demo), then its output on the shared inputs.
    demo, served = serve_demo.run(package, model, out, height=height, width=width, steps=steps,
                                  text_tokens=text_tokens, lora_dir=lora_dir, keep=True)
    with Stopwatch(device) as watch:
        fitted = served.set_loras([(loras["r128-mlp"], 1.0)], fit="svd")
    levers = {"switch_r128_mlp_svd_fit_to_max_rank_ms": watch.seconds * 1000, "r128_fit_notes": fitted.notes[:3]}
    served.set_loras([(loras["r64-all"], 1.0)], merge=False)  # slots: the output compared with eager's

    with torch.no_grad():
        aotpack_output = served.transformer(**inputs, return_dict=False)[0].float()
    report["aotpack"] = {**{k: demo[k] for k in ("load_seconds", "load_peak_gpu_gb", "bf16_weights_gb", "step",
                                                 "requests", "switch_r64_all_from_file_ms", "peak_gpu_gb",
                                                 "manifest")}, **levers}
    # the package goes before eager's and the recipe's timings and peaks: closed, as a dropped one keeps its weights
    # allocated (torch's AOTInductor, docs/gpu.md known issue 7)
    served.close()
    del served, fitted
    free_memory()

    eager, eager_output = eager_peft(ref.location, dtype, device, inputs, loras, request)
    eager["aotpack_rel_error_vs_eager"] = relative_error(aotpack_output, eager_output)
    report["eager_bf16_peft"] = eager
    if not skip_recipe:
        recipe, recipe_output = compiled_recipe(ref.location, dtype, device, inputs, loras, request, profiles)
        recipe["rel_error_vs_eager"] = relative_error(recipe_output, eager_output)
        recipe["aotpack_rel_error_vs_recipe"] = relative_error(aotpack_output, recipe_output)
        report["compiled_recipe_regional"] = recipe
    if kernel_profiles_on(device):  # queued last: the recipe's model goes before the package loads again
        profiles.queue(report.data["aotpack"], "top_kernels",
                       lambda: aotpack_top_kernels(package, model, loras["r64-all"], inputs))
    profiles.run()  # every timed figure is in: now the top kernels
    report.save()  # with them
    return report.data


def main(argv=None) -> None:
    parser = serve_demo.workload_parser(__doc__)
    parser.add_argument("--skip-recipe", action="store_true")
    args = parser.parse_args(argv)
    package_and_output(args)
    run(args.package, args.model, args.out, skip_recipe=args.skip_recipe, **serve_demo.workload_kwargs(args))


if __name__ == "__main__":
    main()
