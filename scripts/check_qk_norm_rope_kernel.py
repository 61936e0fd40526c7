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

from aotpack.models.qk_norm_rope import _head_block, _kernels, qk_norm_rope_reference  # noqa: E402


def check(heads: int, head_dim: int, text_tokens: int, image_tokens: int, bias: bool, rank: int,
          batch: int = 2, tile: tuple[int, int] = (32, 1)) -> bool:
    """rank 0: no LoRA; rank < 16: the per-token kernel with the delta formed before it (as the op does);
    else the token-tile kernel with the up-projection as a tl.dot, `A x` a strided view of a grouped product."""
    generator = torch.Generator().manual_seed(heads * head_dim + text_tokens + rank)
    width = heads * head_dim
    per_token, per_tile = _kernels()

    def part(tokens):
        grouped = torch.randn(batch, tokens, 3 * rank, generator=generator)
        return [3 * torch.randn(batch, tokens, width, generator=generator),
                torch.randn(width, generator=generator) if bias else torch.empty(0),
                grouped[..., rank:2 * rank] if rank else torch.empty(0),
                0.3 * torch.randn(width, rank, generator=generator) if rank else torch.empty(0),
                1 + 0.1 * torch.randn(head_dim, generator=generator)]

    text, image = part(text_tokens), part(image_tokens)
    angles = 10 * torch.randn(text_tokens + image_tokens, head_dim, generator=generator)
    cos, sin = angles.cos(), angles.sin()
    total = text_tokens + image_tokens
    out = torch.full((batch, total, heads, head_dim), 123.0)
    block = _head_block(heads)
    for first, (y, b, hidden, up, w) in ((0, text), (text_tokens, image)):
        tokens = y.shape[1]
        if not tokens:
            continue
        if rank >= 16:
            tile_tokens, tile_heads = tile
            per_tile[((tokens + tile_tokens - 1) // tile_tokens * (heads // tile_heads), batch)](
                y, b if bias else y, hidden, up, w, cos, sin, out, tokens, first, total, hidden.stride(0),
                hidden.stride(1), up.stride(0), 1e-6, HEADS=heads, HEAD_DIM=head_dim, RANK=rank,
                TOKEN_BLOCK=tile_tokens, HEAD_GROUP=tile_heads, HAS_BIAS=bias)
        else:
            delta = torch.nn.functional.linear(hidden, up) if rank else y
            per_token[(tokens * (heads // block), batch)](
                y, b if bias else y, delta, w, cos, sin, out, tokens, first, total, 1e-6, HEADS=heads,
                HEAD_DIM=head_dim, HEAD_BLOCK=block, HAS_BIAS=bias, HAS_DELTA=rank > 0)
    reference = qk_norm_rope_reference(*text, *image, cos, sin, 1e-6, head_dim)
    # tl.dot's fp32 sum of rank products may round apart from torch's matmul in the last bits
    ok = torch.allclose(out, reference, rtol=1e-4, atol=1e-4)
    print(f"heads {heads} (x{block} per program; tile {tile}), head_dim {head_dim}, text {text_tokens}, "
          f"image {image_tokens}, bias {bias}, rank {rank}: max |diff| {(out - reference).abs().max():.2e} {'ok' if ok else 'DIFFERS'}")
    return ok


if __name__ == "__main__":
    cases = [(24, 128, 5, 11, True, 4), (24, 128, 0, 9, True, 0), (6, 16, 3, 4, False, 0),
             (2, 16, 7, 2, False, 8), (3, 32, 0, 5, True, 2),
             # token tiles with a tl.dot: Flux's shapes with a rank-64 slot, token counts off the tile size
             (24, 128, 13, 67, True, 64), (4, 64, 0, 40, False, 16), (2, 128, 33, 1, True, 32),
             (24, 128, 13, 67, True, 64, 1, (16, 8)), (4, 64, 5, 40, True, 16, 2, (64, 2))]
    raise SystemExit(0 if all([check(*case) for case in cases]) else 1)
