"""How fast the merge's batched copies run on the GPU, by element width: FP8 weights of every FLUX.1-dev block
linear (shapes from a package's manifest, random bytes) copied as one `_foreach_copy_` of bytes (before), of 8-byte
words with large tensors alone (`copy_by_dtype`, which prepares a `CopyPlan` per call; and a plan prepared once,
as the unmerge runs it), one `copy_` per tensor, and stacked (`torch.stack`) as bytes vs words.

The merge of r64-all saves ~11 GB of originals, stacks them per shape and copies the new rows back; the unmerge
copies the originals back (H200, 2026-12-02: 30.7 ms with byte copies, 14.3 ms with words and large tensors alone,
host-bound against ~7.6 ms of copy kernels).

On the GPU machine: `python3 scripts/gpu/probe_copies.py MANIFEST $OUT/copies.json`
"""

import json
import sys

import torch

sys.path.insert(0, ".")


def _median_ms(fn) -> float:
    from aotpack.bench.timing import time_ms

    return round(time_ms(fn, "cuda", warmup=1, repeats=5)["median_ms"], 2)


def main(manifest_path: str, out_path: str) -> None:
    from aotpack.runtime.merge import CopyPlan, copy_by_dtype

    manifest = json.load(open(manifest_path))
    shapes = [(s["out_features"], s["in_features"]) for s in manifest["slots"]
              if s["name"].startswith(("transformer_blocks.", "single_transformer_blocks."))]
    srcs = [torch.randint(0, 255, shape, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
            for shape in shapes]
    dsts = [torch.empty_like(t) for t in srcs]
    gigabytes = sum(t.nbytes for t in srcs) / 1e9
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": len(srcs),
              "gigabytes": round(gigabytes, 2)}
    as_bytes = ([t.view(torch.uint8) for t in dsts], [t.view(torch.uint8) for t in srcs])
    report["foreach_bytes_ms"] = _median_ms(lambda: torch._foreach_copy_(*as_bytes))
    report["copy_by_dtype_words_ms"] = _median_ms(lambda: copy_by_dtype(dsts, srcs))
    plan = CopyPlan(dsts, srcs)  # prepared once, as the merge's save prepares the unmerge
    report["copy_plan_prepared_ms"] = _median_ms(plan.run)
    report["copy_per_tensor_ms"] = _median_ms(lambda: [d.copy_(s) for d, s in zip(dsts, srcs)])
    assert all(torch.equal(d.view(torch.uint8), s.view(torch.uint8)) for d, s in zip(dsts, srcs))
    square = [t for t in srcs if t.shape == (3072, 3072)]
    report["stack_square_layers"] = len(square)
    report["stack_bytes_ms"] = _median_ms(lambda: torch.stack([t.view(torch.uint8) for t in square]))
    report["stack_words_ms"] = _median_ms(lambda: torch.stack([t.reshape(-1).view(torch.int64) for t in square]))
    for key in [k for k in report if k.endswith("_ms") and not k.startswith("stack")]:
        report[key.replace("_ms", "_tb_per_s")] = round(2 * gigabytes / report[key], 2)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
