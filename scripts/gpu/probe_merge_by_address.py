"""The merge by address as a package carries it (issue 11): compile `merge_and_save_by_address.pt2` ahead of time,
check it against the merge's math, and time the runtime's merge (runtime/address_merge.py: one program call per
shape, which returns the originals it overwrote) over FLUX.1-dev's 494 block linears, r64, random FP8 weights; then
the unmerge.

On the GPU machine: `python3 scripts/gpu/probe_merge_by_address.py $OUT/merge_by_address.json`
"""

import json
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from aotpack.builder.compile import compile_program
from aotpack.models.merge_by_address import MERGE_BY_ADDRESS_PROGRAM, check_program, export_merge_by_address
from aotpack.models.merge_rows import merged_rows
from aotpack.runtime.address_merge import AddressMerge
from aotpack.runtime.program import open_program

RANK = 64
SHAPES = {(3072, 3072): 19 * 8 + 38 * 3, (12288, 3072): 19 * 2 + 38, (3072, 12288): 19 * 2, (3072, 15360): 38,
          (18432, 3072): 19 * 2, (9216, 3072): 38}


def flux_layers(device):
    generator = torch.Generator(device).manual_seed(0)
    layers = []
    for (rows, cols), count in SHAPES.items():
        for _ in range(count):
            qdata = (torch.randn(rows, cols, device=device, generator=generator) * 100).clamp(-448, 448)
            weight = types.SimpleNamespace(qdata=qdata.to(torch.float8_e4m3fn),
                                           scale=torch.rand(rows, 1, device=device, generator=generator) * 1e-4 + 1e-5)
            a = (torch.randn(RANK, cols, device=device, generator=generator) * 0.02).to(torch.bfloat16)
            b = (torch.randn(rows, RANK, device=device, generator=generator) * 0.02).to(torch.bfloat16)
            layers.append((weight, [(a, b, 0.9)]))
    return layers


def timed(fn):
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    host = time.perf_counter()
    start.record()
    value = fn()
    end.record()
    host = time.perf_counter() - host
    torch.cuda.synchronize()
    return value, {"ms": round(start.elapsed_time(end), 3), "host_ms": round(host * 1000, 3)}


def main(path):
    device = "cuda"
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as folder:
        package = Path(folder) / f"{MERGE_BY_ADDRESS_PROGRAM}.pt2"
        started = time.perf_counter()
        exported = export_merge_by_address(torch.bfloat16, device)
        result["export_s"] = round(time.perf_counter() - started, 2)
        result["compile_s"] = compile_program(exported, package, {}).seconds
        result["package_kb"] = round(package.stat().st_size / 1e3, 1)
        started = time.perf_counter()
        program = open_program(package).instantiate(device)
        merge = AddressMerge(program, torch.bfloat16)
        merge.warm(device)
        result["load_and_warm_s"] = round(time.perf_counter() - started, 3)
        result["check_program"] = check_program(program, torch.bfloat16, device)
        print(json.dumps(result), flush=True)

        layers = flux_layers(device)
        result["layers"] = len(layers)
        result["fp8_gb"] = round(sum(w.qdata.numel() for w, _ in layers) / 1e9, 2)
        originals = [(w.qdata.clone(), w.scale.clone()) for w, _ in layers]
        runs = []
        for _ in range(3):
            saved, save = timed(lambda: merge.save(layers))
            _, fold = timed(lambda s=saved: merge.fold(s))
            _, restore = timed(saved.run)
            runs.append({"save": save, "fold": fold, "unmerge": restore})
        result["runs_split"] = runs  # save and fold timed apart (a sync between)
        together = []
        for _ in range(3):
            holder = {}
            _, merged = timed(lambda: holder.update(saved=merge.save(layers)) or merge.fold(holder["saved"]))
            _, restore = timed(holder["saved"].run)
            together.append({"merge": merged, "unmerge": restore})
        result["runs"] = together  # as LoRAModes runs it: save then fold, no sync between
        restored = all(torch.equal(w.qdata.view(torch.uint8), q.view(torch.uint8)) and torch.equal(w.scale, s)
                       for (w, _), (q, s) in zip(layers, originals))
        result["restore_bit_identical"] = restored
        # the merged weights against merged_rows, one layer per shape
        merge.fold(merge.save(layers))
        checks, seen = {}, set()
        for (weight, parts), (qdata, scale) in zip(layers, originals):
            if qdata.shape in seen:
                continue
            seen.add(qdata.shape)
            a, b, s = parts[0]
            expected_qdata, expected_scale = merged_rows(qdata, scale, a, torch.mul(b, s))
            checks[str(tuple(qdata.shape))] = {
                "scale_max_rel_diff": float(((weight.scale - expected_scale).abs() / expected_scale).max()),
                "fp8_bytes_equal": float((weight.qdata.view(torch.uint8) == expected_qdata.view(torch.uint8))
                                         .float().mean())}
        result["vs_merged_rows"] = checks
    text = json.dumps(result, indent=1)
    print(text)
    Path(path).write_text(text)


if __name__ == "__main__":
    main(sys.argv[1])
