"""The fused q/k RMSNorm + RoPE kernel (models/qk_norm_rope.py) alone: launch configs and bandwidth.

In the `fused_qk_norm_rope` package it took 3.5-3.7 ms of a 1024² step (H200, 2026-12-01, random weights,
`benchmarks/results/2026-12-01n-h200-qk-norm-rope/`), about 2/3 of what its bytes need at the H200's
bandwidth; with the 1-warp config this probe found, 2.67 ms with no LoRA (2026-12-02). A token-tile
variant that ran the slot's up-projection as a tl.dot lost to cuBLAS + this kernel and was dropped; its
probe (commit 3679c68) and figures are in `benchmarks/results/2026-12-02-h200-qk-lora-up/`. This probe times one tensor (q or k) at FLUX.1-dev's 1024² shapes (single block: 4608 image
tokens; double block: 512 text + 4096 image tokens), with and without a LoRA delta, for several heads per
program and `num_warps`, and reports ms per call, GB/s and ms per step (two calls per block). Each config's
output is compared with the package's (8 heads, 4 warps until 2026-12-02, 1 warp since) bit for bit (the sum of squares may round in
another order). The launches go through the package's own launcher (`_qk_norm_rope_triton`), captured in
a CUDA graph, so they time the kernel the programs run without the eager launcher's host time.

On the GPU machine: `python3 scripts/gpu/probe_qk_norm_rope_kernel.py $OUT/probe_qk_norm_rope_kernel.json`
"""

import json
import sys

import torch

sys.path.insert(0, ".")
from aotpack.models.qk_norm_rope import _qk_norm_rope_triton  # noqa: E402

SHAPES = {"single_block": (0, 4608, 38), "double_block": (512, 4096, 19)}  # text, image tokens, blocks per step
WIDTH, HEAD_DIM = 3072, 128
REPLAYS = 20


def main(out_path):
    import triton.testing

    g = torch.Generator(device="cuda").manual_seed(0)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": []}

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=g, dtype=torch.bfloat16)

    for name, (text, image, blocks) in SHAPES.items():
        angles = torch.randn(text + image, HEAD_DIM, device="cuda", generator=g)
        cos, sin = angles.cos(), angles.sin()
        for slot in (False, True):
            def part(tokens):
                return [3 * rnd(1, tokens, WIDTH), rnd(WIDTH), rnd(1, tokens, WIDTH) if slot else rnd(0),
                        1 + 0.1 * rnd(HEAD_DIM)]
            args = part(text) + part(image) + [cos, sin, 1e-6, HEAD_DIM]
            tokens = text + image
            moved = tokens * WIDTH * 2 * (3 if slot else 2) + tokens * HEAD_DIM * 8  # y (+delta) in, out, cos/sin
            reference = _qk_norm_rope_triton(*args)
            for head_block in (2, 4, 8):
                for num_warps in (1, 2, 4, 8):
                    try:
                        out = _qk_norm_rope_triton(*args, head_block=head_block, num_warps=num_warps)
                        # timed from a CUDA graph of REPLAYS launches: called eagerly, the launcher's host
                        # work (~0.2 ms) hid the ~0.03 ms kernel (the first run of this probe, 2026-12-01n)
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph):
                            for _ in range(REPLAYS):
                                _qk_norm_rope_triton(*args, head_block=head_block, num_warps=num_warps)
                        ms = triton.testing.do_bench(graph.replay, warmup=5, rep=100) / REPLAYS
                    except Exception as err:  # a config that does not compile: record it and go on
                        report["cases"].append({"shape": name, "slot": slot, "head_block": head_block,
                                                "num_warps": num_warps, "error": str(err)[:300]})
                        continue
                    case = {"shape": name, "slot": slot, "head_block": head_block, "num_warps": num_warps,
                            "ms": round(ms, 4), "GB_per_s": round(moved / ms / 1e6, 1),
                            "ms_per_step": round(ms * blocks * 2, 3), "equal_to_package_config": torch.equal(out, reference)}
                    report["cases"].append(case)
                    print(json.dumps(case), flush=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
