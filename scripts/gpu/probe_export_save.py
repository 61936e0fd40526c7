"""What saving each exported program for a compile worker costs (issue 11's build time): runs `aotpack build`'s stages
up to the compile on the H200 recipe and times `torch.export.save` of every program, then stops (no compile, no
package). The 2026-12-05a build took 240 s against 190 s once the `batched_modulation` program came, ~40 s of it
outside every timed stage; since then the program with the most weights compiles in the build's own process and is
never saved (aotpack/builder/compile.py), and the build times the other saves itself: 6.7 s for 8 programs, ~2 s left
outside the stages, 227 s in all (H200, 2026-12-05, benchmarks/results/2026-12-05b-h200-split-build/). Kept to time
the heaviest program's save, which the build no longer does.

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
from aotpack.builder.compile import weight_bytes


class Saved(Exception):
    pass


def time_saves(jobs, **_):
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, exported, _path in jobs:
            started = time.perf_counter()
            torch.export.save(exported, str(Path(folder) / f"{name}.pt2"))
            rows.append({"program": name, "weight_gb": round(weight_bytes(exported) / 1e9, 3),
                         "save_s": round(time.perf_counter() - started, 2)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    raise Saved(rows)


def main(target: str, model: str) -> None:
    build.compile_programs = time_saves  # the build's own stages up to here, unchanged
    started = time.perf_counter()
    try:
        build.build_package(model, target, out=tempfile.mkdtemp() + "/pkg", progress=False)
    except Saved as saved:
        rows = saved.args[0]
        total = sum(r["save_s"] for r in rows)
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
        print(json.dumps({"target": target, "model": model, "gpu": gpu, "torch": torch.__version__,
                          "seconds_to_compile_stage": round(time.perf_counter() - started - total, 1),
                          "saves": rows, "total_save_s": round(total, 2)}, indent=1))


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0] if args else "h200", args[1] if len(args) > 1 else "random:flux-dev")
