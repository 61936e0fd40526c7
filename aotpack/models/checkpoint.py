"""Where a Flux model comes from: the embedded tiny model, a diffusers directory, or a Hub id.

A model reference is `tiny`, a local directory (a full pipeline with `model_index.json` and a
`transformer/` folder, or a bare transformer folder with `config.json`), or `owner/name` on the Hub
(optionally `owner/name@revision`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from ..errors import ModelSourceError
from . import random_weights as random_models
from . import tiny

# Config keys that say where/how a checkpoint was saved, not what the network computes.
_NON_STRUCTURAL_KEYS = {"_name_or_path", "_diffusers_version", "_class_name", "_use_default_values"}


@dataclasses.dataclass(frozen=True)
class ModelRef:
    kind: str  # "tiny" | "random" | "dir" | "hub"
    location: str  # "tiny", a random preset name, an absolute path, or a Hub repo id
    revision: str | None = None

    @property
    def model_id(self) -> str:
        if self.kind == "random":
            return f"random:{self.location}"
        return tiny.TINY_MODEL_ID if self.kind == "tiny" else self.location

    def describe(self) -> str:
        return self.location + (f"@{self.revision}" if self.revision else "")


def parse_model_ref(reference: str, revision: str | None = None) -> ModelRef:
    if reference == "tiny":
        return ModelRef("tiny", "tiny", tiny.TINY_REVISION)
    if reference.startswith("random:"):
        name = reference.split(":", 1)[1]
        random_models.preset_config(name)  # validates the name
        return ModelRef("random", name, "seeded")
    path = Path(reference).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelSourceError(
                f"model {reference!r} is a file, not a diffusers-format directory",
                "pass the pipeline directory (with model_index.json) or its transformer/ folder",
            )
        return ModelRef("dir", str(path.resolve()), None)
    if "@" in reference and revision is None:
        reference, revision = reference.split("@", 1)
    if reference.count("/") != 1 or reference.startswith((".", "/")):
        raise ModelSourceError(
            f"model {reference!r} is neither 'tiny', an existing directory, nor a Hub id 'owner/name'",
            "check the path, or pass a Hub id such as black-forest-labs/FLUX.1-dev",
        )
    return ModelRef("hub", reference, revision)


def _transformer_location(ref: ModelRef) -> tuple[str, str | None]:
    """(path or repo id, subfolder) of the transformer weights."""
    if ref.kind == "dir":
        root = Path(ref.location)
        if (root / "transformer" / "config.json").is_file():
            return str(root), "transformer"
        if (root / "config.json").is_file():
            return str(root), None
        raise ModelSourceError(
            f"directory {root} holds neither transformer/config.json nor config.json",
            "pass a diffusers-format Flux pipeline directory or its transformer/ folder",
        )
    return ref.location, "transformer"


def _complete_config(config: dict) -> dict:
    """The config as the model object sees it (defaults filled in), built on the meta device: no memory."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return dict(FluxTransformer2DModel.from_config(config).config)


def load_transformer_config(ref: ModelRef) -> dict:
    """The transformer's full config, without loading weights."""
    if ref.kind == "tiny":
        return _complete_config(tiny.TRANSFORMER_CONFIG)
    if ref.kind == "random":
        return _complete_config(random_models.preset_config(ref.location))
    location, subfolder = _transformer_location(ref)
    from diffusers import FluxTransformer2DModel

    try:
        raw = FluxTransformer2DModel.load_config(location, subfolder=subfolder, revision=ref.revision)
    except OSError as err:
        raise ModelSourceError(
            f"cannot read the transformer config of {ref.describe()!r}: {err}",
            "check the model id/revision, your HF_TOKEN for gated models, or HF_HUB_OFFLINE",
        ) from err
    return _complete_config(dict(raw))


def config_fingerprint(config: dict) -> str:
    """sha256 of the structural transformer config: what a compiled program depends on."""
    structural = {k: v for k, v in config.items() if k not in _NON_STRUCTURAL_KEYS}
    canonical = json.dumps(structural, sort_keys=True, default=list)
    return hashlib.sha256(canonical.encode()).hexdigest()


def structural_config(config: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if k not in _NON_STRUCTURAL_KEYS}


def load_transformer(ref: ModelRef, dtype: torch.dtype, device: str = "cpu"):
    """The eager `FluxTransformer2DModel` in `dtype`, in eval mode (on the CPU unless a random preset,
    whose weights are drawn directly on `device`)."""
    if ref.kind == "tiny":
        return tiny.make_transformer(dtype)
    if ref.kind == "random":
        return random_models.make_transformer(ref.location, dtype, device)
    from diffusers import FluxTransformer2DModel

    location, subfolder = _transformer_location(ref)
    try:
        model = FluxTransformer2DModel.from_pretrained(
            location, subfolder=subfolder, revision=ref.revision, torch_dtype=dtype
        )
    except (OSError, ValueError) as err:
        raise ModelSourceError(
            f"cannot load the Flux transformer from {ref.describe()!r}: {err}",
            "pass a diffusers-format Flux pipeline directory, its transformer/ folder, or a Hub id",
        ) from err
    return model.eval()


def _nf4_t5(ref: ModelRef, dtype: torch.dtype):
    """T5 in 4-bit NF4 (bitsandbytes), as the published 24 GB recipe loads it next to an FP8 transformer."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ModelSourceError(
            "this package's recipe loads the T5 text encoder in 4-bit NF4 (24 GB policy), which needs bitsandbytes",
            "pip install bitsandbytes on the serving machine (CUDA), or use a package built with a recipe whose "
            "text_encoder_policy is 'full'",
        ) from err
    from transformers import BitsAndBytesConfig, T5EncoderModel

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return T5EncoderModel.from_pretrained(ref.location, subfolder="text_encoder_2", revision=ref.revision,
                                          quantization_config=config, torch_dtype=dtype)


def load_pipeline(ref: ModelRef, dtype: torch.dtype, transformer=None, text_encoder_policy: str = "full"):
    """The diffusers `FluxPipeline` for `ref`; `transformer` replaces the eager one if given.

    `text_encoder_policy` "t5_nf4" loads T5 in 4 bits (checkpoints with text encoders only).
    """
    from diffusers import FluxPipeline

    if ref.kind == "tiny":
        return tiny.make_pipeline(dtype, transformer=transformer)
    if ref.kind == "random":
        return random_models.make_pipeline(ref.location, dtype, transformer)
    if ref.kind == "dir" and not (Path(ref.location) / "model_index.json").is_file():
        raise ModelSourceError(
            f"{ref.location} has no model_index.json, so it has no text encoders, VAE or scheduler",
            "pass the full diffusers pipeline directory to `aotpack run --model`",
        )
    # diffusers type-checks components passed to from_pretrained (ModelMixin only), so the compiled
    # transformer is attached after loading; `transformer=None` skips reading the eager weights again.
    kwargs = {"transformer": None} if transformer is not None else {}
    if text_encoder_policy == "t5_nf4":
        kwargs["text_encoder_2"] = _nf4_t5(ref, dtype)
    try:
        pipe = FluxPipeline.from_pretrained(ref.location, revision=ref.revision, torch_dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelSourceError(
            f"cannot load the Flux pipeline from {ref.describe()!r}: {err}",
            "pass a diffusers-format Flux pipeline directory or a Hub id",
        ) from err
    if transformer is not None:
        pipe.transformer = transformer
    pipe.set_progress_bar_config(disable=True)
    return pipe
