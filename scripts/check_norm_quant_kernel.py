"""The Triton kernel of `fused_norm_quant` run by Triton's CPU interpreter, against the torch reference.

    pip install --target /tmp/triton triton       # ~290 MB; not a dependency of aotpack or its tests
    PYTHONPATH=/tmp/triton .venv/bin/python scripts/check_norm_quant_kernel.py

No GPU needed. The kernel works on bf16 activations and rounds by integer ops, which the interpreter runs exactly,
so the modulated input and the scale must equal the reference's bit for bit (a LayerNorm value that sits on a
rounding tie may differ: the kernel's mean and variance are two passes, torch's its own; none did here). The
interpreter's fp32 -> e4m3 conversion is not the GPU's (it rounds some values toward zero), so the FP8 output is
compared with the interpreter's own conversion of the reference's scaled values. Equal means the kernel's logic
(row and batch indexing, strided modulation rows, masks past a non-power-of-two width, rounding, scale, clamp, the
optional kept input) matches the reference; the GPU's conversions are checked by the build itself
(`check_kernel_against_reference`). 2026-12-03, triton 3.9.0, torch 2.13.0 CPU: all cases pass.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402

from check_fused_quant_kernel import _interpreter_fp8  # noqa: E402  same folder
from aotpack.models.norm_quant import norm_modulate_quant_reference  # noqa: E402
from aotpack.models.norm_quant_kernels import norm_modulate_quant_kernel  # noqa: E402


def check(batch: int, tokens: int, width: int, keep_input: bool) -> bool:
    generator = torch.Generator().manual_seed(width + tokens)
    x = (3 * torch.randn(batch, tokens, width, generator=generator) + 0.5).to(torch.bfloat16)
    modulation = torch.randn(batch, 3 * width, generator=generator).to(torch.bfloat16)
    shift, scale, _ = modulation.chunk(3, dim=1)  # strided rows, as the blocks pass them
    q = torch.empty(batch, tokens, width, dtype=torch.float8_e4m3fn)
    row_scale = torch.empty(batch, tokens, 1)
    h = torch.full((batch, tokens, width) if keep_input else (1,), 123.0, dtype=torch.bfloat16)
    norm_modulate_quant_kernel[(batch * tokens,)](x, shift, scale, q, row_scale, h, tokens, shift.stride(0),
                                                  scale.stride(0), 1e-6, WIDTH=width,
                                                  BLOCK=triton.next_power_of_2(width), KEEP_INPUT=keep_input)
    _, scale_ref, h_ref = norm_modulate_quant_reference(x, shift, scale, 1e-6, True)
    expected_q = _interpreter_fp8((h_ref.float() / row_scale).clamp(-448, 448))
    checks = {
        "scale": torch.equal(row_scale, scale_ref),
        "fp8 (of the kernel's scale)": torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8)),
        "modulated input": torch.equal(h, h_ref) if keep_input else bool((h == 123.0).all()),
    }
    print(f"batch {batch}, tokens {tokens}, width {width}, keep_input {keep_input}: "
          + ", ".join(f"{name} {'ok' if ok else 'DIFFERS'}" for name, ok in checks.items()))
    return all(checks.values())


if __name__ == "__main__":
    cases = [(2, 5, 96, True), (2, 5, 96, False), (1, 3, 160, True), (3, 2, 13, True), (1, 64, 3072, True)]
    raise SystemExit(0 if all([check(*case) for case in cases]) else 1)
