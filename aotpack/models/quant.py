"""Base-weight quantization, applied identically at build time and when the runtime binds weights."""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from ..errors import AotpackError, RecipeError

# The blocks hold ~99% of the linear FLOPs; embedders and the output projection stay in bf16.
FP8_MODULE_PATTERNS = ("transformer_blocks.*", "single_transformer_blocks.*")


def quantization_record(method: str, unquantized: tuple[str, ...] = ()) -> dict:
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
        # block linears the recipe keeps in the activation dtype (`unquantized_linears`); absent in older packages
        "unquantized_linears": list(unquantized),
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


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _quantized_linear_names(transformer: nn.Module, unquantized: tuple[str, ...] = ()) -> list[str]:
    """The block linears to quantize: all but those `unquantized` names (fnmatch patterns). A pattern that
    matches no block linear is refused: a typo would otherwise leave every linear quantized, silently."""
    blocks = [name for name, module in transformer.named_modules()
              if isinstance(module, nn.Linear) and _matches(name, FP8_MODULE_PATTERNS)]
    for pattern in unquantized:
        if not any(_matches(name, [pattern]) for name in blocks):
            example = f" (they are named like {blocks[0]!r})" if blocks else ""
            raise RecipeError(f"unquantized_linears pattern {pattern!r} matches no block linear of this "
                              f"model{example}", "fix or remove the pattern in the recipe's unquantized_linears")
    return [name for name in blocks if not _matches(name, unquantized)]


def place_and_quantize(transformer: nn.Module, method: str, device: str,
                       unquantized: tuple[str, ...] = ()) -> list[str]:
    """Move the transformer to `device`, quantizing its block linears (but `unquantized`, fnmatch patterns) on
    the way; returns their names.

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
    targets = set(_quantized_linear_names(transformer, unquantized))
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
