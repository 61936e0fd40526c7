"""The Triton kernel of `aotpack::tailed_rows` (recipe lever `lora_tails`) run by Triton's CPU interpreter: its paired
layout against its one-buffer-a-reader layout, and both against the torch reference.

    pip install --target /tmp/triton triton       # ~290 MB; not a dependency of aotpack or its tests
    PYTHONPATH=/tmp/triton .venv/bin/python scripts/check_tailed_rows_kernel.py

No GPU needed (the GPU check, bit for bit against the reference with timings, is scripts/gpu/check_tailed_rows_kernel.py;
the one-buffer layout passed it on an H100, 2026-12-07). Layouts: one buffer a reader, `[q / H | tail]`, and with
`paired` (recipe lever `lora_tails_paired`) one a pair of readers, `[tail_a | q / H | tail_b]`; with and without the
readers' factors; rows whose headroom spans 12 decades; a ragged last row block. Checked:
- the paired buffers are the one-buffer layout's bytes, rearranged, bit for bit (the paired indexing);
- against the reference: what the interpreter converts to FP8 as the GPU does, value for value: `u_hi` (put on
  FP8's grid by arithmetic first), the pads, the row scales and `q / H` in the rows whose H is 1 (`q` itself). Its
  float32 -> FP8 conversion rounds otherwise than the GPU's and torch's below FP8's normal range and on some normal
  values (a factor of 2 off), so `u_lo` and the `q / H` of rows with headroom are counted, not required equal, and
  it writes +0 for some -0 (a sign the GEMM ignores).
The interpreter's `libdevice.rint` returns nothing, so the check gives the kernel module a `rint` by float32 arithmetic
(adding and subtracting 1.5 x 2^23 rounds to the nearest even integer below 2^22; the kernel takes it of values under 8).
2026-12-08, triton 3.9.0, torch 2.13.0 CPU: all cases pass.
"""

from __future__ import annotations

import os
import types

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

from aotpack.models import lora_tails  # noqa: E402
from aotpack.models.fused_quant import quantize_rows  # noqa: E402
from aotpack.models.lora_tails import MIN_HEADROOM, TAIL_RANK, _tailed_rows_triton, tailed_rows_reference  # noqa: E402

lora_tails.libdevice = types.SimpleNamespace(rint=lambda y: (y + 12582912.0) - 12582912.0)  # the interpreter's


def _inputs(tokens: int, k: int, readers: int, with_factors: bool):
    generator = torch.Generator().manual_seed(tokens + k + readers)
    q, scale = quantize_rows(torch.randn(tokens, k, generator=generator).bfloat16())
    spread = torch.logspace(-6, 6, tokens)[torch.randperm(tokens, generator=generator)]
    u = (torch.randn(tokens, readers * TAIL_RANK, generator=generator) * spread[:, None]).bfloat16()
    factors = torch.rand(readers, generator=generator) + 0.25 if with_factors else torch.empty(0)
    return q, scale, u, factors


def _bytes(rows: torch.Tensor) -> torch.Tensor:
    return rows.view(torch.uint8)


def check(tokens: int, k: int, readers: int, with_factors: bool) -> bool:
    q, scale, u, factors = _inputs(tokens, k, readers, with_factors)
    rows, row_scale = _tailed_rows_triton(q, scale, u, factors, MIN_HEADROOM)
    expected, expected_scale = tailed_rows_reference(q, scale, u, factors, MIN_HEADROOM)
    # what the interpreter converts as the GPU does: u_hi (on FP8's grid by arithmetic first), the pads, and q / H
    # where H = 1 (q itself); values, not bytes (it writes +0 for some -0, a sign the GEMM ignores)
    hi, pads = slice(k, k + TAIL_RANK), slice(k + 3 * TAIL_RANK, None)
    unscaled = (row_scale == scale)[:, 0]
    equal = (torch.equal(rows[..., hi].float(), expected[..., hi].float())
             and torch.equal(rows[..., k + 2 * TAIL_RANK:k + 3 * TAIL_RANK].float(), expected[..., hi].float())
             and not rows[..., pads].float().any()
             and torch.equal(rows[:, unscaled, :k].float(), expected[:, unscaled, :k].float())
             and torch.equal(row_scale, expected_scale))
    lo = slice(k + TAIL_RANK, k + 2 * TAIL_RANK)
    lo_differing = int((rows[..., lo].float() != expected[..., lo].float()).sum())
    scaled_differing = int((rows[:, ~unscaled, :k].float() != expected[:, ~unscaled, :k].float()).sum())
    paired_equal = True
    if readers % 2 == 0:
        pairs, pairs_scale = _tailed_rows_triton(q, scale, u, factors, MIN_HEADROOM, True)
        tails = rows[..., k:]
        rearranged = torch.stack([torch.cat([tails[i], rows[i, :, :k], tails[i + 1]], -1) for i in range(0, readers, 2)])
        paired_equal = torch.equal(_bytes(pairs), _bytes(rearranged)) and torch.equal(pairs_scale, row_scale)
    print(f"tokens {tokens}, K {k}, {readers} readers, factors {with_factors}: u_hi, pads, row scales and q where "
          f"H = 1 ({int(unscaled.sum())} of {tokens} rows) {'equal to' if equal else 'DIFFERENT from'} the reference "
          f"(converted otherwise by the interpreter: {lo_differing} of {rows[..., lo].numel()} u_lo values, "
          f"{scaled_differing} of {rows[:, ~unscaled, :k].numel()} q / H values); paired layout "
          f"{'equal to' if paired_equal else 'DIFFERENT from'} the one-buffer layout rearranged")
    return equal and paired_equal


if __name__ == "__main__":
    cases = [(tokens, k, readers, with_factors) for tokens, k, readers in ((40, 256, 4), (17, 128, 2), (33, 256, 1))
             for with_factors in (True, False)]
    raise SystemExit(0 if all([check(*case) for case in cases]) else 1)
