"""What the load-time warm-up of the merge program costs, and what it buys the first merge.

`CompiledFluxTransformer` runs `CompiledMerge.warm` at load on CUDA (once per weight shape, at the stack size a
merge of every slot would use). This probe loads the package in two fresh processes, warm-up on (timed) and off
(patched to a no-op), and in each times the load, three steps at 1024² in slots, then three merges + unmerges of
r64-all.

On the GPU machine: `python3 scripts/gpu/probe_load_warm.py PACKAGE $OUT/load_warm.json [on,off | off,on | ...]`
(the processes' order: warm-up on or off in each, one after the other)
"""

import json
import subprocess
import sys
import time

import torch

sys.path.insert(0, ".")


def _timed_ms(fn) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return round((time.perf_counter() - started) * 1000, 1)


def one_process(package: str, warm: bool) -> dict:
    import aotpack
    from aotpack.bench.loras import write_bench_loras
    from aotpack.runtime import merge

    report = {"warm_at_load": warm, "warm_ms": None}
    original = merge.CompiledMerge.warm

    def timed_warm(self, *args, **kwargs):
        report["warm_ms"] = _timed_ms(lambda: original(self, *args, **kwargs))

    merge.CompiledMerge.warm = timed_warm if warm else (lambda self, *args, **kwargs: None)
    started = time.perf_counter()
    served = aotpack.load(package, model="random:flux-dev", cuda_graphs=False)
    torch.cuda.synchronize()
    report["load_s"] = round(time.perf_counter() - started, 2)
    report["memory_reserved_gb"] = round(torch.cuda.memory_reserved() / 1e9, 2)
    lora = [(write_bench_loras(served.transformer.config, "/tmp/bench-loras", names=["r64-all"])["r64-all"], 1.0)]
    report["slots_ms"] = _timed_ms(lambda: served.set_loras(lora))
    from aotpack.models.examples import transformer_inputs

    inputs = transformer_inputs(served.transformer.config, batch=1, image_tokens=4096, text_tokens=512,
                                dtype=torch.bfloat16, device="cuda", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # as a server would: steps in slots before the first merge
        report["step_ms"] = [_timed_ms(lambda: served.transformer(**inputs, return_dict=False)) for _ in range(3)]
    report["clear_ms"] = _timed_ms(lambda: served.set_loras([]))
    report["merge_unmerge_ms"] = [[_timed_ms(lambda: served.set_loras(lora, merge=True)),
                                   _timed_ms(lambda: served.set_loras([]))] for _ in range(3)]
    return report


def main(package: str, out_path: str, order: str = "on,off") -> None:
    runs = []
    for warm in [which == "on" for which in order.split(",")]:
        done = subprocess.run([sys.executable, __file__, "--one", package, str(int(warm))], capture_output=True,
                              text=True)
        print(done.stderr[-2000:], file=sys.stderr)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": runs}
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report))


if __name__ == "__main__":
    if sys.argv[1] == "--one":
        print(json.dumps(one_process(sys.argv[2], bool(int(sys.argv[3])))))
    else:
        main(*sys.argv[1:4])
