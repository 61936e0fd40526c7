"""Does each CUDA-graph capture leave GPU memory behind outside the graphs' pool? (the 0.03-0.06 GiB a pass left
after `close()` on 2026-12-06h, and a server that keeps capturing new shapes)

cuBLAS keeps a workspace per (handle, stream) for the whole process. `runtime/cuda_graphs.py` warmed each capture up
on a fresh `torch.cuda.Stream`, one of torch's pool streams in turn, so each capture could leave one more (2026-12-06h:
a plain pass left 33 MiB after `close()`, a graph pass 66 more, the next graph pass 33 more). Since 2026-12-07 every
capture on a device warms up on one stream (`cuda_graphs.warmup_stream`).
1. torch alone: one bf16 matmul on each of 8 fresh streams, then 8 times on one stream; memory after each.
2. a package: one step at each of 6 image-token counts, largest first (the graphs share one pool, so after the first
   capture the pool need not grow), twice with the runtime's one warm-up stream (a second load must add nothing), then
   with a fresh stream per capture as before (patched in); memory after each capture, and after `close()`.

On the GPU machine: `python3 scripts/gpu/probe_capture_streams.py PACKAGE MODEL $OUT/capture_streams.json`
"""

import gc
import json
import sys

import torch

sys.path.insert(0, ".")
from aotpack.models.examples import transformer_inputs  # noqa: E402
from aotpack.runtime import cuda_graphs  # noqa: E402
from aotpack.runtime.pipeline import load_package  # noqa: E402

MIB = 2**20
TOKEN_COUNTS = (2048, 1792, 1536, 1024, 512, 256)


def settle() -> int:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def torch_alone() -> dict:
    a = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)
    start = settle()
    fresh, reused = [], []
    for _ in range(8):
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            a @ a
        fresh.append(round((settle() - start) / MIB, 1))
    torch._C._cuda_clearCublasWorkspaces()
    start = settle()
    stream = torch.cuda.Stream()
    for _ in range(8):
        with torch.cuda.stream(stream):
            a @ a
        reused.append(round((settle() - start) / MIB, 1))
    return {"mib_after_each_fresh_stream": fresh, "mib_after_each_use_of_one_stream": reused}


def package_pass(package: str, model: str, fresh_streams: bool, clear: bool) -> dict:
    if clear:  # else the workspaces of the pass before stay, as in a server that loads again
        torch._C._cuda_clearCublasWorkspaces()
    before = settle()
    original = cuda_graphs.warmup_stream
    if fresh_streams:  # the code before 2026-12-07: a new pool stream per capture
        cuda_graphs.warmup_stream = lambda device: torch.cuda.Stream(device)
    try:
        served = load_package(package, model, merge_policy="never")
        loaded = settle()
        after_capture = []
        with torch.no_grad():
            for tokens in TOKEN_COUNTS:
                inputs = transformer_inputs(served.transformer.config, batch=1, image_tokens=tokens, text_tokens=512,
                                            dtype=served.transformer.dtype, device=served.device,
                                            generator=torch.Generator().manual_seed(tokens))
                for _ in range(2):
                    served.transformer(**inputs, return_dict=False)
                del inputs
                after_capture.append(round((settle() - loaded) / MIB, 1))
        captures = served.transformer._step_graphs.captures
        served.close()
        del served
        after_close = settle()
    finally:
        cuda_graphs.warmup_stream = original
    return {"fresh_stream_per_capture": fresh_streams, "workspaces_cleared_first": clear, "captures": captures,
            "mib_allocated_before": round(before / MIB, 1),
            "gib_loaded": round((loaded - before) / 2**30, 2),
            "mib_over_loaded_after_each_capture": after_capture,
            "mib_left_after_close": round((after_close - before) / MIB, 1)}


def main(package: str, model: str, out_path: str) -> None:
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "torch_alone": torch_alone()}
    print(json.dumps(results), flush=True)
    results["package"] = []
    for fresh, clear in ((False, True), (False, False), (True, True)):
        try:
            results["package"].append(package_pass(package, model, fresh, clear))
        except Exception as err:  # a pass that fails is a result
            results["package"].append({"fresh_stream_per_capture": fresh,
                                       "failed": f"{type(err).__name__}: {err}"[:500]})
        print(json.dumps(results["package"][-1]), flush=True)
        with open(out_path, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:4])
