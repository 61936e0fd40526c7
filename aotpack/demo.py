"""Demo LoRA files for the embedded tiny model (random, deterministic, PEFT/diffusers format)."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import torch

DEMO_LORAS = {
    # name: (rank, alpha or None, layer patterns)
    "tiny-style-attn": (4, 8.0, ["transformer_blocks.*.attn.*", "single_transformer_blocks.*.attn.to_*"]),
    "tiny-style-mlp": (8, None, ["transformer_blocks.*.ff*", "single_transformer_blocks.*.proj_*"]),
    "tiny-style-all": (16, 16.0, ["*"]),
}


def random_lora_state_dict(transformer, rank: int, patterns, *, alpha: float | None = None, seed: int = 0,
                           std: float = 0.5) -> dict[str, torch.Tensor]:
    """A diffusers-format (`transformer.<layer>.lora_A.weight`) LoRA with random factors."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear) or not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        key = f"transformer.{name}"
        state[f"{key}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * (
            module.in_features**-0.5)
        state[f"{key}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * std * (
            rank**-0.5)
        if alpha is not None:
            state[f"{key}.alpha"] = torch.tensor(float(alpha))
    return state


def write_demo_loras(directory: str | Path) -> dict[str, Path]:
    """Write the demo LoRA files for the tiny model; returns {name: path}."""
    from safetensors.torch import save_file

    from .models.tiny import make_transformer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    transformer = make_transformer()
    paths = {}
    for seed, (name, (rank, alpha, patterns)) in enumerate(DEMO_LORAS.items()):
        path = directory / f"{name}.safetensors"
        save_file(random_lora_state_dict(transformer, rank, patterns, alpha=alpha, seed=seed + 1), str(path))
        paths[name] = path
    return paths


def run_demo(out: str | Path = "artifacts/demo", *, rebuild: bool = False):
    """Build the tiny package (unless present) and run requests that hot-swap the demo LoRAs.

    Yields one line per result for the CLI; PNGs and the jobs file land under `out`.
    """
    import json

    from .builder.build import build_package
    from .runtime.jobs import read_jobs, run_jobs
    from .runtime.pipeline import load_package
    from .runtime.requests import PackageLimits
    from .store.manifest import read_manifest

    out = Path(out)
    package = out / "tiny-cpu-package"
    if rebuild or not (package / "manifest.json").is_file():
        build_package("tiny", "cpu", out=package, overwrite=rebuild, progress=True)
    else:
        read_manifest(package)
        yield f"using the package built earlier: {package} (pass --rebuild to build again)"
    loras = write_demo_loras(out / "loras")
    jobs = [
        {"prompt": "a lighthouse at dusk", "loras": [], "out": "plain.png"},
        {"prompt": "a lighthouse at dusk", "loras": [[str(loras["tiny-style-attn"]), 1.0]], "out": "attn.png"},
        {"prompt": "a lighthouse at dusk", "loras": [[str(loras["tiny-style-mlp"]), 0.8]], "out": "mlp.png"},
        {"prompt": "a lighthouse at dusk", "loras": [[str(loras["tiny-style-attn"]), 1.0],
                                                     [str(loras["tiny-style-mlp"]), 0.8]], "out": "stacked.png"},
        {"prompt": "a lighthouse at dusk", "loras": [[str(loras["tiny-style-attn"]), 1.0]], "out": "attn-again.png"},
    ]
    jobs_file = out / "jobs.jsonl"
    common = {"seed": 42, "steps": 4, "height": 128, "width": 128, "max_sequence_length": 32}
    jobs_file.write_text("".join(json.dumps({**common, **job, "out": str(out / job["out"])}) + "\n"
                                 for job in jobs))
    requests = read_jobs(jobs_file, PackageLimits.from_manifest(read_manifest(package)))  # all checked first
    served = load_package(package, "tiny", progress=True)
    for outcome in run_jobs(served, requests):
        request, result = outcome.request, outcome.result
        names = ", ".join(f"{Path(p).stem}:{s:g}" for p, s in request.loras) or "no LoRA"
        if result is None:
            yield f"request {outcome.index} ({names}) failed: {outcome.error}"
            continue
        source = "parsed from file" if result.adapters_parsed else "from cache"
        yield (f"{result.image_path}: {names}; image in {result.seconds:.2f} s, LoRA switch "
               f"{result.switch_seconds * 1000:.1f} ms ({source})")
