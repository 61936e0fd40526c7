"""Context parallel on 1 vs N GPUs of one host, same split package, same random weights and LoRA.

    python -m aotpack.bench.context_parallel --package DIR --out OUT [--model random:flux-dev]
        [--gpus 2] [--sizes 1024 2048] [--steps 28] [--overlap-chunks 2] [--cuda-graphs]

For each rank count (1, then --gpus) one `launch` of rank processes, on the plain chain (no CUDA
graphs): load (cold start), switch to the rank-64 LoRA from file then cached, transformer time per
step (CUDA events, median), the host's time to enqueue a step, the all-to-all/all-gather time inside
one step, device time by kind at the first size (profiler), the overlapped all-to-all, one full image
(28 steps + VAE decode on rank 0). Rank 0's step output is kept to compare N ranks with 1 and, for
random weights, 1 and N ranks with diffusers eager + PEFT. With --cuda-graphs (GPUs), launches of
their own then time the steps replayed from CUDA graphs, the runtime's default there. Writes
OUT/context_parallel.json progressively and OUT/context_parallel.md. On a machine without GPUs it
runs the same code with gloo ranks on the CPU (a smoke test: `--model tiny --package <tiny
--parallel ulysses build>`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ..errors import RequestError
from ..models.checkpoint import load_transformer_config, parse_model_ref
from ..models.examples import relative_error
from .checks import package_and_output
from .compare import shared_workload
from .loras import write_bench_loras
from .timing import Stopwatch, kernel_breakdown, synchronize, time_ms


def _submit_ms(step, device, repeats: int = 5) -> float:
    """Median host milliseconds to enqueue one step (the device is idle at the start): close to the
    device time means the step is host-bound there."""
    samples = []
    for _ in range(repeats):
        synchronize(device)
        began = time.perf_counter()
        step()
        samples.append((time.perf_counter() - began) * 1000)
    synchronize(device)
    return statistics.median(samples)


def _stepper(transformer, inputs):
    """One transformer step on `inputs`, as `time_ms` and the profilers call it."""
    def step():
        with torch.no_grad():
            return transformer(**inputs, return_dict=False)[0]
    return step


def _comm_ms(comm, step) -> float:
    """Milliseconds one `step()` spends in (or, overlapped, waiting on) collectives."""
    comm.timer.enabled = True
    comm.timer.take_seconds()
    try:
        step()
        return comm.timer.take_seconds() * 1000
    finally:
        comm.timer.enabled = False


def _image_seconds(served, ctx, request: dict, size: int) -> float:
    """One full image (every rank steps; rank 0 decodes), wall seconds."""
    with Stopwatch(ctx.device) as watch:
        latents = served.pipeline(**request, generator=torch.Generator("cpu").manual_seed(42),
                                  output_type="latent").images
        if ctx.is_main:
            served.decode_latents(latents, size, size)
    return watch.seconds


def _bench_rank(ctx, package, model, sizes, steps, text_tokens, lora, repeats, started, overlap_chunks=(2,)):
    """One rank's measurements; rank 0's dict is returned by `launch`."""
    from ..runtime.parallel import load_rank

    device = ctx.device
    load_started = time.perf_counter()
    # the plain chain (comm timer and profiles see it), the LoRA kept in slots (what this bench compares)
    served = load_rank(ctx, package, model, cuda_graphs=False, merge_policy="never")
    result = {"ranks": ctx.world_size, "load_seconds": time.perf_counter() - load_started,
              "spawn_to_loaded_seconds": time.time() - started}
    dtype = served.transformer.dtype
    config = dict(served.transformer.config)
    with Stopwatch(device) as watch:
        served.set_loras([(lora, 1.0)])
    result["switch_from_file_ms"] = watch.seconds * 1000
    switches = []
    for _ in range(3):  # cached: alternate off and on, time the "on"
        served.set_loras([])
        with Stopwatch(device) as watch:
            served.set_loras([(lora, 1.0)])
        switches.append(watch.seconds * 1000)
    result["switch_cached_ms"] = sorted(switches)[1]
    comm = served.transformer.context_parallel
    result["sizes"] = {}
    for size in sizes:
        inputs, request = shared_workload(config, height=size, width=size, steps=steps, text_tokens=text_tokens,
                                          dtype=dtype, device=device)
        request["max_sequence_length"] = text_tokens
        entry = {}
        step = _stepper(served.transformer, inputs)
        output = step()
        if ctx.is_main:
            entry["output"] = output.float().cpu()
        entry["step"] = time_ms(step, device, warmup=2, repeats=repeats)
        entry["host_submit_ms"] = _submit_ms(step, device)
        entry["comm_ms_per_step"] = _comm_ms(comm, step)
        if size == sizes[0]:
            profiled = (entry, step)
        if ctx.world_size > 1:  # the overlapped all-to-all (Ulysses.overlap_chunks), same process
            heads = config["num_attention_heads"] // ctx.world_size
            entry["overlap"] = {str(chunks): {**_overlapped(comm, step, output, device, repeats, chunks),
                                              "applied": heads % chunks == 0}
                                for chunks in overlap_chunks}
        first = not result["sizes"]
        entry["image_seconds"] = _image_seconds(served, ctx, request, size)
        if first:
            result["spawn_to_first_image_seconds"] = time.time() - started
        result["sizes"][str(size)] = entry
    # Where the device time goes, once everything is timed: a profiler session slows what follows it
    # (timing.kernel_rows). Every rank profiles itself: the collectives need all.
    first_entry, first_step = profiled
    first_entry["kernels"] = kernel_breakdown(first_step, device)
    return result


def _overlapped(comm, step, plain_output, device, repeats, chunks: int) -> dict:
    """Step with each rank's heads in `chunks` overlapped transfers: time, exposed communication (the
    waits left on the compute stream), and whether the output equals the one-transfer step's."""
    default, comm.overlap_chunks = comm.overlap_chunks, chunks
    try:
        output = step()
        return {"chunks": chunks, "step": time_ms(step, device, warmup=2, repeats=repeats),
                "output_equal": bool(torch.equal(output, plain_output)),
                "exposed_comm_ms_per_step": _comm_ms(comm, step)}
    finally:
        comm.overlap_chunks = default


