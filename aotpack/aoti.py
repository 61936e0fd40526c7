"""torch.export + AOTInductor for one region, and loading a compiled program back."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.export import Dim
from torch.utils import _pytree as pytree

from .errors import ExportError
from .regions import BLOCK_KINDS, Region

# Weights never go into the package: the runtime binds them from the checkpoint.
BASE_INDUCTOR_CONFIGS = {"aot_inductor.package_constants_in_so": False}

SYMBOLIC_DIMS = ("batch", "image_tokens", "text_tokens")


def _dims(shapes: dict) -> dict[str, Dim | None]:
    """A named Dim per symbolic axis; a range of one value stays static (None)."""
    return {name: Dim(name, min=int(shapes[name][0]), max=int(shapes[name][1]))
            if shapes[name][0] != shapes[name][1] else None for name in SYMBOLIC_DIMS}


def input_layouts(region: Region) -> dict[str, tuple]:
    """Each activation input's shape in symbols: names for dynamic dims, ints for static ones."""
    if region.kind in BLOCK_KINDS:
        return {
            "hidden_states": ("batch", "image_tokens", None),
            "encoder_hidden_states": ("batch", "text_tokens", None),
            "temb": ("batch", None),
            "rotary_cos": ("rotary_tokens", None),
            "rotary_sin": ("rotary_tokens", None),
        }
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
        with torch.no_grad():
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


def compile_program(exported, package_path: Path, inductor_configs: dict) -> float:
    """AOTInductor-compile `exported` into `package_path`; returns seconds taken."""
    started = time.perf_counter()
    configs = {**inductor_configs, **BASE_INDUCTOR_CONFIGS}
    try:
        torch._inductor.aoti_compile_and_package(exported, package_path=str(package_path), inductor_configs=configs)
    except Exception as err:
        raise ExportError(
            f"AOTInductor failed to compile {package_path.name}: {type(err).__name__}: {str(err)[:2000]}",
            "run `aotpack doctor` to check the compiler; AOTPACK_DEBUG=1 shows the traceback",
        ) from err
    return time.perf_counter() - started


class CompiledProgram:
    """A loaded `.pt2` with its weights bound, called with a flat list of tensors (no pytree per call)."""

    def __init__(self, package_path: Path, device: str):
        index = torch.device(device).index
        self.model = torch._inductor.aoti_load_package(str(package_path), device_index=-1 if index is None else index)
        in_spec = pytree.treespec_loads(self.model.loader.get_call_spec()[0])
        out_spec = pytree.treespec_loads(self.model.loader.get_call_spec()[1])
        self._out_spec = out_spec
        # Number every leaf, rebuild the input structure, and read back which position is which.
        (positional, _kwargs) = pytree.tree_unflatten(list(range(in_spec.num_leaves)), in_spec)
        *activation_positions, lora_positions = positional
        self.num_activations = sum(p is not None for p in activation_positions)
        self.lora_order = list(lora_positions.keys())
        self.num_inputs = in_spec.num_leaves

    def constant_names(self) -> list[str]:
        return list(self.model.get_constant_fqns())

    def bind_constants(self, constants: dict[str, torch.Tensor]) -> None:
        # user_managed: the program reads our tensors in place; no second copy of the weights.
        self.model.load_constants(constants, check_full_update=True, user_managed=True)

    def __call__(self, flat_inputs: list[torch.Tensor]):
        outputs = self.model.loader.boxed_run(flat_inputs)
        return pytree.tree_unflatten(outputs, self._out_spec)
