"""Example transformer inputs with the shapes and dtypes `FluxPipeline` passes."""

from __future__ import annotations

import math

import torch


def image_ids(image_tokens: int, device) -> torch.Tensor:
    """Latent position ids as `FluxPipeline._prepare_latent_image_ids` makes them (on a near-square grid)."""
    width = max(w for w in range(1, int(math.isqrt(image_tokens)) + 1) if image_tokens % w == 0)
    height = image_tokens // width
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(image_tokens, 3).to(device)


def transformer_inputs(config, *, batch: int, image_tokens: int, text_tokens: int, dtype: torch.dtype, device,
                       generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Keyword inputs of `FluxTransformer2DModel.forward` (random activations, realistic ids).

    `config` is the transformer's config (a diffusers FrozenDict or a plain dict)."""

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    inputs = {
        "hidden_states": randn(batch, image_tokens, config["in_channels"]),
        "encoder_hidden_states": randn(batch, text_tokens, config["joint_attention_dim"]),
        "pooled_projections": randn(batch, config["pooled_projection_dim"]),
        "timestep": (torch.rand(batch, generator=generator) * 0.9 + 0.05).to(device=device, dtype=dtype),
        "img_ids": image_ids(image_tokens, device).to(dtype),
        "txt_ids": torch.zeros(text_tokens, 3, device=device, dtype=dtype),
    }
    if config["guidance_embeds"]:
        inputs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=torch.float32)
    return inputs


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (NaN anywhere counts as infinite error)."""
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return float("inf")
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()
