"""The embedded tiny Flux pipeline: real diffusers/transformers classes, random weights made in code.

Deterministic (fixed seeds), built offline in about a second. It has the structure of Flux.1-dev
(guidance embedding, double and single blocks, CLIP + T5 text encoders, 8x VAE) at toy widths, so
the whole build/run path can be exercised and compared with diffusers on a laptop CPU.
"""

from __future__ import annotations

import torch

TINY_MODEL_ID = "aotpack/tiny-flux"
TINY_REVISION = "embedded-1"

TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=16,  # 4 VAE latent channels, packed 2x2
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,  # T5 width
    pooled_projection_dim=32,  # CLIP width
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)

_SEED = 20251129


def _byte_level_alphabet() -> list[str]:
    """The 256 printable characters GPT-2/CLIP byte-level BPE uses for raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def make_clip_tokenizer():
    """A character-level CLIP BPE tokenizer (no merges), built in code."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for ch in _byte_level_alphabet():
        vocab[ch] = len(vocab)
    for ch in _byte_level_alphabet():
        vocab[ch + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def make_t5_tokenizer():
    """A Unigram T5 tokenizer over lowercase letters, digits and punctuation, built in code."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
    pieces += [(ch, -3.0) for ch in alphabet]
    pieces += [("▁" + ch, -2.5) for ch in alphabet]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def make_transformer(dtype: torch.dtype = torch.float32):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(_SEED)
    model = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    # diffusers zero-initialises nothing here, but make every weight clearly non-trivial so that
    # a wrongly bound or missing weight changes the output.
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model.to(dtype).eval()


def make_pipeline(dtype: torch.dtype = torch.float32, transformer=None):
    """The complete tiny `FluxPipeline` (transformer, CLIP, T5, VAE, scheduler, tokenizers).

    `transformer` replaces the eager tiny transformer (e.g. by a compiled one).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tokenizer = make_clip_tokenizer()
    t5_tokenizer = make_t5_tokenizer()

    torch.manual_seed(_SEED + 1)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=TRANSFORMER_CONFIG["pooled_projection_dim"],
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
    )
    torch.manual_seed(_SEED + 2)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=TRANSFORMER_CONFIG["joint_attention_dim"],
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
            decoder_start_token_id=0,
        )
    )
    torch.manual_seed(_SEED + 3)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),  # 4 levels: 8x spatial downsampling like the real VAE
        layers_per_block=1,
        latent_channels=TRANSFORMER_CONFIG["in_channels"] // 4,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=4096,
        max_shift=1.15,
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=clip.eval(),
        tokenizer=clip_tokenizer,
        text_encoder_2=t5.eval(),
        tokenizer_2=t5_tokenizer,
        transformer=transformer if transformer is not None else make_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def save_pipeline(directory: str, dtype: torch.dtype = torch.float32) -> str:
    """Write the tiny pipeline as a diffusers-format directory (handy for trying `--model DIR`)."""
    make_pipeline(dtype).save_pretrained(directory)
    return directory
