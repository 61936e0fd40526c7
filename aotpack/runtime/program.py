"""Loading compiled programs: one `.pt2` unpacked once, instantiated once per block it serves.

`torch._inductor.aoti_load_package` unpacks the archive into a fresh temporary folder and opens
its shared object on every call, so the 38 single-block instances of a Flux package were 38
copies of one `.so` (37 s of a 39.5 s load on the H200). Here a program is unpacked once and
every instance is a model-container runner over the same shared object (each runner keeps its
own constants and, on CUDA, its own kernel handles), with the weights bound user-managed.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path, PurePosixPath

import torch
from torch.utils import _pytree as pytree

from ..errors import PackageIntegrityError, PackageMismatchError
from .process_folders import ProcessFolder


def _unpack(package_path: Path, into: Path) -> Path:
    """Extract the archive (refusing paths that escape `into`) and return its one shared object."""
    try:
        archive = zipfile.ZipFile(package_path)
    except zipfile.BadZipFile as err:
        raise PackageIntegrityError(f"program {package_path} is not a .pt2 archive (not a zip file: {err})",
                                    "pull or build the package again") from err
    except FileNotFoundError as err:
        raise PackageIntegrityError(f"program {package_path} is missing", "pull or build the package again") from err
    with archive:
        for member in archive.namelist():
            parts = PurePosixPath(member).parts
            if PurePosixPath(member).is_absolute() or ".." in parts:
                raise PackageMismatchError(f"{package_path.name} holds an entry outside the package: {member!r}",
                                           "rebuild or re-pull the package; do not load archives from unknown sources")
        archive.extractall(into)
    shared_objects = sorted(into.rglob("*.so"))
    if len(shared_objects) != 1:
        raise PackageMismatchError(
            f"{package_path.name} holds {len(shared_objects)} shared objects, expected 1",
            "rebuild the package with `aotpack build` (it writes one compiled program per .pt2)",
        )
    return shared_objects[0]


def _compiled_device(shared_object: Path) -> str:
    """The device a program was compiled for, from AOTInductor's metadata next to its `.so`."""
    for metadata in shared_object.parent.glob("*_metadata.json"):
        device = json.loads(metadata.read_text()).get("AOTI_DEVICE_KEY")
        if device:
            return device
    return "cpu"


class ProgramFile:
    """One unpacked `.pt2`; `instantiate()` opens a new runner over its shared object.

    The folder lives as long as this object: CUDA runners load their kernels from it lazily. A killed process
    leaves it behind; the next load removes it (process_folders.py).
    """

    def __init__(self, package_path: Path):
        self.path = Path(package_path)
        self._folder = ProcessFolder("programs", self.path.stem)
        self.shared_object = _unpack(self.path, self._folder.path)
        self.compiled_for = _compiled_device(self.shared_object)

    def instantiate(self, device: str) -> "CompiledProgram":
        target = torch.device(device)
        compiled_for = self.compiled_for
        if compiled_for != target.type:
            raise PackageMismatchError(f"{self.path.name} was compiled for {compiled_for}, not {target.type}",
                                       f"load it on a {compiled_for} device, or build for this one")
        if target.type == "cuda":
            index = target.index if target.index is not None else torch.cuda.current_device()
            # Single-threaded: no CUDA event recorded and queried around each run. The runtime calls a
            # runner from one thread at a time, and an event query inside a capture voids CUDA graphs.
            runner = torch._C._aoti.AOTIModelContainerRunnerCuda(
                str(self.shared_object), 1, f"cuda:{index}", str(self.shared_object.parent), True)
        else:
            runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(self.shared_object), 1)
        return CompiledProgram(self, runner)


class CompiledProgram:
    """A runner with its weights bound, called with a flat list of tensors (no pytree per call)."""

    def __init__(self, source: ProgramFile, runner):
        self._source = source  # keeps the unpacked folder (CUDA kernels load from it on first call)
        self.runner = runner
        self.bound: tuple[torch.Tensor, ...] = ()  # the constants `bind_constants` bound
        in_spec, out_spec = (pytree.treespec_loads(s) for s in runner.get_call_spec())
        self._out_spec = out_spec
        # Number every leaf, rebuild the input structure, and read back which position is which.
        (positional, _kwargs) = pytree.tree_unflatten(list(range(in_spec.num_leaves)), in_spec)
        *_activation_positions, lora_positions = positional
        self.lora_order = list(lora_positions.keys())
        self._fqn_to_internal = {fqn: name for name, fqn in runner.get_constant_names_to_original_fqns().items()}

    def constant_names(self) -> list[str]:
        return list(self._fqn_to_internal)

    def bind_constants(self, constants: dict[str, torch.Tensor]) -> None:
        # user_managed: the program reads our tensors in place; no second copy of the weights.
        internal = {self._fqn_to_internal[name]: tensor for name, tensor in constants.items()}
        self.runner.update_constant_buffer(internal, False, True, True)
        # AOTInductor keeps a reference to each user-managed constant that it never releases, runner gone or not
        # (pytorch/pytorch#194480): `CompiledFluxTransformer.close` frees these tensors' memory itself
        self.bound = tuple(constants.values())

    def __call__(self, flat_inputs: list[torch.Tensor]):
        return pytree.tree_unflatten(self.runner.run(flat_inputs), self._out_spec)


def open_program(package_path: Path) -> ProgramFile:
    """The single entry point that opens compiled code (tests patch it to prove guards come first)."""
    return ProgramFile(package_path)