def _bench_graphs(ctx, package, model, sizes, steps, text_tokens, lora, repeats, chunk_options):
    """Steps replayed from CUDA graphs (the default on GPUs; collectives captured with the programs):
    time and whether the output equals the plain step's, for the default communication, each
    `overlap_chunks` value and keys in rank order; one full image with the default."""
    from ..runtime.parallel import load_rank

    served = load_rank(ctx, package, model, merge_policy="never")
    served.set_loras([(lora, 1.0)])
    transformer, comm = served.transformer, served.transformer.context_parallel
    config = dict(transformer.config)
    result = {"ranks": ctx.world_size, "sizes": {}}
    for size in sizes:
        inputs, request = shared_workload(config, height=size, width=size, steps=steps, text_tokens=text_tokens,
                                          dtype=transformer.dtype, device=ctx.device)
        request["max_sequence_length"] = text_tokens
        step = _stepper(transformer, inputs)
        entry = result["sizes"][str(size)] = {}
        # (label, overlap chunks, token order); the default first: the others are compared with it
        variants = [("1", 1, "joint")] + ([(str(c), c, "joint") for c in chunk_options if c > 1]
                                          + [("1-rank-order", 1, "rank")] if ctx.world_size > 1 else [])
        default_output = None
        for label, chunks, token_order in variants:
            comm.overlap_chunks, comm.token_order = chunks, token_order
            transformer.use_cuda_graphs(False)
            plain = step()
            transformer.use_cuda_graphs(True)
            graphed = step()
            failed = transformer._step_graphs.failed
            default_output = graphed if default_output is None else default_output
            entry[label] = {"failed": failed, "output_equal": bool(torch.equal(plain, graphed)),
                            "rel_error_vs_default": relative_error(graphed.float(), default_output.float()),
                            "step": time_ms(step, ctx.device, warmup=2, repeats=repeats),
                            "host_submit_ms": _submit_ms(step, ctx.device)}
            if label == "1" and not failed:
                entry[label]["image_seconds"] = _image_seconds(served, ctx, request, size)
            transformer.use_cuda_graphs(False)
        comm.overlap_chunks, comm.token_order = 1, "joint"
    return result


def _eager_outputs(model: str, config: dict, sizes, text_tokens: int, lora: str, device) -> dict:
    """diffusers' eager transformer (bf16 on a GPU, fp32 on the CPU) + the PEFT LoRA at scale 1: its
    output per size on the bench's inputs (random weights only: the seeded model the ranks load)."""
    from ..models.random_weights import make_transformer

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    transformer = make_transformer(parse_model_ref(model).location, dtype, device)
    transformer.load_lora_adapter(lora, adapter_name="bench", prefix="transformer")
    outputs = {}
    for size in sizes:
        inputs, _ = shared_workload(config, height=size, width=size, steps=1, text_tokens=text_tokens, dtype=dtype,
                                    device=device)
        with torch.no_grad():
            outputs[str(size)] = transformer(**inputs, return_dict=False)[0].float().cpu()
    del transformer
    return outputs


