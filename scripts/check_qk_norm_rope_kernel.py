"""The Triton kernel of `fused_qk_norm_rope` run by Triton's CPU interpreter, against the torch reference.

    pip install --target /tmp/triton triton       # ~290 MB; not a dependency of aotpack or its tests
    PYTHONPATH=/tmp/triton .venv/bin/python scripts/check_qk_norm_rope_kernel.py

No GPU needed. The interpreter truncates fp32 -> bf16 where the GPU (and torch) round to nearest even, so
the check runs in float32 (the kernel's roundings to the activation dtype are then no-ops): it checks the
kernel's logic (text/image parts and their weights, token offsets into the rotary table and the output,
the epilogue adds, per-head norm, the RoPE pairs, batch rows, heads per program) against the reference
to float32 rounding; the GPU's bf16 rounding is checked by the build itself (`check_kernel_against_reference`).
2026-12-01, triton 3.9.0, torch 2.13.0 CPU: all cases pass.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

from aotpack.models.qk_norm_rope import _head_block, _kernel, qk_norm_rope_reference  # noqa: E402


def check(heads: int, head_dim: int, text_tokens: int, image_tokens: int, bias: bool, delta: bool,
          batch: int = 2) -> bool:
    generator = torch.Generator().manual_seed(heads * head_dim + text_tokens)
    width = heads * head_dim

    def part(tokens):
        return [3 * torch.randn(batch, tokens, width, generator=generator),
                torch.randn(width, generator=generator) if bias else torch.empty(0),
                torch.randn(batch, tokens, width, generator=generator) if delta else torch.empty(0),
                1 + 0.1 * torch.randn(head_dim, generator=generator)]

    text, image = part(text_tokens), part(image_tokens)
    angles = 10 * torch.randn(text_tokens + image_tokens, head_dim, generator=generator)
    cos, sin = angles.cos(), angles.sin()
    out = torch.full((batch, text_tokens + image_tokens, heads, head_dim), 123.0)
    block = _head_block(heads)
    for first, (y, b, d, w) in ((0, text), (text_tokens, image)):
        if y.shape[1]:
            _kernel()[(y.shape[1] * (heads // block), batch)](
                y, b if bias else y, d if delta else y, w, cos, sin, out, y.shape[1], first,
                text_tokens + image_tokens, 1e-6, HEADS=heads, HEAD_DIM=head_dim, HEAD_BLOCK=block,
                HAS_BIAS=bias, HAS_DELTA=delta)
    reference = qk_norm_rope_reference(*text, *image, cos, sin, 1e-6, head_dim)
    ok = torch.allclose(out, reference, rtol=1e-5, atol=1e-5)
    print(f"heads {heads} (x{block} per program), head_dim {head_dim}, text {text_tokens}, image {image_tokens}, "
          f"bias {bias}, delta {delta}: max |diff| {(out - reference).abs().max():.2e} {'ok' if ok else 'DIFFERS'}")
    return ok


if __name__ == "__main__":
    cases = [(24, 128, 5, 11, True, True), (24, 128, 0, 9, True, False), (6, 16, 3, 4, False, False),
             (2, 16, 7, 2, False, True), (3, 32, 0, 5, True, True)]
    raise SystemExit(0 if all([check(*case) for case in cases]) else 1)
