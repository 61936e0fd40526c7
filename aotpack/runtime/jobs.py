"""Generation requests (one from CLI flags, or many from a JSONL file) and running them."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from ..errors import AotpackError

# FluxPipeline's own defaults (Flux.1-dev), so a request without options behaves like diffusers.
DEFAULTS = {"steps": 28, "height": 1024, "width": 1024, "guidance": 3.5, "max_sequence_length": 512, "seed": 0}
FIELDS = {"prompt", "loras", "seed", "steps", "height", "width", "guidance", "max_sequence_length", "out",
          "save_latents", "fit"}


@dataclasses.dataclass
class Request:
    prompt: str
    loras: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    seed: int = DEFAULTS["seed"]
    steps: int = DEFAULTS["steps"]
    height: int = DEFAULTS["height"]
    width: int = DEFAULTS["width"]
    guidance: float = DEFAULTS["guidance"]
    max_sequence_length: int = DEFAULTS["max_sequence_length"]
    out: str | None = None
    save_latents: str | None = None
    fit: str | None = None


@dataclasses.dataclass
class RequestResult:
    index: int
    seconds: float
    switch_seconds: float
    adapters_parsed: int
    image_path: str | None
    latents_path: str | None
    notes: list[str]


def parse_lora_option(text: str) -> tuple[str, float]:
    """`FILE[:SCALE]` -> (file, scale); the scale is the part after the last colon if it is a number."""
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


def request_from_json(data: dict, where: str) -> Request:
    if not isinstance(data, dict):
        raise AotpackError(f"{where}: a job must be a JSON object, got {type(data).__name__}",
                           'write one object per line, e.g. {"prompt": "a cat", "loras": [["style.safetensors", 0.8]]}')
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise AotpackError(f"{where}: unknown fields {unknown}", f"use only {sorted(FIELDS)}")
    if not isinstance(data.get("prompt"), str):
        raise AotpackError(f"{where}: 'prompt' (a string) is required", 'add "prompt": "..."')
    loras = []
    for item in data.get("loras") or []:
        if isinstance(item, str):
            loras.append(parse_lora_option(item))
        elif isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], (int, float)):
            loras.append((str(item[0]), float(item[1])))
        else:
            raise AotpackError(f"{where}: bad LoRA entry {item!r}", 'use [["path.safetensors", 0.8], ...]')
    fields = {k: v for k, v in data.items() if k != "loras"}
    try:
        request = Request(loras=loras, **fields)
        for name in ("seed", "steps", "height", "width", "max_sequence_length"):
            setattr(request, name, int(getattr(request, name)))
        request.guidance = float(request.guidance)
    except (TypeError, ValueError) as err:
        raise AotpackError(f"{where}: {err}", "check the field types (numbers for seed/steps/height/...)") from err
    return request


def read_jobs(path: str | Path) -> list[Request]:
    path = Path(path)
    if not path.is_file():
        raise AotpackError(f"jobs file {path} does not exist", "pass a JSONL file: one request object per line")
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise AotpackError(f"{path}:{number}: not valid JSON ({err.msg})", "one JSON object per line") from err
        requests.append(request_from_json(data, f"{path}:{number}"))
    if not requests:
        raise AotpackError(f"jobs file {path} holds no requests", "add one JSON object per line")
    return requests


def _save_latents(path: str, latents: torch.Tensor) -> str:
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents.detach().to("cpu").contiguous()}, path)
    return path


def run_request(served, request: Request, index: int = 0) -> RequestResult:
    """Switch to the request's LoRA set, generate, write the image/latents; time both parts."""
    if served.pipeline.text_encoder_2 is None:
        raise AotpackError(
            "this model has no text encoders (random:* presets are for benchmarks), so prompts cannot be encoded",
            "pass a model with text encoders (a diffusers pipeline directory or Hub id), or call the Python API "
            "with prompt_embeds= and pooled_prompt_embeds=",
        )
    switch = served.set_loras(request.loras, fit=request.fit)
    started = time.perf_counter()
    common = dict(prompt=request.prompt, height=request.height, width=request.width,
                  num_inference_steps=request.steps, guidance_scale=request.guidance,
                  max_sequence_length=request.max_sequence_length)
    generator = torch.Generator("cpu").manual_seed(request.seed)
    latents_path = image_path = None
    if request.save_latents:
        # The latents are what FluxPipeline(..., output_type="latent").images returns; decoding
        # them gives exactly the image of the same call with output_type="pil".
        latents = served(**common, generator=generator, output_type="latent").images
        latents_path = _save_latents(request.save_latents, latents)
        if request.out:
            image = served.decode_latents(latents, request.height, request.width)
            image_path = _save_image(request.out, image)
    elif request.out:
        image_path = _save_image(request.out, served(**common, generator=generator).images[0])
    else:
        served(**common, generator=generator, output_type="latent")
    if served.device.type == "cuda":
        torch.cuda.synchronize()
    return RequestResult(index=index, seconds=time.perf_counter() - started, switch_seconds=switch.seconds,
                         adapters_parsed=switch.parsed, image_path=image_path, latents_path=latents_path,
                         notes=switch.notes)


def _save_image(path: str, image) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
