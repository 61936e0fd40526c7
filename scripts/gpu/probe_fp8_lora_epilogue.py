"""Could an FP8 GEMM with the LoRA up-projection in its epilogue beat cuBLAS + a bf16 up GEMM? (issue 11, slots)

In slots a block linear runs cuBLAS's row-wise FP8 GEMM, then `delta = u B^T` (bf16, K = R = 64) whose output is
written and read again by the add. A GEMM that adds `u B^T` to its accumulator tile before the one store saves that
traffic (the up-projections are 5.9 ms of a 1024² step, `probe_lora_kappend.py`), but only pays if the GEMM itself
keeps up with cuBLAS. This probe times, per large FLUX.1-dev linear shape at 1024²:
- cuBLAS `torch._scaled_mm` (row-wise scales) alone, and followed by the bf16 up GEMM `u B^T`;
- a plain Triton FP8 GEMM (tiles autotuned over a few Hopper configs), with and without the epilogue,
and checks the Triton outputs against `_scaled_mm (+ u B^T)`. Launches replayed from CUDA graphs.

On the GPU machine: `python3 scripts/gpu/probe_fp8_lora_epilogue.py $OUT/fp8_lora_epilogue.json`
"""

import json
import sys

import torch
import triton
import triton.language as tl
from probe_lora_kappend import graph_ms, rowwise  # same folder: the timing and the row-wise quantization

RANK = 64


