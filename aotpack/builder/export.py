"""torch.export of one region with named inputs and dynamic dimensions."""

from __future__ import annotations

import warnings

import torch
from torch.export import Dim

from ..errors import ExportError
from ..models.modulation import MAX_STEPS, MODULATION
from ..models.regions import BLOCK_KINDS, JOINT_INPUT, Region

SYMBOLIC_DIMS = ("batch", "image_tokens", "text_tokens")


def _dims(shapes: dict) -> dict[str, Dim | None]:
    """A named Dim per symbolic axis; a range of one value stays static (None). `joint_tokens`
    (text + image, the single blocks' one token axis) is its own symbol over the summed range."""
    ranges = {name: (int(shapes[name][0]), int(shapes[name][1])) for name in SYMBOLIC_DIMS}
    ranges["joint_tokens"] = tuple(ranges["text_tokens"][i] + ranges["image_tokens"][i] for i in (0, 1))
    ranges["steps"] = (1, MAX_STEPS)  # the modulation program's rows per call (models/modulation.py)
    return {name: Dim(name, min=low, max=high) if low != high else None for name, (low, high) in ranges.items()}


def input_layouts(region: Region) -> dict[str, tuple]:
    """Each activation input's shape in symbols: names for dynamic dims, ints for static ones."""
    if getattr(region, "input_layouts", None):  # regions that declare their own (split_regions.py)
        return dict(region.input_layouts)
    if JOINT_INPUT in region.activation_names:  # single blocks (regions.JointSingleBlockRegion)
        return {
            JOINT_INPUT: ("batch", "joint_tokens", None),
            "temb": ("batch", None),
            "modulation": ("batch", None),
            "rotary_cos": ("joint_tokens", None),
            "rotary_sin": ("joint_tokens", None),
        }
    if region.kind in BLOCK_KINDS:
        return {
            "hidden_states": ("batch", "image_tokens", None),
            "encoder_hidden_states": ("batch", "text_tokens", None),
            "temb": ("batch", None),
            "modulation": ("batch", None),
            "rotary_cos": ("rotary_tokens", None),
            "rotary_sin": ("rotary_tokens", None),
        }
    if region.kind == MODULATION:
        return {"pooled_projections": ("steps", "batch", None), "timestep": ("steps", "batch"),
                "guidance": ("steps", "batch")}
    if region.kind == "epilogue":
        return {"hidden_states": ("batch", "image_tokens", None), "temb": ("batch", None)}
    return {  # prologue / whole
        "hidden_states": ("batch", "image_tokens", None),
        "encoder_hidden_states": ("batch", "text_tokens", None),
        "pooled_projections": ("batch", None),
        "timestep": ("batch",),
        "img_ids": ("image_tokens", None),
        "txt_ids": ("text_tokens", None),
        "guidance": ("batch",),
    }


def dynamic_shapes(region: Region, activations: tuple, shapes: dict) -> tuple:
    """The `dynamic_shapes` spec for `torch.export`, positionally matching the region's inputs."""
    dims = _dims(shapes)
    layouts = input_layouts(region)
    spec = []
    for name, value in zip(region.activation_names, activations):
        if value is None:
            spec.append(None)
            continue
        axes = {}
        for axis, symbol in enumerate(layouts[name]):
            if symbol == "rotary_tokens":
                axes[axis] = Dim.AUTO  # text + image tokens: derived by export from the concatenation
            elif symbol is not None and dims[symbol] is not None:
                axes[axis] = dims[symbol]
        spec.append(axes)
    spec.append({name: None for name in region.lora_names()})
    return tuple(spec)


def describe_inputs(region: Region, activations: tuple) -> list[dict]:
    """The program's activation inputs for the manifest: name, dtype and symbolic shape."""
    layouts = input_layouts(region)
    described = []
    for name, tensor in zip(region.activation_names, activations):
        if tensor is None:
            continue
        shape = [symbol if symbol is not None else int(size) for symbol, size in zip(layouts[name], tensor.shape)]
        described.append({"name": name, "dtype": str(tensor.dtype).removeprefix("torch."), "shape": shape})
    return described


def export_region(region: Region, activations: tuple, lora: dict, shapes: dict):
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The region binds each slot's A/B program inputs to module attributes while it traces;
            # export warns they are not buffers, which is the point (they are inputs, not state).
            warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
            return torch.export.export(
                region, (*activations, lora), dynamic_shapes=dynamic_shapes(region, activations, shapes), strict=False
            )
    except Exception as err:  # export errors are long; keep the gist and the cause chain
        raise ExportError(
            f"torch.export failed on the {region.kind} region: {type(err).__name__}: {str(err)[:2000]}",
            "run with AOTPACK_DEBUG=1 for the traceback; check the recipe's shape ranges",
        ) from err
    finally:
        region.bind_lora(None)
