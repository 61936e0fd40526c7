"""What saving each exported program for a compile worker costs (issue 11's build time): runs `aotpack build`'s stages
up to the compile on the H200 recipe and times `torch.export.save` of every program, then stops (no compile, no
package). The 2026-12-05a build took 240 s against 190 s once the `batched_modulation` program came, ~40 s of it
outside every timed stage; since then the program with the most weights compiles in the build's own process and is
never saved, and the build timed the other saves itself: 6.7 s for 8 programs, ~2 s left outside the stages, 227 s
in all (H200, 2026-12-05, benchmarks/results/2026-12-05b-h200-split-build/). Now every program is saved without its
weights' bytes (aotpack/builder/weightless.py); this times both saves of each program, with and without them.

On the GPU machine: `python3 scripts/gpu/probe_export_save.py [TARGET [MODEL]] > $OUT/export_save.json` (default h200,
random:flux-dev: ~24 GB of host memory on the way; `cpu tiny` tries it on a small machine).
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from aotpack.builder import build
from aotpack.builder.weightless import save_without_weights, tensor_bytes


class Saved(Exception):
    pass


def time_saves(jobs, **_):
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, exported, _path in jobs:
            started = time.perf_counter()
            torch.export.save(exported, str(Path(folder) / f"{name}.pt2"))
            whole = time.perf_counter() - started
            started = time.perf_counter()
            save_without_weights(exported, str(Path(folder) / f"{name}.weightless.pt2"))
            weights = [*exported.state_dict.values(), *exported.constants.values()]
            rows.append({"program": name, "weight_gb": round(sum(map(tensor_bytes, weights)) / 1e9, 3),
                         "save_s": round(whole, 2), "save_weightless_s": round(time.perf_counter() - started, 2)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    raise Saved(rows)


def main(target: str, model: str) -> None:
    build.compile_programs = time_saves  # the build's own stages up to here, unchanged
    started = time.perf_counter()
    try:
        build.build_package(model, target, out=tempfile.mkdtemp() + "/pkg", progress=False)
    except Saved as saved:
        rows = saved.args[0]
        total = sum(r["save_s"] + r["save_weightless_s"] for r in rows)
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
        print(json.dumps({"target": target, "model": model, "gpu": gpu, "torch": torch.__version__,
                          "seconds_to_compile_stage": round(time.perf_counter() - started - total, 1),
                          "saves": rows, "total_save_s": round(sum(r["save_s"] for r in rows), 2),
                          "total_save_weightless_s": round(sum(r["save_weightless_s"] for r in rows), 2)}, indent=1))


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0] if args else "h200", args[1] if len(args) > 1 else "random:flux-dev")
