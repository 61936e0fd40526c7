"""Helpers shared by aotpack's Triton kernel ops (fused_quant, norm_quant, qk_norm_rope, lora_down_fp8, lora_up,
gelu_lora, merge_by_address): registering an op, which ranks a `tl.dot` takes, and refusing a build whose GPU kernel
parts from its torch reference."""

from __future__ import annotations

import logging

import torch


def dot_takes_rank(rank: int) -> bool:
    """Whether a LoRA rank can be a `tl.dot` dimension in aotpack's kernels: a power of two, 16 or more. Kernel ops
    whose rank is not run their torch reference instead (correct, not fast)."""
    return rank >= 16 and rank & (rank - 1) == 0


def register_triton_op(name: str, fn):
    """`torch.library.triton_op(name)(fn)`, for aotpack's kernel ops.

    On a machine without triton, torch logs "Triton not available" when the op is defined; the CPU path
    does not need triton, so that line would only alarm users of the CPU install."""
    logger = logging.getLogger("torch._library.triton")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return torch.library.triton_op(name, mutates_args=())(fn)
    finally:
        logger.setLevel(level)


def refuse_kernel_errors(kernel: str, lever: str, device, errors: dict[str, float], tolerance: float = 1e-2) -> None:
    """Refuse a build whose GPU kernel parts from its reference (`errors`: relative L2 per case): the build
    validation compares programs with eager runs of the same op, so it would not see a kernel wrong in both."""
    from ..errors import ValidationFailedError

    if max(errors.values()) > tolerance:
        raise ValidationFailedError(
            f"the {kernel} kernel disagrees with its reference on {device}: "
            + ", ".join(f"{k} {v:.3g}" for k, v in errors.items()) + f" (relative L2; limit {tolerance})",
            f"set {lever} = false in the recipe and report it with `aotpack doctor` output")
