"""Layouts whose diffusers converters hard-code Flux.1 widths, on a Flux-width model.

diffusers splits kohya/ComfyUI `single_blocks_*_linear1` as 3072/3072/3072/12288, so those files
only convert for hidden size 3072. The model here has Flux.1-dev's widths (24 heads x 128, T5 4096,
CLIP 768, 64 input channels, guidance, rope axes 16/56/56) with 1 double and 1 single block and
tiny text encoders/VAE; it is written as a diffusers-format pipeline directory and built once.
"""

from __future__ import annotations

import lora_formats as formats
import pytest
import torch
from reference import REQUEST, reference_latents, rel_error

import aotpack
from aotpack.builder.build import build_package
from aotpack.models.tiny import make_clip_tokenizer, make_t5_tokenizer

TOLERANCE = 1e-3
STRENGTH = 1.5  # LoRA factor scale: at Flux widths a weaker delta barely moves the latents
FLUX_WIDTH = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                  axes_dims_rope=(16, 56, 56))


def make_flux_width_pipeline():
    """Flux.1 widths, one block of each kind; text encoders and VAE as small as those widths allow."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tokenizer, t5_tokenizer = make_clip_tokenizer(), make_t5_tokenizer()
    torch.manual_seed(3072)
    transformer = FluxTransformer2DModel(**FLUX_WIDTH)  # diffusers' default init: well-scaled activations
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=FLUX_WIDTH["pooled_projection_dim"], intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
        bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=FLUX_WIDTH["joint_attention_dim"], d_kv=8, d_ff=32, num_layers=1,
        num_heads=2, relative_attention_num_buckets=8, pad_token_id=t5_tokenizer.pad_token_id,
        eos_token_id=t5_tokenizer.eos_token_id, decoder_start_token_id=0))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                        latent_channels=FLUX_WIDTH["in_channels"] // 4, norm_num_groups=4, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                                                max_shift=1.15, num_train_timesteps=1000, shift=3.0,
                                                use_dynamic_shifting=True)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=clip.eval(), tokenizer=clip_tokenizer,
                        text_encoder_2=t5.eval(), tokenizer_2=t5_tokenizer, transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


_BUILT: dict[str, tuple] = {}


def flux_width_model(tmp_path_factory):
    """(eager diffusers pipeline, served package) of the Flux-width model, built once per session
    (the stacking tests use it too: its 3072-wide layers make an SVD fit lose energy)."""
    if "model" not in _BUILT:
        root = tmp_path_factory.mktemp("flux-width")
        eager = make_flux_width_pipeline()
        eager.save_pretrained(root / "model")
        package = build_package(str(root / "model"), "cpu", out=root / "package", max_rank=16,
                                no_slot_programs=False, progress=False)  # half the programs: CI time
        _BUILT["model"] = eager, aotpack.load(package, model=str(root / "model"))
    return _BUILT["model"]


@pytest.fixture(scope="module")
def flux_width(tmp_path_factory):
    return flux_width_model(tmp_path_factory)


@pytest.fixture(scope="module")
def width_files(flux_width, tmp_path_factory):
    eager, _ = flux_width
    directory = tmp_path_factory.mktemp("width-formats")
    config, clip = dict(eager.transformer.config), formats.clip_layers(eager.text_encoder)
    return {
        "kohya": formats.write(formats.kohya(config, clip, seed=11, t5_blocks=1, strength=STRENGTH),
                               directory / "kohya.safetensors"),
        "kohya_sparse_fused": formats.write(formats.kohya(config, seed=12, sparse_fused=True, strength=STRENGTH),
                                            directory / "kohya-sparse.safetensors"),
        "comfyui": formats.write(formats.comfyui(config, clip, seed=13, diff_b="zero", strength=STRENGTH),
                                 directory / "comfyui.safetensors"),
        # XLabs targets the attention layers only: a stronger delta for a comparable effect
        "xlabs": formats.write(formats.xlabs(config, seed=14, strength=3 * STRENGTH),
                               directory / "xlabs.safetensors"),
    }


@pytest.mark.parametrize("layout", ["kohya", "kohya_sparse_fused", "comfyui", "xlabs"])
def test_flux_width_layout_matches_diffusers(layout, flux_width, width_files):
    eager, served = flux_width
    result = served.set_loras([(width_files[layout], 0.9)])
    with torch.no_grad():
        ours = served(**REQUEST, generator=torch.Generator("cpu").manual_seed(7), output_type="latent").images
    theirs = reference_latents(eager, [(width_files[layout], 0.9)])
    error, effect = rel_error(ours, theirs), rel_error(theirs, reference_latents(eager, []))
    print(f"{layout}: rel. error {error:.2e}, LoRA effect {effect:.2e}, notes {result.notes}")
    assert error <= TOLERANCE
    assert effect > 100 * TOLERANCE
    layers = served.transformer.bank.used_rank
    if layout.startswith("kohya"):  # the fused linear1 really was split into q/k/v/mlp slots
        assert all(layers[f"single_transformer_blocks.0.{m}"] > 0 for m in ("attn.to_q", "proj_mlp"))
    if layout in ("kohya", "comfyui"):
        assert any("T5" in note for note in result.notes)
