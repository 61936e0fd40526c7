"""Base-weight quantization, applied identically at build time and when the runtime binds weights."""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from ..errors import AotpackError

# The blocks hold ~99% of the linear FLOPs; embedders and the output projection stay in bf16.
FP8_MODULE_PATTERNS = ("transformer_blocks.*", "single_transformer_blocks.*")


def quantization_record(method: str) -> dict:
    """What the manifest records, enough for the runtime to quantize a checkpoint the same way."""
    if method == "none":
        return {"method": "none"}
    import torchao
    from torchao.core.config import config_to_dict

    return {
        "method": method,
        "library": "torchao",
        "torchao_version": torchao.__version__,
        # torchao's own serialisation: `torchao.core.config.config_from_dict` rebuilds the config
        "config": config_to_dict(_fp8_config()),
        "modules": list(FP8_MODULE_PATTERNS),
        "lora_path": "unquantized",
    }


def _fp8_config():
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
        )
    except ImportError as err:
        raise AotpackError(
            "FP8 quantization needs torchao, which is not importable here",
            "pip install 'aotpack[fp8]' (torchao>=0.18)",
        ) from err
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def _quantized_linear_names(transformer: nn.Module) -> list[str]:
    return [
        name
        for name, module in transformer.named_modules()
        if isinstance(module, nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in FP8_MODULE_PATTERNS)
    ]


def place_and_quantize(transformer: nn.Module, method: str, device: str) -> list[str]:
    """Move the transformer to `device`, quantizing its block linears on the way; returns their names.

    Block by block, so that at most one block's bf16 weights sit on the GPU beside the FP8 ones:
    peak memory while loading stays near the size of the quantized model, not twice the bf16 one.
    """
    if method == "none":
        transformer.to(device)
        return []
    if method != "fp8_rowwise":
        raise AotpackError(f"unknown quantization {method!r}", "use 'none' or 'fp8_rowwise'")
    from torchao.quantization import quantize_

    config = _fp8_config()
    targets = set(_quantized_linear_names(transformer))
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    for name, child in transformer.named_children():
        if name not in ("transformer_blocks", "single_transformer_blocks"):
            child.to(device)
    prefixes = [f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))]
    prefixes += [f"single_transformer_blocks.{i}" for i in range(len(transformer.single_transformer_blocks))]
    for prefix, block in zip(prefixes, blocks):
        block.to(device)
        quantize_(block, config, filter_fn=lambda m, fqn, p=prefix: isinstance(m, nn.Linear) and f"{p}.{fqn}" in targets)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return sorted(targets)
