"""Regional vs whole layout: build time, package size, load time and step time, same model and machine.

    python -m aotpack.bench.layouts --model random:tiny-deep --target cpu --out OUT [--height 512 --width 512]

Writes OUT/layouts.json and OUT/layouts.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from ..builder.build import build_package
from ..models.examples import transformer_inputs
from ..models.prepare import torch_dtype
from ..runtime.pipeline import load_package
from ..store.manifest import read_manifest
from .checks import output_folder
from .timing import time_ms


def measure(model: str, target: str, layout: str, out: Path, image_tokens: int, text_tokens: int) -> dict:
    started = time.perf_counter()
    package = build_package(model, target, out=out / f"pkg-{layout}", layout=layout, progress=False)
    build_seconds = time.perf_counter() - started
    manifest = read_manifest(package)
    started = time.perf_counter()
    served = load_package(package, model)
    load_seconds = time.perf_counter() - started
    inputs = transformer_inputs(served.transformer.config, batch=1, image_tokens=image_tokens,
                                text_tokens=text_tokens, dtype=torch_dtype(manifest.dtype), device=served.device,
                                generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), served:  # closed after: the next layout's package loads into this process
        step = time_ms(lambda: served.transformer(**inputs), served.device, warmup=3, repeats=10)
    return {"layout": layout, "build_seconds": round(build_seconds, 1),
            "compile_seconds": manifest.build["compile_seconds"], "package_mb": round(manifest.total_bytes(package) / 1e6, 2),
            "programs": len(manifest.programs), "load_seconds": round(load_seconds, 2),
            "step_ms_median": round(step["median_ms"], 2), "max_rel_error": manifest.validation["max_rel_error"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:tiny-deep")
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--image-tokens", type=int, default=1024)
    parser.add_argument("--text-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    output_folder(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [measure(args.model, args.target, layout, args.out, args.image_tokens, args.text_tokens)
            for layout in ("regional", "whole")]
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} ({platform.processor() or 'cpu'}, "
            f"{__import__('os').cpu_count()} cores)", "torch": torch.__version__, "model": args.model,
            "target": args.target, "image_tokens": args.image_tokens, "text_tokens": args.text_tokens,
            "command": "python -m aotpack.bench.layouts " + " ".join(argv or __import__("sys").argv[1:])}
    (args.out / "layouts.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    header = "| layout | programs | build s | package MB | load s | step ms |\n|---|---|---|---|---|---|\n"
    table = header + "".join(f"| {r['layout']} | {r['programs']} | {r['build_seconds']} | {r['package_mb']} | "
                             f"{r['load_seconds']} | {r['step_ms_median']} |\n" for r in rows)
    (args.out / "layouts.md").write_text(table)
    print(json.dumps(meta, indent=2))
    print(table)


if __name__ == "__main__":
    main()
