"""A pipeline's denoising loop over the transformer alone, for timing steps as an image runs them."""

from __future__ import annotations

import numpy as np
import torch


def denoising_loop(transformer, scheduler, inputs: dict, steps: int = 28, mu: float = 1.15):
    """A callable that runs one image's `steps` transformer calls as diffusers' `FluxPipeline` makes them: the
    scheduler's timesteps for FLUX's sigmas (shifted by `mu` where the scheduler shifts), each passed as `t` in the
    latents' dtype / 1000, and a new pooled tensor per image, as each pipeline call has one (batched_modulation
    packages compute an image's modulation rows at its first step). The scheduler's own step is left out: it is
    the same for every package."""
    sigmas = np.linspace(1.0, 1 / steps, steps)
    hidden = inputs["hidden_states"]

    def run():
        scheduler.set_timesteps(sigmas=sigmas, device=hidden.device,
                                mu=mu if scheduler.config.get("use_dynamic_shifting") else None)
        pooled = inputs["pooled_projections"].clone()
        for t in scheduler.timesteps:
            timestep = t.expand(hidden.shape[0]).to(hidden.dtype)
            transformer(**{**inputs, "pooled_projections": pooled, "timestep": timestep / 1000}, return_dict=False)

    return run
