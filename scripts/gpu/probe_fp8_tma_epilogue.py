"""Does the FP8 GEMM with the LoRA up-projection in its epilogue (`aotpack::fp8_linear_lora`, lever `lora_up_in_gemm`)
beat cuBLAS + the bf16 up GEMM?

`probe_fp8_lora_epilogue.py` (2026-12-02) found a plain pointer-based Triton FP8 GEMM 9% behind cuBLAS over the
304 large linears of a 1024² step (50.7 vs 46.4 ms), so the epilogue (`+ u B^T` before the one store) lost. The op's
kernel (`aotpack/models/gemm_lora.py`) is the Hopper form: persistent programs (one per SM), tiles moved by TMA
descriptors made on the device, scales, bias and `u B^T` applied to the accumulator before the store. Per shape, in
one process, with fast accumulation (torchao's default, what the package's cuBLAS GEMMs run) and without:
- cuBLAS `torch._scaled_mm` (row-wise scales) alone, and followed by the bf16 up GEMM (what the package runs);
- the op without and with the LoRA;
- with `INDUCTOR=1`, Inductor's own choice for `_scaled_mm(...) + delta` with GEMM autotuning and its persistent TMA
  templates on (its autotune table goes to the log), i.e. what `[inductor] max_autotune_gemm` would give a build.
Launches replayed from CUDA graphs; the op's outputs are checked against cuBLAS (+ `u B^T`).

On the GPU machine: `cd scripts/gpu && python3 probe_fp8_tma_epilogue.py $OUT/fp8_tma_epilogue.json` (`SIZE=512`: the
shapes of a 512² step; the op with its LoRA tiles loaded before the K loop is timed too, `op_fast_lora_prefetch`,
and the double blocks' text-stream linears, 512 rows, summed apart)
"""

import json
import os
import sys
import time

import torch
import triton
from probe_fp8_lora_epilogue import (RANK, large_linear_shapes, random_linear, record_shape,  # same folder
                                     text_stream_shapes)
from probe_lora_kappend import graph_ms

from aotpack.models import gemm_lora


def inductor_scaled_mm_add():
    import torch._inductor.config as inductor_config
    inductor_config.max_autotune_gemm = True
    inductor_config.max_autotune_gemm_backends = "TRITON,ATEN"
    inductor_config.triton.enable_persistent_tma_matmul = True

    def fn(x_q, w_q, s_x, s_w, delta):
        return torch._scaled_mm(x_q, w_q.t(), scale_a=s_x, scale_b=s_w, out_dtype=torch.bfloat16) + delta
    return torch.compile(fn, fullgraph=True, dynamic=False)


def probe(tokens, k, n, generator, compiled):
    x_q, s_x, w_q, s_w, s_w_row, u, b = random_linear(tokens, k, n, generator)
    no_bias, no_u, no_b = u.new_empty(0), u[:, :0], b[:0]

    def cublas(fast):
        return torch._scaled_mm(x_q, w_q.t(), scale_a=s_x, scale_b=s_w_row, out_dtype=torch.bfloat16,
                                use_fast_accum=fast)

    def op(fast, lora):
        return torch.ops.aotpack.fp8_linear_lora(x_q, s_x, w_q, s_w, no_bias, u if lora else no_u,
                                                 b if lora else no_b, fast)

    def prefetched():
        return gemm_lora._triton(x_q, s_x, w_q, s_w, no_bias, u, b, True, prefetch_lora=True)

    delta = u @ b.t()
    rel = lambda a, ref: float((a.float() - ref).norm() / ref.norm())  # noqa: E731
    result = {}
    for fast in (True, False):
        tag = "fast" if fast else "precise"  # fast: FP8 products accumulated in the tensor core (torchao's default)
        reference = cublas(fast).float()
        result[f"cublas_{tag}_ms"] = graph_ms(lambda: cublas(fast))
        result[f"cublas_{tag}_plus_up_ms"] = graph_ms(lambda: (cublas(fast), u @ b.t()))
        try:
            result[f"op_{tag}_error"] = rel(op(fast, False), reference)
            result[f"op_{tag}_lora_error"] = rel(op(fast, True), reference + delta.float())
            result[f"op_{tag}_ms"] = graph_ms(lambda: op(fast, False))
            result[f"op_{tag}_lora_ms"] = graph_ms(lambda: op(fast, True))
            if fast:  # the LoRA tiles loaded before the K loop instead of after it (gemm_lora.PREFETCH_LORA)
                result["op_fast_lora_prefetch_error"] = rel(prefetched(), reference + delta.float())
                result["op_fast_lora_prefetch_ms"] = graph_ms(prefetched)
        except Exception as error:  # recorded; the rest still runs
            result[f"op_{tag}_failure"] = f"{type(error).__name__}: {error}"[:800]
    if compiled is not None:
        try:
            started = time.perf_counter()
            out = compiled(x_q, w_q, s_x, s_w_row, delta)
            result["inductor_compile_s"] = round(time.perf_counter() - started, 1)
            result["inductor_add_error"] = rel(out, cublas(False).float() + delta.float())
            result["inductor_add_ms"] = graph_ms(lambda: compiled(x_q, w_q, s_x, s_w_row, delta))
        except Exception as error:
            result["inductor_failure"] = f"{type(error).__name__}: {error}"[:800]
    return result


def main(out_path: str) -> None:
    generator = torch.Generator("cuda").manual_seed(0)
    compiled = inductor_scaled_mm_add() if os.environ.get("INDUCTOR") == "1" else None  # ~80 s a shape
    rows, totals, text_totals = [], {}, {}
    size = int(os.environ.get("SIZE", "1024"))
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "rank": RANK, "size": size, "kernel_errors": gemm_lora.kernel_errors("cuda"), "per_shape": rows,
              "per_step_ms_these_shapes": totals, "per_step_ms_text_stream": text_totals}
    print(json.dumps(report["kernel_errors"]), flush=True)
    # the large linears, then the text stream's (512 rows: small M, where a persistent kernel fills fewer SMs)
    for shapes, sums in ((large_linear_shapes(size), totals), (text_stream_shapes(), text_totals)):
        for (tokens, k, n), count in shapes.items():
            record_shape(rows, sums, probe(tokens, k, n, generator, compiled), tokens, k, n, count)
            with open(out_path, "w") as f:  # after every shape: a later failure or time-out keeps the earlier ones
                json.dump(report, f, indent=1)
    print(json.dumps(totals), json.dumps(text_totals))


if __name__ == "__main__":
    main(sys.argv[1])
