"""Random-weight models at real sizes (`random:flux-dev`), for benchmarks without downloading weights.

Weights are drawn on the target device from a fixed seed, so the build and the runtime get the
same tensors (same torch version and GPU). Prompts are not tokenized: benchmark callers pass
random `prompt_embeds`/`pooled_prompt_embeds` (the pipeline has no text encoders).
"""

from __future__ import annotations

import torch

from . import tiny

PRESETS = {
    # FLUX.1-dev / FLUX.1-schnell transformer configs (diffusers format)
    "flux-dev": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                     guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    "flux-schnell": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                         num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                         guidance_embeds=False, axes_dims_rope=(16, 56, 56)),
    # FLUX.1-dev widths at 2 double + 4 single blocks: package variants (slot overhead, layouts)
    # whose builds fit one GPU command; per-block costs are those of the full model.
    "flux-dev-d2s4": dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
                          num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                          guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    "tiny": dict(tiny.TRANSFORMER_CONFIG),
    # tiny widths, FLUX.1's 1:2 double/single depth ratio at a third of its depth: layout trade-offs
    "tiny-deep": {**tiny.TRANSFORMER_CONFIG, "num_layers": 6, "num_single_layers": 12},
}
_SEED = 1234


def preset_config(name: str) -> dict:
    from ..errors import ModelSourceError

    if name not in PRESETS:
        raise ModelSourceError(f"unknown random model preset {name!r}", f"use one of: random:{', random:'.join(PRESETS)}")
    return dict(PRESETS[name])


def make_transformer(name: str, dtype: torch.dtype, device: str = "cpu"):
    """The preset's `FluxTransformer2DModel` with seeded random weights, created directly on `device`."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(_SEED)
    if torch.device(device).type == "cuda":
        torch.cuda.manual_seed(_SEED)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # draw weights in `dtype` directly: no float32 copy on the GPU
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**preset_config(name))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def make_vae(name: str, dtype: torch.dtype, device: str = "cpu"):
    """A random AutoencoderKL with FLUX.1's VAE config (16 latent channels, 8x), or the tiny one."""
    from diffusers import AutoencoderKL

    if name.startswith("tiny"):
        return tiny.make_pipeline().vae.to(device=device, dtype=dtype)
    torch.manual_seed(_SEED + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611,
    )
    return vae.to(device=device, dtype=dtype).eval()


def make_pipeline(name: str, dtype: torch.dtype, transformer, device: str = "cpu"):
    """A text-encoder-free `FluxPipeline` (call it with prompt_embeds + pooled_prompt_embeds)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                                                max_shift=1.15, num_train_timesteps=1000, shift=3.0,
                                                use_dynamic_shifting=True)
    pipe = FluxPipeline(scheduler=scheduler, vae=make_vae(name, dtype, device), text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_prompt_embeds(config, batch: int, text_tokens: int, dtype, device, seed: int = 0):
    """(prompt_embeds, pooled_prompt_embeds) shaped like T5 + CLIP outputs, from a seed."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    embeds = torch.randn(batch, text_tokens, config["joint_attention_dim"], generator=generator)
    pooled = torch.randn(batch, config["pooled_projection_dim"], generator=generator)
    return embeds.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype)
