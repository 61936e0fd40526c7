"""Where each program's compile goes on this machine, for a random model with FLUX.1-dev's block count (19 + 38) at
the tiny model's widths: builds it one program at a time with RECIPE (a target name or .toml path) and prints each
program's wall and CPU seconds and torch's compile phases (also in OUT/manifest.json, `build.compile_phases`).

    .venv/bin/python scripts/probe_compile_phases.py RECIPE OUT

E.g. the CPU recipe with `batched_modulation = true` (the modulation program, 114 LoRA slots) and the same with
`"aot_inductor.compile_wrapper_opt_level" = "O0"` under `[inductor]`; results in docs/gpu.md (2026-12-05).
"""

import json
import sys

from aotpack.builder.build import build_package
from aotpack.models import random_weights, tiny

PRESET = "tiny-57"
random_weights.PRESETS[PRESET] = {**tiny.TRANSFORMER_CONFIG, "num_layers": 19, "num_single_layers": 38}


def main(recipe: str, out: str) -> None:
    package = build_package(f"random:{PRESET}", recipe, out=out, compile_workers=1)
    build = json.loads((package / "manifest.json").read_text())["build"]
    for name, seconds in build["compile_seconds"].items():
        print(json.dumps({"program": name, "seconds": seconds, "cpu_seconds": build["compile_cpu_seconds"][name],
                          "phases": build["compile_phases"][name]}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