def rank_counts(gpus) -> list[int]:
    """The rank counts `--gpus` asks for besides 1 (one int or several), each 2 or more."""
    counts = [gpus] if isinstance(gpus, int) and not isinstance(gpus, bool) else list(gpus)
    for count in counts:
        if isinstance(count, bool) or not isinstance(count, int) or count < 2:
            raise RequestError(f"--gpus {count!r}: the bench compares 1 rank (always run) with N ranks, N of 2 or more",
                               "pass --gpus 2 or more, e.g. --gpus 2 (several: --gpus 2 4)")
    return counts


def check_gpus(package: str, gpus, device: str) -> str:
    """Refuse every `--gpus` count the machine or the package's parallel layout cannot run, before anything loads
    or any rank starts (the checks of `aotpack run --gpus`); returns the package's local folder."""
    from ..runtime.parallel import check_parallel_run
    from ..store.manifest import read_manifest
    from ..store.publish import locate_package

    counts = rank_counts(gpus)
    package_dir = locate_package(package)
    manifest = read_manifest(package_dir)
    for count in counts:
        check_parallel_run(manifest, count, device, fewest=2)
    return str(package_dir)


def run(package: str, model: str, out: Path, *, gpus, sizes, steps: int, text_tokens: int, lora_dir: Path,
        repeats: int, lora_name: str = "r64-all", overlap_chunks=(2,), graphs: bool = False) -> dict:
    from ..runtime.parallel import launch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    package = check_gpus(package, gpus, device)
    out.mkdir(parents=True, exist_ok=True)
    config = load_transformer_config(parse_model_ref(model))
    lora = str(write_bench_loras(config, lora_dir, names=[lora_name])[lora_name])
    data = {"date": time.strftime("%Y-%m-%d"), "weights": "random" if model.startswith("random:") else model,
            "model": model, "device": device,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "torch": torch.__version__,
            "steps": steps, "text_tokens": text_tokens, "lora": lora_name, "runs": {}}
    outputs = {}
    eager_reference = model.startswith("random:")  # a user's checkpoint would need its own eager load
    counts = sorted({1, *rank_counts(gpus)})  # 1, then every N asked for
    for ranks in counts:
        started = time.time()
        result = launch(_bench_rank, ranks, package, model, list(sizes), steps, text_tokens, lora, repeats, started,
                        tuple(overlap_chunks), device=device)
        for size, entry in result["sizes"].items():
            outputs[(ranks, size)] = entry.pop("output")
        data["runs"][str(ranks)] = result
        (out / "context_parallel.json").write_text(json.dumps(data, indent=2))
        print(f"[bench] {ranks} rank(s): {json.dumps(result)[:600]}", flush=True)
    # keyed by rank count, then size (rank 0's output of N ranks against one rank's)
    data["rel_error_vs_1"] = {str(n): {size: relative_error(outputs[(n, size)], outputs[(1, size)])
                                       for size in map(str, sizes)} for n in counts if n > 1}
    if eager_reference:  # how far 1 and N ranks each are from diffusers eager bf16 + PEFT (same LoRA)
        eager = _eager_outputs(model, config, sizes, text_tokens, lora, device)
        data["rel_error_vs_eager"] = {str(n): {size: relative_error(outputs[(n, size)], eager[size])
                                               for size in map(str, sizes)} for n in counts}
    (out / "context_parallel.json").write_text(json.dumps(data, indent=2))
    (out / "context_parallel.md").write_text(markdown(data))
    if graphs and device == "cuda":  # last, in launches of their own: the rows above stay written whatever happens
        data["cuda_graphs"] = {}
        for ranks in counts:
            data["cuda_graphs"][str(ranks)] = launch(_bench_graphs, ranks, package, model, list(sizes), steps,
                                                     text_tokens, lora, repeats, [1, *overlap_chunks], device=device)
            (out / "context_parallel.json").write_text(json.dumps(data, indent=2))
        (out / "context_parallel.md").write_text(markdown(data))
    print(markdown(data))
    return data