def large_linear_shapes(size: int = 1024) -> dict[tuple[int, int, int], int]:
    """`{(rows, K, N): count a step}` for the 304 large block linears of a `size`² FLUX.1-dev step (the double blocks'
    image stream, `size`² / 256 rows; the single blocks, 512 text rows more); the text stream's are left out."""
    image = (size // 16) ** 2
    joint = image + 512
    return {(image, 3072, 3072): 76, (image, 3072, 12288): 19, (image, 12288, 3072): 19,
            (joint, 3072, 3072): 114, (joint, 3072, 12288): 38, (joint, 15360, 3072): 38}


def text_stream_shapes() -> dict[tuple[int, int, int], int]:
    """The same for the double blocks' text stream (512 text tokens at any image size): q/k/v/out, MLP up and down."""
    return {(512, 3072, 3072): 76, (512, 3072, 12288): 19, (512, 12288, 3072): 19}


SHAPES = large_linear_shapes(1024)


@triton.autotune(
    configs=[triton.Config({"BM": 128, "BN": 128, "BK": 128, "GROUP_M": 8}, num_warps=8, num_stages=4),
             triton.Config({"BM": 128, "BN": 256, "BK": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
             triton.Config({"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8}, num_warps=4, num_stages=5)],
    key=["M", "N", "K", "HAS_LORA"])
@triton.jit
def fp8_gemm_lora(x_ptr, w_ptr, sx_ptr, sw_ptr, u_ptr, b_ptr, y_ptr, M, N, K,
                  R: tl.constexpr, HAS_LORA: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """y[M, N] = sx[m] sw[n] (x_q[M, K] W_q[N, K]^T) (+ u[M, R] B[N, R]^T), all row-major and contiguous."""
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    rows_m = tl.minimum(offs_m, M - 1)  # clamp: loads stay in bounds, the store is masked
    rows_n = tl.minimum(offs_n, N - 1)
    x_ptrs = x_ptr + rows_m[:, None] * K + offs_k[None, :]
    w_ptrs = w_ptr + rows_n[None, :] * K + offs_k[:, None]  # [BK, BN], K-major as FP8 wgmma wants
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, K // BK):  # K is a multiple of BK for every FLUX shape
        acc = tl.dot(tl.load(x_ptrs), tl.load(w_ptrs), acc)
        x_ptrs += BK
        w_ptrs += BK
    acc = acc * tl.load(sx_ptr + rows_m)[:, None] * tl.load(sw_ptr + rows_n)[None, :]
    if HAS_LORA:
        offs_r = tl.arange(0, R)
        u = tl.load(u_ptr + rows_m[:, None] * R + offs_r[None, :])
        b = tl.load(b_ptr + rows_n[None, :] * R + offs_r[:, None])
        acc = tl.dot(u, b, acc)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(tl.bfloat16), mask=mask)


def triton_gemm(x_q, w_q, s_x, s_w, u=None, b=None):
    m, k = x_q.shape
    n = w_q.shape[0]
    y = torch.empty(m, n, dtype=torch.bfloat16, device=x_q.device)
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
    fp8_gemm_lora[grid](x_q, w_q, s_x, s_w, u if u is not None else y, b if b is not None else y, y, m, n, k,
                        R=RANK, HAS_LORA=u is not None)
    return y


def random_linear(tokens, k, n, generator):
    """`(x_q, s_x, w_q, s_w, s_w_row, u, b)`: a row-wise FP8 activation and weight with their scales (the weight's
    also as the `[1, N]` row `_scaled_mm` takes) and an r64 LoRA's `u` and B, random at one linear's shape."""
    x = torch.randn(tokens, k, device="cuda", generator=generator).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=generator) * k ** -0.5).bfloat16()
    u = torch.randn(tokens, RANK, device="cuda", generator=generator).bfloat16()
    b = (torch.randn(n, RANK, device="cuda", generator=generator) * 0.01).bfloat16()
    x_q, s_x = rowwise(x)
    w_q, s_w = rowwise(w)
    return x_q, s_x, w_q, s_w, s_w.t().contiguous(), u, b


def probe(tokens, k, n, generator):
    x_q, s_x, w_q, s_w, s_w_row, u, b = random_linear(tokens, k, n, generator)
    s_x_flat, s_w_flat = s_x.reshape(-1).contiguous(), s_w.reshape(-1).contiguous()

    def cublas():
        return torch._scaled_mm(x_q, w_q.t(), scale_a=s_x, scale_b=s_w_row, out_dtype=torch.bfloat16)

    reference = cublas().float()
    reference_lora = reference + (u @ b.t()).float()
    rel = lambda a, ref: float((a.float() - ref).norm() / ref.norm())  # noqa: E731
    result = {
        "cublas_ms": graph_ms(cublas),
        "cublas_plus_up_ms": graph_ms(lambda: (cublas(), u @ b.t())),
        "cublas_plus_up_add_ms": graph_ms(lambda: cublas() + u @ b.t()),
        "triton_ms": graph_ms(lambda: triton_gemm(x_q, w_q, s_x_flat, s_w_flat)),
        "triton_lora_ms": graph_ms(lambda: triton_gemm(x_q, w_q, s_x_flat, s_w_flat, u, b)),
        "triton_error": rel(triton_gemm(x_q, w_q, s_x_flat, s_w_flat), reference),
        "triton_lora_error": rel(triton_gemm(x_q, w_q, s_x_flat, s_w_flat, u, b), reference_lora),
        "triton_config": str(fp8_gemm_lora.best_config),
    }
    return result


def record_shape(rows: list, totals: dict, r: dict, tokens: int, k: int, n: int, count: int) -> None:
    """Append one shape's results `r` to `rows` and add its `*_ms` figures, `count` times, to the step's `totals`."""
    r.update(tokens=tokens, k=k, n=n, count=count)
    rows.append(r)
    for key, value in r.items():
        if key.endswith("_ms"):
            totals[key] = round(totals.get(key, 0.0) + count * value, 2)
    print(json.dumps(r), flush=True)


def main(out_path: str) -> None:
    generator = torch.Generator("cuda").manual_seed(0)
    rows, totals = [], {}
    for (tokens, k, n), count in SHAPES.items():
        try:
            r = probe(tokens, k, n, generator)
        except Exception as error:  # a compile or launch failure: recorded, the other shapes still run
            r = {"error": f"{type(error).__name__}: {error}"[:500]}
        record_shape(rows, totals, r, tokens, k, n, count)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "rank": RANK, "per_shape": rows, "per_step_ms_these_shapes": totals}
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(totals))


if __name__ == "__main__":
    main(sys.argv[1])
