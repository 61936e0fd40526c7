"""Serve a built package with random real-size weights: load, switch LoRAs, generate, time everything.

    python -m aotpack.bench.serve_demo --package DIR --model random:flux-dev --out OUT

Writes OUT/serve_demo.json and OUT/serve_demo.png (a strip of the generated images). Prompts are
random tokenizer-free embeddings (the random preset has no text encoders).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..models.checkpoint import load_transformer_config, parse_model_ref
from ..models.examples import transformer_inputs
from ..models.prepare import torch_dtype
from ..models.random_weights import random_prompt_embeds
from ..runtime.pipeline import load_package
from .checks import package_and_output
from .loras import meta_transformer, write_bench_loras
from .timing import Stopwatch, peak_memory_gb, reset_peak_memory, time_ms


def bf16_weight_gb(config: dict) -> float:
    return sum(p.numel() for p in meta_transformer(config).parameters()) * 2 / 2**30


def image_strip(images, size: int = 256):
    from PIL import Image

    strip = Image.new("RGB", (size * len(images), size))
    for i, image in enumerate(images):
        strip.paste(image.resize((size, size)), (i * size, 0))
    return strip


def run(package: str, model: str, out: Path, *, height: int, width: int, steps: int, text_tokens: int,
        lora_dir: Path, keep: bool = False):
    """Results dict (and the loaded pipeline too, as a pair, when `keep`)."""
    out.mkdir(parents=True, exist_ok=True)
    config = load_transformer_config(parse_model_ref(model))
    results: dict = {"package": str(package), "model": model, "height": height, "width": width, "steps": steps,
                     "text_tokens": text_tokens, "weights": "random"}
    started = time.perf_counter()
    reset_peak_memory("cuda" if torch.cuda.is_available() else "cpu")
    served = load_package(package, model, progress=True)
    device = served.device
    results["load_seconds"] = time.perf_counter() - started
    results["load_peak_gpu_gb"] = peak_memory_gb(device)
    results["bf16_weights_gb"] = bf16_weight_gb(config)
    results["resident_gpu_gb_after_load"] = (torch.cuda.memory_allocated(device) / 2**30
                                             if device.type == "cuda" else None)
    results["manifest"] = {"target": served.manifest.target, "max_rank": served.manifest.max_rank,
                           "build": served.manifest.build, "validation": served.manifest.validation,
                           "package_mb": served.manifest.total_bytes(served.package_dir) / 1e6}
    loras = write_bench_loras(config, lora_dir, names=["r16-attn", "r64-all"])
    dtype = torch_dtype(served.manifest.dtype)
    embeds, pooled = random_prompt_embeds(config, 1, text_tokens, dtype, device)
    image_tokens = (height // 16) * (width // 16)
    generator = torch.Generator().manual_seed(0)
    inputs = transformer_inputs(served.transformer.config, batch=1, image_tokens=image_tokens,
                                text_tokens=text_tokens, dtype=dtype, device=device, generator=generator)
    first = served.set_loras([(loras["r64-all"], 1.0)], merge=False)  # the step below times the slots
    results["switch_r64_all_from_file_ms"] = first.seconds * 1000
    with torch.no_grad():
        results["step"] = time_ms(lambda: served.transformer(**inputs, return_dict=False), device, warmup=3,
                                  repeats=10)
    sets = [("none", []), ("r16-attn", [(loras["r16-attn"], 1.0)]), ("r64-all", [(loras["r64-all"], 0.8)]),
            ("r16-attn+r64-all", [(loras["r16-attn"], 1.0), (loras["r64-all"], 0.5)]),
            ("r16-attn again", [(loras["r16-attn"], 1.0)])]
    results["requests"], images = [], []
    for label, loras_set in sets:
        switch = served.set_loras(loras_set, fit="svd")  # r16 + r64 stack to rank 80 > 64
        with Stopwatch(device) as watch, torch.no_grad():
            image = served(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=height, width=width,
                           num_inference_steps=steps, guidance_scale=3.5,
                           generator=torch.Generator("cpu").manual_seed(42)).images[0]
        images.append(image)
        results["requests"].append({"loras": label, "switch_ms": switch.seconds * 1000,
                                    "adapters_read_from_file": switch.parsed, "image_seconds": watch.seconds})
        print(f"{label:18s} switch {switch.seconds * 1000:8.1f} ms ({switch.parsed} from file)  "
              f"image {watch.seconds:6.2f} s", flush=True)
    results["peak_gpu_gb"] = peak_memory_gb(device)
    image_strip(images).save(out / "serve_demo.png")
    (out / "serve_demo.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"load {results['load_seconds']:.1f} s (peak {results['load_peak_gpu_gb']} GB vs bf16 weights "
          f"{results['bf16_weights_gb']:.1f} GB); step {results['step']['median_ms']:.1f} ms median", flush=True)
    return (results, served) if keep else results


def workload_parser(doc: str) -> argparse.ArgumentParser:
    """The options every serving benchmark takes: package, model, output folder and the request."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", required=True)
    parser.add_argument("--model", default="random:flux-dev")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--lora-dir", type=Path, default=Path("/tmp/aotpack-bench-loras"))
    return parser


def workload_kwargs(args) -> dict:
    return dict(height=args.height, width=args.width, steps=args.steps, text_tokens=args.text_tokens,
                lora_dir=args.lora_dir)


def main(argv=None) -> None:
    args = workload_parser(__doc__).parse_args(argv)
    package_and_output(args)
    run(args.package, args.model, args.out, **workload_kwargs(args))


if __name__ == "__main__":
    main()
