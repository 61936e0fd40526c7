"""Time parsing a FLUX.1-dev-size LoRA file on this machine (the CPU part of a switch from a file).

    python scripts/bench_parse.py [--model random:flux-dev] [--lora r64-all] [--repeats 5]

Writes the bench LoRA (random factors, bf16) once under /tmp, reads it once to warm the page cache,
then reports the median and min of `parse_adapter` over the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from aotpack.adapters.parse import parse_adapter
from aotpack.bench.loras import write_bench_loras
from aotpack.models.checkpoint import load_transformer_config, parse_model_ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:flux-dev")
    parser.add_argument("--lora", default="r64-all")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lora-dir", type=Path, default=Path("/tmp/aotpack-bench-loras-cpu"))
    args = parser.parse_args()
    config = load_transformer_config(parse_model_ref(args.model))
    path = write_bench_loras(config, args.lora_dir, names=[args.lora])[args.lora]
    path.read_bytes()  # page cache warm, as for a file the server just downloaded
    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        adapter = parse_adapter(path)
        seconds.append(time.perf_counter() - started)
        del adapter
    size_mb = path.stat().st_size / 1e6
    print(f"parse {args.lora} ({size_mb:.0f} MB): median {statistics.median(seconds):.3f} s, "
          f"min {min(seconds):.3f} s over {args.repeats}")


if __name__ == "__main__":
    main()
