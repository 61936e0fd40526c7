"""A pipeline's denoising loop over the transformer alone, for timing steps as an image runs them."""

from __future__ import annotations

import contextlib

import numpy as np
import torch


def denoising_loop(transformer, pipeline, inputs: dict, steps: int = 28, mu: float = 1.15, by_index: bool = True):
    """A callable that runs one image's `steps` transformer calls as diffusers' `FluxPipeline` makes them: its
    scheduler's timesteps for FLUX's sigmas (shifted by `mu` where the scheduler shifts), each passed as `t` in the
    latents' dtype / 1000 with `pipeline._current_timestep` set to that `t` while the transformer runs, all in one
    `verified_step_rows()` scope as in an AotpackPipeline call (a batched_modulation package then takes each step's
    row by its index, runtime/modulation_rows.py), and a new pooled tensor per image, as each pipeline call has one
    (such packages compute an image's modulation rows at its first step). `by_index=False` leaves the scope out: each
    step reads its timestep from the device, as a diffusers pipeline called directly does. The scheduler's own step
    is left out: it is the same for every package."""
    sigmas = np.linspace(1.0, 1 / steps, steps)
    hidden = inputs["hidden_states"]
    scheduler = pipeline.scheduler

    def run():
        scheduler.set_timesteps(sigmas=sigmas, device=hidden.device,
                                mu=mu if scheduler.config.get("use_dynamic_shifting") else None)
        pooled = inputs["pooled_projections"].clone()
        scope = transformer.verified_step_rows() if by_index else contextlib.nullcontext()
        with scope:  # as an AotpackPipeline call runs its steps
            try:
                for t in scheduler.timesteps:
                    pipeline._current_timestep = t
                    timestep = t.expand(hidden.shape[0]).to(hidden.dtype)
                    transformer(**{**inputs, "pooled_projections": pooled, "timestep": timestep / 1000},
                                return_dict=False)
            finally:
                pipeline._current_timestep = None

    return run