def markdown(data: dict) -> str:
    one = data["runs"]["1"]
    title = (f"Context parallel, {data['model']} ({data['weights']} weights), {data['gpu'] or 'CPU'}, "
             f"{data['steps']} steps, {data['lora']}, torch {data['torch']}")
    lines = [title, "",
             "| size | ranks | step ms (median) | x 1 rank | comm ms/step | image s | rel. error vs 1 rank |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    submit = []
    for size in one["sizes"]:
        base = one["sizes"][size]["step"]["median_ms"]
        for ranks, run in sorted(data["runs"].items(), key=lambda item: int(item[0])):
            entry = run["sizes"][size]
            error = data.get("rel_error_vs_1", {}).get(ranks, {}).get(size)
            if "host_submit_ms" in entry:
                submit.append(f"{size}² x{ranks}: {entry['host_submit_ms']:.1f} ms")
            lines.append(f"| {size}² | {ranks} | {entry['step']['median_ms']:.1f} | "
                         f"{entry['step']['median_ms'] / base:.2f} | {entry['comm_ms_per_step']:.1f} | "
                         f"{entry['image_seconds']:.2f} | {'' if error is None else f'{error:.1e}'} |")
            for overlap in entry.get("overlap", {}).values():
                label = "overlapped" if overlap.get("applied", True) else "overlap asked, heads do not divide"
                lines.append(f"| {size}² | {ranks}, {label} x{overlap['chunks']} | "
                             f"{overlap['step']['median_ms']:.1f} | {overlap['step']['median_ms'] / base:.2f} | "
                             f"{overlap['exposed_comm_ms_per_step']:.1f} exposed | | "
                             f"{'same output' if overlap['output_equal'] else 'output differs'} |")
            for variant, graphed in data.get("cuda_graphs", {}).get(ranks, {}).get("sizes", {}).get(size, {}).items():
                label = {"1": "CUDA graph", "1-rank-order": "CUDA graph, keys in rank order"}.get(
                    variant, f"CUDA graph, overlap x{variant}")
                if graphed["failed"]:
                    lines.append(f"| {size}² | {ranks}, {label} | capture failed: {graphed['failed'][:80]} | | | | |")
                    continue
                image = f"{graphed['image_seconds']:.2f}" if "image_seconds" in graphed else ""
                versus = (f"; {graphed['rel_error_vs_default']:.1e} vs the default order"
                          if graphed.get("rel_error_vs_default") else "")
                lines.append(f"| {size}² | {ranks}, {label} | {graphed['step']['median_ms']:.1f} | "
                             f"{graphed['step']['median_ms'] / base:.2f} | | {image} | "
                             f"{'same output as plain' if graphed['output_equal'] else 'output differs'}{versus} |")
    if submit:
        lines += ["", "Host time to enqueue one plain step (device idle at the start): " + ", ".join(submit)]
    for ranks, by_size in data.get("rel_error_vs_eager", {}).items():
        lines += [f"Rel. error vs diffusers eager + PEFT, {ranks} rank(s): "
                  + ", ".join(f"{size}² {error:.1e}" for size, error in by_size.items())]
    for ranks, run in sorted(data["runs"].items(), key=lambda item: int(item[0])):
        kernels = next((e["kernels"] for e in run["sizes"].values() if "kernels" in e), None)
        if kernels:
            lines += [f"Device ms per step by kind, {ranks} rank(s), first size: "
                      + ", ".join(f"{k} {v:.1f}" for k, v in kernels["ms_per_step"].items() if v >= 0.05)
                      + f" (total {kernels['total_ms']:.1f})"]
    lines += ["", "| ranks | load s | spawn to first image s | LoRA switch from file ms | cached ms |",
              "| --- | --- | --- | --- | --- |"]
    for ranks, run in sorted(data["runs"].items(), key=lambda item: int(item[0])):
        lines.append(f"| {ranks} | {run['load_seconds']:.1f} | {run['spawn_to_first_image_seconds']:.1f} | "
                     f"{run['switch_from_file_ms']:.0f} | {run['switch_cached_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", required=True)
    parser.add_argument("--model", default="random:flux-dev")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gpus", type=int, nargs="+", default=[2], help="rank counts to measure besides 1, e.g. 2 4 8")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--lora-dir", type=Path, default=Path("/tmp/aotpack-bench-loras"))
    parser.add_argument("--lora", default="r64-all", help="benchmark LoRA (bench/loras.py; r64-all: rank 64, every "
                                                          "block linear)")
    parser.add_argument("--overlap-chunks", type=int, nargs="+", default=[2],
                        help="Ulysses.overlap_chunks values timed beside 1 (heads per rank must divide)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also time steps replayed from CUDA graphs (the GPU default; collectives captured), "
                             "in launches of their own")
    args = parser.parse_args(argv)
    try:  # a usage error (exit 2); the package's and the machine's limits are checked in `run`
        rank_counts(args.gpus)
    except RequestError as err:
        parser.error(f"{err.problem}; fix: {err.fix}")
    package_and_output(args)
    run(args.package, args.model, args.out, gpus=args.gpus, sizes=args.sizes, steps=args.steps,
        text_tokens=args.text_tokens, lora_dir=args.lora_dir, repeats=args.repeats, lora_name=args.lora,
        overlap_chunks=args.overlap_chunks, graphs=args.cuda_graphs)


if __name__ == "__main__":
    main()
