"""Probe: cuDNN FP8 SDPA (nvidia-cudnn-frontend) against bf16 cuDNN SDPA at Flux shapes.

Random inputs, B=1, 24 heads x 128, tokens = text 512 + image (512^2: 1024, 1024^2: 4096,
2048^2: 16384). Writes $OUT/probe_fp8_attention.json and prints a table.
Run on the GPU machine after `source scripts/gpu/env.sh` with the frontend wheel carried.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import cudnn

from aotpack.models.fp8_attention import build_fp8_sdpa_graph

HEADS, DIM, FP8_MAX = 24, 128, 448.0


def timed(fn, runs=20):
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fp8_graph(shape, strides, handle):
    layout = (shape, strides)  # q, k, v and O share the (B, S, H, D) layout viewed as (B, H, S, D)
    return build_fp8_sdpa_graph(cudnn, handle, layout, layout, layout, DIM)


def quantize(x):
    scale = (x.abs().amax().float() / FP8_MAX).clamp(min=1e-12)
    return (x.float() / scale).to(torch.float8_e4m3fn), scale.reshape(1, 1, 1, 1)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main():
    out_dir = os.environ.get("OUT", "/tmp")
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    rows = {"cudnn_backend": cudnn.backend_version_string(), "torch": torch.__version__, "device": torch.cuda.get_device_name()}
    for image_tokens in (1024, 4096, 16384):
        tokens = 512 + image_tokens
        torch.manual_seed(0)
        # Flux layout: (B, S, H, D) viewed as (B, H, S, D); q/k are RMS-normed (unit scale).
        q, k, v = (torch.randn(1, tokens, HEADS, DIM, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
        shape, strides = tuple(q.shape), tuple(q.stride())
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            bf16_ms = timed(lambda: F.scaled_dot_product_attention(q, k, v))
            bf16_out = F.scaled_dot_product_attention(q, k, v)
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        graph, (tq, tk, tv, dq, dk, dv, ds, ss, so, to, tas, tao) = fp8_graph(shape, strides, handle)
        workspace = torch.empty(graph.get_workspace_size(), device="cuda", dtype=torch.uint8)
        (q8, sq), (k8, sk), (v8, sv) = quantize(q), quantize(k), quantize(v)
        q8, k8, v8 = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q8, k8, v8))
        o8 = torch.empty_strided(shape, strides, dtype=torch.float8_e4m3fn, device="cuda")
        one = torch.ones(1, 1, 1, 1, device="cuda")
        amax_s, amax_o = torch.empty_like(one), torch.empty_like(one)
        # P in [0, 1] -> scale 448; |O| <= amax(V) so O shares V's scale.
        pack = {tq: q8, tk: k8, tv: v8, dq: sq, dk: sk, dv: sv, ds: one / FP8_MAX, ss: one * FP8_MAX,
                so: 1.0 / sv, to: o8, tas: amax_s, tao: amax_o}
        run = lambda: graph.execute(pack, workspace, handle=handle)
        fp8_ms = timed(run)
        run()
        fp8_out = o8.float() * sv

        def full():
            qq, kk, vv = quantize(q), quantize(k), quantize(v)
            graph.execute({**pack, tq: qq[0], tk: kk[0], tv: vv[0], dq: qq[1], dk: kk[1], dv: vv[1], so: 1.0 / vv[1]}, workspace, handle=handle)
            return o8.to(torch.bfloat16)

        full_ms = timed(full)
        torch.cuda.synchronize()
        begin = time.perf_counter()
        for _ in range(50):
            run()
        host_us = (time.perf_counter() - begin) / 50 * 1e6
        torch.cuda.synchronize()
        flops = 4 * tokens * tokens * DIM * HEADS
        rows[str(tokens)] = {
            "bf16_cudnn_ms": bf16_ms, "fp8_cudnn_ms": fp8_ms, "fp8_with_eager_quant_ms": full_ms,
            "bf16_tflops": flops / bf16_ms / 1e9, "fp8_tflops": flops / fp8_ms / 1e9,
            "bf16_error_vs_fp32": rel(bf16_out, reference), "fp8_error_vs_fp32": rel(fp8_out, reference),
            "host_us_per_execute": host_us, "workspace_bytes": workspace.numel(),
        }
        print(tokens, rows[str(tokens)], flush=True)
    with open(os.path.join(out_dir, "probe_fp8_attention.json"), "w") as handle_out:
        json.dump(rows, handle_out, indent=1)


if __name__ == "__main__":
    main()
