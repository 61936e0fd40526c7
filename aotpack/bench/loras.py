"""Benchmark LoRA files: random factors, realistic ranks and target sets, bf16 like published LoRAs."""

from __future__ import annotations

from pathlib import Path

import torch

# name: (rank, alpha, target patterns); no alpha keys (alpha = rank), which PEFT hotswap also accepts. Different target sets on purpose: PEFT hotswap needs the
# later adapters to target a subset of the first; LoRA slots do not care.
BENCH_LORAS = {
    "r16-attn": (16, None, ["transformer_blocks.*.attn.*", "single_transformer_blocks.*.attn.to_*"]),
    "r64-all": (64, None, ["transformer_blocks.*", "single_transformer_blocks.*"]),
    "r128-mlp": (128, None, ["transformer_blocks.*.ff*", "single_transformer_blocks.*.proj_*"]),
}


def meta_transformer(config: dict):
    """The transformer's module tree on the meta device (names and shapes, no memory)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(config)


def write_bench_loras(config: dict, directory: str | Path, names=None, std: float = 0.02) -> dict[str, Path]:
    """The named benchmark LoRAs for the model with `config`, written once and reused.

    Files live in a subfolder named by the config's fingerprint: LoRAs written for one model (a
    FLUX.1-dev at 57 blocks) are never picked up for another (the same widths at 6 blocks).
    """
    from safetensors.torch import save_file

    from ..demo import random_lora_state_dict
    from ..models.checkpoint import config_fingerprint, structural_config

    directory = Path(directory) / config_fingerprint(structural_config(dict(config)))[:16]
    if std != 0.02:  # files of another strength never stand in for the default ones
        directory = directory / f"std-{std:g}"
    directory.mkdir(parents=True, exist_ok=True)
    model = meta_transformer(config)
    paths = {}
    for seed, (name, (rank, alpha, patterns)) in enumerate(BENCH_LORAS.items()):
        if names and name not in names:
            continue
        path = directory / f"{name}.safetensors"
        if not path.exists():
            state = random_lora_state_dict(model, rank, patterns, alpha=alpha, seed=seed + 11, std=std)
            save_file({k: v.to(torch.bfloat16) if v.ndim else v for k, v in state.items()}, str(path))
        paths[name] = path
    return paths
