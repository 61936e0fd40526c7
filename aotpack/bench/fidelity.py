"""LoRA fidelity: how much of the reference's LoRA effect a fast path reproduces.

error = ||(out_lora - out_base) - (ref_lora - ref_base)|| / ||ref_lora - ref_base||, with the reference
being eager bf16 + PEFT on the same inputs. 0 is a perfect LoRA effect; a path that weakens the LoRA
(the FP8 complaint: "scales need x1.5") scores the missing fraction, e.g. 0.33 for an effect at 2/3.
"""

from __future__ import annotations

import torch


def lora_effect_error(out_lora: torch.Tensor, out_base: torch.Tensor, ref_lora: torch.Tensor,
                      ref_base: torch.Tensor) -> float:
    """Relative L2 error of the LoRA's effect (see module doc), computed in float64."""
    ours = out_lora.double() - out_base.double()
    theirs = ref_lora.double().to(ours.device) - ref_base.double().to(ours.device)
    return float((ours - theirs).norm() / theirs.norm())


def effect_strength(out_lora: torch.Tensor, out_base: torch.Tensor, ref_lora: torch.Tensor,
                    ref_base: torch.Tensor) -> float:
    """Projection of our LoRA effect on the reference's: 1.0 is full strength, 0.67 a weakened LoRA."""
    ours = (out_lora.double() - out_base.double()).flatten()
    theirs = (ref_lora.double().to(ours.device) - ref_base.double().to(ours.device)).flatten()
    return float(ours @ theirs / (theirs @ theirs))
