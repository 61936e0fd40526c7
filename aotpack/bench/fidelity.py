"""LoRA fidelity: how much of the reference's LoRA effect a fast path reproduces.

error = ||(out_lora - out_base) - (ref_lora - ref_base)|| / ||ref_lora - ref_base||, with the reference
being eager bf16 + PEFT on the same inputs. 0 is a perfect LoRA effect; a path that weakens the LoRA
(the FP8 complaint: "scales need x1.5") scores the missing fraction, e.g. 0.33 for an effect at 2/3.

A bf16 reference carries its own rounding noise in `ref_lora - ref_base`, and a projection on a noisy effect comes
out short: against eager bf16 a weak LoRA looked weakened in every FP8 path, while against the same eager model
upcast to float32 the slots held 0.998-1.010 of it (H200, random weights, 2026-12-04,
benchmarks/results/2026-12-04c-h200-precise-reference/). `upcast_dtype` and `conditioning_as` make that reference.
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


def upcast_dtype(dtype: torch.dtype) -> torch.dtype:
    """The reference's dtype one step above `dtype`: float32 for bf16 (or float16), float64 for float32."""
    return torch.float64 if dtype == torch.float32 else torch.float32


def conditioning_as(value: torch.Tensor, low: torch.dtype, *, from_pipeline: bool = False) -> torch.Tensor:
    """A timestep or guidance value for an upcast Flux transformer, so that it conditions as a `low` one does.

    diffusers' Flux scales both by 1000 in the model's dtype (`timestep.to(hidden_states.dtype) * 1000`): bf16
    turns t = 0.537 into 536 where float32 keeps 537, another conditioning rather than rounding noise. Without
    this every bf16 contender, eager included, read 0.94 of the LoRA's effect at every strength against float32.
    `from_pipeline`: a timestep from `FluxPipeline`, which hands the transformer `t.to(latents.dtype) / 1000`,
    rounded in `low` twice more before that."""
    if from_pipeline:
        value = ((value * 1000).to(low) / 1000).to(value.dtype)
    return (value.to(low) * 1000).to(value.dtype) / 1000
