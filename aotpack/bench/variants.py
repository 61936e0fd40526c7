"""Package variants side by side in one process: LoRA-slot overhead, layouts, CUDA-graph replay.

    python -m aotpack.bench.variants --out OUT --model random:flux-dev-d2s4 \
        --variant none=/tmp/r0 --variant r64=/tmp/r64 --variant r128=/tmp/r128 --variant whole-r64=/tmp/whole

For each package (same model, same request): build and compile seconds and package size from its
manifest, load time, and the transformer step (median of 10, CUDA events) with a rank-64 LoRA
active where the package has slots; on a GPU also the step with no LoRA active (the no-slot programs,
where the package has them), the step replayed as one CUDA graph (timed from an idle device, ten
in a row as a denoising loop runs them, and over one image's 28 timesteps as FluxPipeline passes
them), and last, once every step is timed (a profiler session slows what follows it), the
kernel-time breakdowns with the heaviest kernels, with the LoRA and without.
Writes OUT/variants.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch

from ..errors import RequestError
from ..machine.cublaslt import WORKSPACE_VARIABLE, use_no_cublaslt_workspace
from ..models.examples import transformer_inputs
from ..runtime.pipeline import load_package
from .checks import output_folder, package_path
from .denoise import denoising_loop
from .loras import write_bench_loras
from .timing import Profiles, back_to_back_ms, kernel_breakdown, kernel_profiles_on, time_ms


LOOP_STEPS = 28  # FLUX.1-dev's default steps


def _load(package: str, model: str):
    """`package` as every pass loads it: the plain chain (graphs measured after), a LoRA kept in slots (each
    variant's slotted programs)."""
    return load_package(package, model, cuda_graphs=False, merge_policy="never")


def _activate(served, *, image_tokens: int, text_tokens: int, lora_dir: Path):
    """The bench LoRA every pass runs where the package has slots (None where it has none), and the step."""
    name = None
    if served.manifest.slots:
        name = "r64-all" if served.manifest.max_rank >= 64 else "r16-attn"  # the largest that fits the slots
        lora = write_bench_loras(dict(served.transformer.config), lora_dir, names=[name])[name]
        served.set_loras([(lora, 1.0)])
    inputs = transformer_inputs(served.transformer.config, batch=1, image_tokens=image_tokens,
                                text_tokens=text_tokens, dtype=served.transformer.dtype, device=served.device,
                                generator=torch.Generator().manual_seed(5))

    def step():
        return served.transformer(**inputs, return_dict=False)

    return name, step, inputs


def measure(label: str, package: str, model: str, *, image_tokens: int, text_tokens: int, lora_dir: Path,
            profiles: Profiles, cuda_graph: bool = False) -> dict:
    """The timed figures of one pass; its kernel breakdowns queued on `profiles`."""
    started = time.perf_counter()
    served = _load(package, model)
    result = {"package": str(package), "load_seconds": time.perf_counter() - started}
    manifest, device = served.manifest, served.device
    result.update(layout=manifest.layout, max_rank=manifest.max_rank, slots=len(manifest.slots),
                  programs=len(manifest.programs), package_mb=manifest.total_bytes(served.package_dir) / 1e6,
                  build_seconds=manifest.build.get("seconds"), compile_seconds=manifest.build.get("compile_seconds"),
                  validation=manifest.validation)
    workload = dict(image_tokens=image_tokens, text_tokens=text_tokens, lora_dir=lora_dir)
    name, step, inputs = _activate(served, **workload)
    if name:
        result["active_lora"] = name
    with torch.no_grad():
        result["step"] = time_ms(step, device, warmup=3, repeats=10)
        result["variant"] = served.transformer.last_variant  # which program set ran ("tails" with lora_tails)
        if cuda_graph:
            if device.type == "cuda":
                try:
                    served.transformer.use_cuda_graphs(True)  # the runtime's own step graphs (cuda_graphs.py)
                    result["step_cuda_graph"] = time_ms(step, device, warmup=3, repeats=10)
                    # and as a denoising loop runs them: ten in a row, the host enqueueing ahead of the device
                    result["step_cuda_graph_back_to_back"] = back_to_back_ms(step, device)
                    # and one image's 28 steps as FluxPipeline passes them (a batched_modulation package computes
                    # its rows once there; the plain step above repeats one timestep)
                    loop = denoising_loop(served.transformer, served.pipeline, inputs, LOOP_STEPS)
                    timed = time_ms(loop, device, warmup=1, repeats=3)
                    result["image_loop_ms_per_step"] = {k: timed[k] / LOOP_STEPS
                                                        for k in ("median_ms", "min_ms", "max_ms")}
                except Exception as err:  # a lever that does not apply is a result, not a crash
                    result["step_cuda_graph"] = {"failed": f"{type(err).__name__}: {err}"[:500]}
        elif kernel_profiles_on(device):  # where the variants differ, kernel by kernel (plain chain)
            profiles.queue(result, "breakdown", lambda: breakdown(package, model, with_lora=True, **workload))
            if manifest.slots and served.transformer.has_no_slot_programs:  # and with no LoRA: the no-slot programs
                served.set_loras([])
                result["step_no_lora"] = time_ms(step, device, warmup=3, repeats=10)
                profiles.queue(result, "breakdown_no_lora",
                               lambda: breakdown(package, model, with_lora=False, **workload))
    print(f"[variants] {label}: {json.dumps(result, default=str)[:400]}", flush=True)
    # the next pass loads a package into this process: without close() this one's weights would stay allocated
    # (an H100 ran out of memory at the breakdowns after four passes, 2026-12-06)
    served.close()
    return result


def breakdown(package: str, model: str, *, with_lora: bool, **workload) -> dict:
    """`measure`'s plain-chain step kernel by kernel, on `package` loaded again (its LoRA active, or none): kept
    loaded until every variant is timed, all the packages' weights would be on the GPU at once."""
    with _load(package, model) as served:  # closed after: the next breakdown loads the next package
        _, step, _ = _activate(served, **workload)
        if not with_lora:
            served.set_loras([])
        with torch.no_grad():
            return kernel_breakdown(step, served.device, top_kernels=12)


def run(variants: dict[str, str], model: str, out: Path, *, height: int, width: int, text_tokens: int,
        lora_dir: Path, graph_variants: tuple[str, ...] = ()) -> dict:
    """Every variant's step first; then (a capture that crashes must not cost the rest) each of the
    `graph_variants` packages again with its step also replayed from CUDA graphs; last, after every timed
    step, the kernel breakdowns, one package loaded at a time."""
    unknown = [label for label in graph_variants if label not in variants]
    if unknown:  # a typo would otherwise skip the graph pass silently
        raise RequestError(f"--graph-variant {unknown} are not among the --variant labels {sorted(variants)}",
                           "name a --variant label, or add that --variant")
    for label, package in variants.items():  # a missing package fails here, not after the others are timed
        package_path(package, f"--variant '{label}={package}'")
    out.mkdir(parents=True, exist_ok=True)
    results = {"date": time.strftime("%Y-%m-%d"), "weights": "random", "model": model, "height": height,
               "width": width, "text_tokens": text_tokens, "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
               "cublaslt_workspace_kib": os.environ.get(WORKSPACE_VARIABLE), "variants": {}}
    profiles = Profiles()
    passes = [(label, package, False) for label, package in variants.items()]
    passes += [(label, variants[label], True) for label in graph_variants]
    for label, package, graph in passes:
        _record(results["variants"], label, graph,
                measure(label, package, model, image_tokens=(height // 16) * (width // 16),
                        text_tokens=text_tokens, lora_dir=lora_dir, profiles=profiles, cuda_graph=graph))
        gc.collect()  # the previous package's programs and weights go before the next loads
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        (out / "variants.json").write_text(json.dumps(results, indent=2, default=str))
    profiles.run()  # into the entries already written: written again below
    (out / "variants.json").write_text(json.dumps(results, indent=2, default=str))
    return results


def _record(entries: dict, label: str, graph_pass: bool, measured: dict) -> None:
    if graph_pass:
        entries[label]["step_cuda_graph"] = measured.get("step_cuda_graph")
        entries[label]["step_cuda_graph_back_to_back"] = measured.get("step_cuda_graph_back_to_back")
        entries[label]["image_loop_ms_per_step"] = measured.get("image_loop_ms_per_step")
        entries[label]["step_same_load_as_graph"] = measured["step"]
    else:
        entries[label] = measured


def main(argv=None) -> None:
    use_no_cublaslt_workspace()  # as aotpack's CLI runs: before the first GPU matmul (machine/cublaslt.py)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", required=True, help="LABEL=PACKAGE_DIR (repeatable)")
    parser.add_argument("--model", default="random:flux-dev")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--lora-dir", type=Path, default=Path("/tmp/aotpack-bench-loras"))
    parser.add_argument("--graph-variant", action="append", default=[],
                        help="LABEL whose step is also timed from CUDA graphs (repeatable)")
    args = parser.parse_args(argv)
    variants = {}
    for spec in args.variant:
        label, sep, package = spec.partition("=")
        if not sep or not label or not package or label in variants:
            parser.error(f"--variant {spec!r}: write LABEL=PACKAGE_DIR, each label once, e.g. r64=/tmp/r64")
        variants[label] = package
    output_folder(args.out)
    run(variants, args.model, args.out, height=args.height, width=args.width, text_tokens=args.text_tokens,
        lora_dir=args.lora_dir, graph_variants=tuple(args.graph_variant))


if __name__ == "__main__":
    main()
