"""The fused q/k RMSNorm + RoPE kernels (models/qk_norm_rope.py) alone: launch configs and bandwidth.

In the `fused_qk_norm_rope` package the per-token kernel took 3.5-3.7 ms of a 1024² step (H200, 2026-12-01,
random weights, `benchmarks/results/2026-12-01n-h200-qk-norm-rope/`). Since 2026-12-02 a part with a LoRA
slot takes the token-tile kernel, which runs the slot's up-projection as a tl.dot (its first config took
5.9 ms per step in the package against 3.6 ms for the per-token kernel plus ~1.1 ms of cuBLAS
up-projections: `benchmarks/results/2026-12-02-h200-qk-lora-up/`). This probe times one tensor (q or k) at
FLUX.1-dev's 1024² shapes (single block: 4608 image tokens; double block: 512 text + 4096 image tokens):
- no LoRA: the per-token kernel, heads per program x `num_warps`;
- a rank-64 LoRA (A x a strided third of a grouped product, as the package hands it over): the delta from
  cuBLAS then the per-token kernel (the way before), against the token-tile kernel for (tokens, heads,
  warps) per program.
It reports ms per call, GB/s and ms per step (two calls per block); each output is compared with the
package's config (`equal_to_package_config`; the sums may round in another order). Launches go through
the package's own launcher (`_qk_norm_rope_triton`), captured in a CUDA graph (20 per replay), so they time
what the programs run without the eager launcher's host time.

On the GPU machine: `python3 scripts/gpu/probe_qk_norm_rope_kernel.py $OUT/probe_qk_norm_rope_kernel.json`
"""

import json
import sys

import torch

sys.path.insert(0, ".")
from aotpack.models.qk_norm_rope import _qk_norm_rope_triton  # noqa: E402

SHAPES = {"single_block": (0, 4608, 38), "double_block": (512, 4096, 19)}  # text, image tokens, blocks per step
WIDTH, HEAD_DIM, RANK = 3072, 128, 64
REPLAYS = 20
PER_TOKEN = [(head_block, warps) for head_block in (4, 8) for warps in (1, 2)]
TILES = [(tokens, heads, warps) for tokens in (32, 64, 128) for heads in (1, 2) for warps in (2, 4, 8)]


def _time(launch) -> float:
    import triton.testing

    launch()
    # timed from a CUDA graph of REPLAYS launches: called eagerly, the launcher's host work (~0.2 ms) hid
    # the ~0.03 ms kernel (the first run of this probe, 2026-12-01n)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPLAYS):
            launch()
    return triton.testing.do_bench(graph.replay, warmup=5, rep=100) / REPLAYS


def main(out_path):
    g = torch.Generator(device="cuda").manual_seed(0)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": []}

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=g, dtype=torch.bfloat16)

    for name, (text, image, blocks) in SHAPES.items():
        angles = torch.randn(text + image, HEAD_DIM, device="cuda", generator=g)
        cos, sin = angles.cos(), angles.sin()
        tokens = text + image
        for slot in (False, True):
            def part(n):
                hidden = rnd(1, n, 3 * RANK)[..., RANK:2 * RANK] if slot else rnd(0)
                return [3 * rnd(1, n, WIDTH), rnd(WIDTH), hidden, 0.05 * rnd(WIDTH, RANK) if slot else rnd(0),
                        1 + 0.1 * rnd(HEAD_DIM)]
            args = part(text) + part(image) + [cos, sin, 1e-6, HEAD_DIM]
            moved = tokens * WIDTH * 2 * 2 + tokens * HEAD_DIM * 8 + (tokens * RANK * 2 if slot else 0)
            reference = _qk_norm_rope_triton(*args)
            configs = [dict(head_block=b, num_warps=w, up_in_kernel=False) for b, w in PER_TOKEN]
            if slot:
                configs += [dict(tile=t) for t in TILES]
            for config in configs:
                case = {"shape": name, "slot": slot, **{k: v for k, v in config.items() if k != "up_in_kernel"},
                        "kernel": "token_tile" if "tile" in config else "per_token"}
                try:
                    out = _qk_norm_rope_triton(*args, **config)
                    ms = _time(lambda: _qk_norm_rope_triton(*args, **config))
                except Exception as err:  # a config that does not compile: record it and go on
                    report["cases"].append({**case, "error": str(err)[:300]})
                    continue
                case.update({"ms": round(ms, 4), "GB_per_s": round(moved / ms / 1e6, 1),
                             "ms_per_step": round(ms * blocks * 2, 3),
                             "rel_diff_to_package_config": float((out.float() - reference.float()).norm()
                                                                 / reference.float().norm())})
                report["cases"].append(case)
                print(json.dumps(case), flush=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
