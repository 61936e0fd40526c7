"""Does a loaded package's GPU memory come back once the pipeline is dropped? (bench variants ran out of an H100's
80 GB at its kernel breakdowns, 2026-12-06: 77.97 GiB still allocated after four timed passes, each of which had
dropped its pipeline, gc-collected and emptied the cache.)

For each way a pass uses a package (plain steps; then steps replayed from the runtime's CUDA graphs; then an image's
denoising loop on graphs), this loads `PACKAGE` with `MODEL`'s random weights, runs it, drops it and reports
`torch.cuda.memory_allocated` before, loaded and after, whether the pipeline and transformer objects were freed,
and, when not, what still refers to the transformer (two levels of `gc.get_referrers`).

A mode `NAME+close` closes the pipeline (`AotpackPipeline.close`) before dropping it.

On the GPU machine: `python3 scripts/gpu/probe_package_release.py PACKAGE MODEL $OUT/release.json [MODE...]`, e.g.
`plain plain+close`
"""

import gc
import json
import sys
import weakref

import torch

sys.path.insert(0, ".")
from aotpack.bench.denoise import denoising_loop  # noqa: E402
from aotpack.bench.loras import write_bench_loras  # noqa: E402
from aotpack.models.examples import transformer_inputs  # noqa: E402
from aotpack.runtime.pipeline import load_package  # noqa: E402

LORA = "r64-all"  # the bench LoRA on every block linear (the tiny CPU package takes "r16-attn")


def describe(obj) -> str:
    if isinstance(obj, dict):
        return f"dict keys {list(obj)[:8]}"
    if isinstance(obj, (list, tuple)):
        return f"{type(obj).__name__} of {len(obj)}"
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def referrers(obj, depth: int = 2, skip=()) -> list:
    found = []
    for ref in gc.get_referrers(obj):
        if ref is skip or type(ref).__name__ == "frame":
            continue
        entry = {"type": describe(ref)}
        if depth > 1:
            entry["held_by"] = referrers(ref, depth - 1, skip)[:6]
        found.append(entry)
    return found[:10]


def one_pass(package: str, model: str, mode: str, lora_dir) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    served = load_package(package, model, cuda_graphs=False, merge_policy="never")
    lora = write_bench_loras(dict(served.transformer.config), lora_dir, names=[LORA])[LORA]
    served.set_loras([(lora, 1.0)])
    inputs = transformer_inputs(served.transformer.config, batch=1, image_tokens=4096, text_tokens=512,
                                dtype=served.transformer.dtype, device=served.device,
                                generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for _ in range(2):
            served.transformer(**inputs, return_dict=False)
        base = mode.split("+")[0]  # "plain+close": the same pass, closed before the drop
        if base in ("graphs", "loop"):
            served.transformer.use_cuda_graphs(True)
            for _ in range(3):
                served.transformer(**inputs, return_dict=False)
        if base == "loop":
            denoising_loop(served.transformer, served.pipeline, inputs, 4)()
    torch.cuda.synchronize()
    loaded = torch.cuda.memory_allocated()
    alive = {"pipeline": weakref.ref(served), "transformer": weakref.ref(served.transformer),
             "weights_owner": weakref.ref(served.transformer._weights_owner),
             "diffusers_pipeline": weakref.ref(served.pipeline)}
    if mode.endswith("+close"):
        served.close()
    del served, inputs
    gc.collect()
    torch.cuda.empty_cache()
    result = {"mode": mode, "gib_before": before / 2**30, "gib_loaded": loaded / 2**30,
              "gib_after": torch.cuda.memory_allocated() / 2**30,
              "freed": {name: ref() is None for name, ref in alive.items()}}
    for name, ref in alive.items():
        if ref() is not None:
            result[f"{name}_referrers"] = referrers(ref(), skip=alive)
    # the GPU tensors still alive, largest first, and what holds the largest
    left = sorted((obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor) and obj.is_cuda),
                  key=lambda t: -t.untyped_storage().nbytes() if not hasattr(t, "qdata") else -t.qdata.nbytes)
    result["cuda_tensors_left"] = len(left)
    result["largest_left"] = [{"type": describe(t), "shape": list(t.shape), "dtype": str(t.dtype),
                               "held_by": referrers(t, depth=3, skip=left)} for t in left[:3]]
    del left
    print(json.dumps(result)[:3000], flush=True)
    return result


def main(package: str, model: str, out_path: str) -> None:
    import tempfile

    results = []
    with tempfile.TemporaryDirectory() as lora_dir:
        for mode in (sys.argv[4:] or ["plain", "graphs", "loop"]):
            try:
                results.append(one_pass(package, model, mode, lora_dir))
            except Exception as err:  # a pass that fails is a result
                results.append({"mode": mode, "failed": f"{type(err).__name__}: {err}"[:500]})
            with open(out_path, "w") as f:
                json.dump({"gpu": torch.cuda.get_device_name(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:4])
