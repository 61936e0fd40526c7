"""One batch through the loaded pipeline: the same call `aotpack run` makes, for several prompts/seeds.

Item i of a batch uses `torch.Generator("cpu").manual_seed(seed_i)` (diffusers draws each item's
latents from its own generator), so an image equals `aotpack run --seed seed_i`'s.
"""

from __future__ import annotations

import dataclasses
import time
import zlib

import torch

from ..models.prepare import torch_dtype
from ..models.random_weights import random_prompt_embeds


@dataclasses.dataclass(frozen=True)
class Params:
    """What must be equal for requests to share a batch (besides the adapter set)."""

    height: int
    width: int
    steps: int
    guidance: float
    max_sequence_length: int


@dataclasses.dataclass
class BatchOutput:
    images: list  # PIL images, one per item
    steps_seconds: float
    decode_seconds: float


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompt_inputs(served, prompts: list[str], text_tokens: int) -> dict:
    """`prompt=` for a model with text encoders. Models without them (the `random:*` benchmark presets)
    get seeded random embeddings per prompt (crc32 of the text), like `aotpack bench serve`."""
    if served.pipeline.text_encoder_2 is not None:
        return {"prompt": prompts if len(prompts) > 1 else prompts[0], "max_sequence_length": text_tokens}
    config, dtype = served.transformer.config, torch_dtype(served.manifest.dtype)
    pairs = [random_prompt_embeds(config, 1, text_tokens, dtype, served.device, seed=zlib.crc32(p.encode()))
             for p in prompts]
    return {"prompt_embeds": torch.cat([e for e, _ in pairs]), "pooled_prompt_embeds": torch.cat([p for _, p in pairs])}


@torch.no_grad()
def generate(served, params: Params, items: list[tuple[str, int]]) -> BatchOutput:
    """Images for `items` [(prompt, seed), ...] with the active adapter set, as one pipeline call."""
    generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in items]
    started = time.perf_counter()
    latents = served(**prompt_inputs(served, [p for p, _ in items], params.max_sequence_length),
                     height=params.height, width=params.width, num_inference_steps=params.steps,
                     guidance_scale=params.guidance, generator=generators if len(items) > 1 else generators[0],
                     output_type="latent").images
    _synchronize(served.device)
    decoding = time.perf_counter()
    images = [served.decode_latents(latents[i:i + 1], params.height, params.width) for i in range(len(items))]
    _synchronize(served.device)
    return BatchOutput(images, decoding - started, time.perf_counter() - decoding)
