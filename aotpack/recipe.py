"""Build recipes: one TOML file per target in `recipes/` (installed as `aotpack.recipes`)."""

from __future__ import annotations

import dataclasses
import tomllib
from importlib import resources
from pathlib import Path

from .errors import UnknownTargetError

QUANTIZATIONS = ("none", "fp8_rowwise")
ATTENTION_BACKENDS = ("sdpa", "cudnn", "flash", "fa3")
LAYOUTS = ("regional", "whole")
TEXT_ENCODER_POLICIES = ("full", "t5_nf4")


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    device: str  # "cpu" or "cuda"
    gpu_arch: str  # "sm_90", or "" on the cpu target
    dtype: str  # dtype of activations and non-quantized weights
    lora_dtype: str  # dtype of the LoRA slot tensors
    quantization: str
    attention: str
    max_rank: int
    slots: tuple[str, ...]  # fnmatch patterns over the transformer's nn.Linear names
    layout: str
    text_encoder_policy: str
    batch: tuple[int, int]
    image_tokens: tuple[int, int]
    text_tokens: tuple[int, int]
    example_batch: int
    example_image_tokens: int
    example_text_tokens: int
    tolerance: float
    inductor_configs: dict

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        for key in ("slots", "batch", "image_tokens", "text_tokens"):
            data[key] = list(data[key])
        return data


def _recipe_files() -> dict[str, Path]:
    folder = resources.files("aotpack.recipes")
    return {p.name[: -len(".toml")]: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml")}


def known_targets() -> list[str]:
    return sorted(_recipe_files())


def _check_choice(recipe_name: str, field: str, value, allowed) -> None:
    if value not in allowed:
        raise UnknownTargetError(
            f"recipe {recipe_name!r}: {field} = {value!r} is not one of {', '.join(allowed)}",
            f"edit recipes/{recipe_name}.toml",
        )


def parse_recipe(data: dict) -> Recipe:
    name = data["name"]
    shapes, example = data["shapes"], data["example"]
    recipe = Recipe(
        name=name,
        description=data.get("description", ""),
        device=data["device"],
        gpu_arch=data.get("gpu_arch", ""),
        dtype=data["dtype"],
        lora_dtype=data.get("lora_dtype", data["dtype"]),
        quantization=data.get("quantization", "none"),
        attention=data.get("attention", "sdpa"),
        max_rank=int(data["max_rank"]),
        slots=tuple(data.get("slots", ["*"])),
        layout=data.get("layout", "regional"),
        text_encoder_policy=data.get("text_encoder_policy", "full"),
        batch=tuple(shapes["batch"]),
        image_tokens=tuple(shapes["image_tokens"]),
        text_tokens=tuple(shapes["text_tokens"]),
        example_batch=int(example["batch"]),
        example_image_tokens=int(example["image_tokens"]),
        example_text_tokens=int(example["text_tokens"]),
        tolerance=float(data["validation"]["tolerance"]),
        inductor_configs=dict(data.get("inductor", {})),
    )
    _check_choice(name, "device", recipe.device, ("cpu", "cuda"))
    _check_choice(name, "quantization", recipe.quantization, QUANTIZATIONS)
    _check_choice(name, "attention", recipe.attention, ATTENTION_BACKENDS)
    _check_choice(name, "layout", recipe.layout, LAYOUTS)
    _check_choice(name, "text_encoder_policy", recipe.text_encoder_policy, TEXT_ENCODER_POLICIES)
    for field in ("batch", "image_tokens", "text_tokens"):
        low, high = getattr(recipe, field)
        example_value = getattr(recipe, f"example_{field}")
        if not (1 <= low <= example_value <= high):
            raise UnknownTargetError(
                f"recipe {name!r}: example {field} {example_value} is outside the range [{low}, {high}]",
                f"edit recipes/{name}.toml so that min <= example <= max",
            )
    return recipe


def load_recipe(target: str | Path) -> Recipe:
    """A recipe by target name (`h100`) or by path to a TOML file."""
    path = Path(target)
    if path.suffix == ".toml" and path.is_file():
        return parse_recipe(tomllib.loads(path.read_text()))
    files = _recipe_files()
    if str(target) not in files:
        raise UnknownTargetError(
            f"unknown target {str(target)!r}",
            f"use one of: {', '.join(known_targets())} (or a path to a recipe .toml file)",
        )
    return parse_recipe(tomllib.loads(files[str(target)].read_text()))
