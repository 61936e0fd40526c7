"""The GELU and norm quantization kernels (models/fused_quant.py, models/norm_quant.py) of two source trees, side by
side at FLUX.1-dev's 1024² shapes: ms per call from CUDA graphs (`kernel_probe.graph_ms`) for each launch config
(`CONFIGS`), the per-step sums of each tree's own config, and whether the two trees' outputs are equal, bit for bit
(sha256 of q, scale and the kept input on the same seeded inputs).

Made for a kernel rewrite that should change no value, e.g. a row taken in power-of-two segments instead of one
padded block (2026-12-06). Each tree runs in its own process (both are the package `aotpack`):

    cd scripts/gpu && python3 probe_kernel_trees.py $OUT/kernel_trees.json old=../../artifacts/old-528a4eb new=../..
"""

import hashlib
import json
import os
import subprocess
import sys

import torch

GELU_SHAPES = {  # name: (rows, prefix width, GELU width, calls per 1024² step)
    "gelu_single_block": (4608, 3072, 12288, 38),
    "gelu_double_block_image": (4096, 0, 12288, 19),
    "gelu_double_block_text": (512, 0, 12288, 19),
}
NORM_SHAPES = {  # name: (tokens, calls per 1024² step)
    "norm_single_block": (4608, 38),
    "norm_double_block_image": (4096, 38),
    "norm_double_block_text": (512, 38),
}
# launch configs, as keyword arguments of the tree's launcher ({}: its own); PROBE_GELU_CONFIGS / PROBE_NORM_CONFIGS
# (JSON lists) add more, e.g. a new launcher argument (which an older tree's launcher refuses: a failed row)
CONFIGS = {kind: [{}] + [{"num_warps": w} for w in warps] + json.loads(os.environ.get(f"PROBE_{kind.upper()}_CONFIGS") or "[]")
           for kind, warps in (("gelu", (8, 16)), ("norm", (2, 4)))}


def digest(tensors) -> str:
    sha = hashlib.sha256()
    for t in tensors:
        if t.numel():
            sha.update(t.contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return sha.hexdigest()[:16]


def run_tree() -> list:
    """In a tree's process (its root first on sys.path): every shape, slot or not, every launch config."""
    from aotpack.models.fused_quant import _gelu_quant_triton
    from aotpack.models.norm_quant import _norm_modulate_quant_triton
    from kernel_probe import graph_ms

    rows = []

    def time_it(kind, name, slot, per_step, launch):
        expected = digest(launch({}))
        for config in CONFIGS[kind]:
            try:
                outputs = digest(launch(config))
                ms = graph_ms(lambda: launch(config))
            except Exception as err:  # a config that does not compile or run: recorded, not fatal
                rows.append({"shape": name, "slot": slot, "config": config, "failed": str(err)[:200]})
                continue
            rows.append({"shape": name, "slot": slot, "config": config, "ms": round(ms, 5),
                         "ms_per_step": round(ms * per_step, 4), "outputs": outputs,
                         "equal_to_own_default": outputs == expected})
            print(json.dumps(rows[-1]), flush=True)

    for name, (count, prefix_width, width, per_step) in GELU_SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(count + prefix_width)
        prefix, pre = (3 * torch.randn(count, w, device="cuda", generator=g, dtype=torch.bfloat16)
                       for w in (prefix_width, width))
        for slot in (False, True):  # slot: the GELU output kept, the bias and LoRA delta added in the kernel
            bias = 3 * torch.randn(width, device="cuda", generator=g, dtype=torch.bfloat16) if slot else pre.new_empty(0)
            delta = torch.randn(count, width, device="cuda", generator=g, dtype=torch.bfloat16) if slot else pre.new_empty(0)
            time_it("gelu", name, slot, per_step,
                    lambda config: _gelu_quant_triton(prefix, pre, bias, delta, slot, **config))
    for name, (tokens, per_step) in NORM_SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(tokens)
        x = (3 * torch.randn(1, tokens, 3072, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
        shift, scale, _ = torch.randn(1, 3 * 3072, device="cuda", generator=g).to(torch.bfloat16).chunk(3, dim=1)
        for slot in (False, True):  # slot: the modulated input kept for the LoRA down-projections
            time_it("norm", name, slot, per_step,
                    lambda config: _norm_modulate_quant_triton(x, shift, scale, 1e-6, slot, **config))
    return rows


def per_step(rows) -> dict:
    """Each tree's own launch config, summed over a 1024² step, GELU and norm apart, slots or not."""
    totals = {}
    for row in rows:
        if row.get("config") == {} and "ms" in row:
            key = f"{row['shape'].split('_')[0]}_{'slots' if row['slot'] else 'no_lora'}"
            totals[key] = round(totals.get(key, 0.0) + row["ms_per_step"], 4)
    return totals


def main(out_path, trees):
    here = os.path.dirname(os.path.abspath(__file__))
    report = {"trees": trees, "rows": {}, "per_step_ms": {}}
    for label, root in trees.items():
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.abspath(root), here, os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run([sys.executable, __file__, "--tree"], env=env, capture_output=True, text=True)
        sys.stderr.write(done.stderr[-3000:])
        rows = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else []
        report["rows"][label] = rows
        report["per_step_ms"][label] = per_step(rows)
        print(label, json.dumps(report["per_step_ms"][label]), flush=True)
    first, *others = trees
    defaults = {label: {f"{r['shape']}{'_slot' if r['slot'] else ''}": r["outputs"] for r in rows
                        if r.get("config") == {} and "outputs" in r} for label, rows in report["rows"].items()}
    report["outputs_equal_to_" + first] = {other: {case: digest == defaults[first].get(case)
                                                   for case, digest in defaults[other].items()} for other in others}
    print(json.dumps(report["outputs_equal_to_" + first]))
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1:] == ["--tree"]:
        found = run_tree()
        print(json.dumps(found))
    else:
        main(sys.argv[1], dict(arg.split("=", 1) for arg in sys.argv[2:]))
