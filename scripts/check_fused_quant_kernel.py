"""The Triton kernel of `fused_gelu_quant` run by Triton's CPU interpreter, against the torch reference.

    pip install --target /tmp/triton triton       # ~290 MB; not a dependency of aotpack or its tests
    PYTHONPATH=/tmp/triton .venv/bin/python scripts/check_fused_quant_kernel.py

No GPU needed. The interpreter's float conversions are not the GPU's: it truncates fp32 -> bf16 and
rounds some fp32 -> e4m3 values toward zero, where the GPU (and torch) round to nearest even. So the
check runs in float32 (no bf16 rounding inside the kernel) and compares the kernel's FP8 output with
the interpreter's own conversion of the reference's scaled values: equal means the kernel's logic
(epilogue adds, GELU, concat layout, masks, scale, clamp, the optional GELU output, all-zero rows) matches the
reference; the GPU's rounding is checked by the build itself (`check_kernel_against_reference`).
2026-12-01, triton 3.9.0, torch 2.13.0 CPU: all cases pass.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from aotpack.models.fused_quant import _kernel, gelu_quant_reference  # noqa: E402


@triton.jit
def _convert(x_ptr, y_ptr, N: tl.constexpr):
    cols = tl.arange(0, N)
    tl.store(y_ptr + cols, tl.load(x_ptr + cols).to(y_ptr.dtype.element_ty))


def _interpreter_fp8(values: torch.Tensor) -> torch.Tensor:
    flat = torch.zeros(triton.next_power_of_2(values.numel()))
    flat[:values.numel()] = values.flatten()
    out = torch.empty(flat.numel(), dtype=torch.float8_e4m3fn)
    _convert[(1,)](flat, out, N=flat.numel())
    return out[:values.numel()].view(values.shape)


def check(prefix_width: int, width: int, keep_input: bool, epilogue: bool, rows: int = 7) -> bool:
    generator = torch.Generator().manual_seed(prefix_width + width)
    prefix = 3 * torch.randn(rows, prefix_width, generator=generator)
    pre = 3 * torch.randn(rows, width, generator=generator)
    bias, delta = (torch.randn(*shape, generator=generator) if epilogue else torch.empty(0)
                   for shape in ((width,), (rows, width)))
    prefix[3], pre[3] = 0, 0  # an all-zero row (with the epilogue: pre = -bias, delta 0)
    if epilogue:
        pre[3], delta[3] = -bias, 0
    total = prefix_width + width
    q = torch.empty(rows, total, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rows, 1)
    h = torch.full((rows, total) if keep_input else (1,), 123.0)
    _kernel()[(rows,)](prefix if prefix_width else pre, pre, bias if epilogue else pre, delta if epilogue else pre,
                       q, scale, h, PREFIX=prefix_width, WIDTH=width, BLOCK=triton.next_power_of_2(total),
                       HAS_BIAS=epilogue, HAS_DELTA=epilogue, KEEP_INPUT=keep_input)
    q_ref, scale_ref, h_ref = gelu_quant_reference(prefix, pre, bias, delta, True)
    expected_q = _interpreter_fp8((h_ref / scale_ref).clamp(-448, 448))
    checks = {
        "scale": torch.equal(scale, scale_ref),
        "fp8": torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8)),
        # x * sigmoid(2u) vs torch's tanh form: float32 rounding (torch's 1 + tanh(u) cancels for x < 0); untouched if not kept
        "gelu output": torch.allclose(h, h_ref, rtol=2e-6, atol=2e-6) if keep_input else bool((h == 123.0).all()),
        "zero row": bool((q[3].float() == 0).all()),
    }
    print(f"prefix {prefix_width}, width {width}, keep_input {keep_input}, epilogue {epilogue}: "
          + ", ".join(f"{name} {'ok' if ok else 'DIFFERS'}" for name, ok in checks.items()))
    return all(checks.values())


if __name__ == "__main__":
    cases = [(48, 160, True, False), (48, 160, False, True), (0, 160, True, True), (0, 96, False, False),
             (3, 13, True, True)]
    raise SystemExit(0 if all([check(*case) for case in cases]) else 1)
