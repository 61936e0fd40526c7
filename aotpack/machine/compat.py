"""What this machine is: device, GPU arch, library versions; and the guards built on them."""

from __future__ import annotations

import platform

import torch

from .. import __version__
from ..errors import PackageMismatchError
from ..recipes.recipe import known_targets, load_recipe


def gpu_arch(device_index: int = 0) -> str | None:
    """`sm_90` for an H100/H200, None without a CUDA GPU."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"sm_{major}{minor}"


def gpu_name(device_index: int = 0) -> str | None:
    return torch.cuda.get_device_name(device_index) if torch.cuda.is_available() else None


def cuda_driver_version() -> str | None:
    """The CUDA version the installed NVIDIA driver supports (`13.0`); None without a driver."""
    import ctypes

    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int()
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def versions() -> dict:
    import diffusers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "aotpack": __version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }


def torch_series(version: str) -> str:
    """`2.11` from `2.11.0+cu130`: AOTInductor packages are tied to the torch minor series."""
    return ".".join(version.split("+")[0].split(".")[:2])


def targets_for_arch(arch: str | None) -> list[str]:
    if arch is None:
        return ["cpu"]
    return [name for name in known_targets() if load_recipe(name).gpu_arch == arch]


def auto_target() -> str:
    """The recipe for this machine's GPU (`cpu` without one); preferred name first when several match."""
    arch = gpu_arch()
    candidates = targets_for_arch(arch)
    if not candidates:
        raise PackageMismatchError(
            f"no recipe targets this GPU ({gpu_name()}, {arch})",
            f"pass --target explicitly; known targets: {', '.join(known_targets())}",
        )
    name = (gpu_name() or "").lower()
    for candidate in candidates:
        if candidate in name.replace(" ", ""):
            return candidate
    return candidates[0]


def _suggest(arch: str | None) -> str:
    names = targets_for_arch(arch)
    return f"build or pull --target {' / '.join(names)}" if names else "build a package on this machine"


def check_can_build(target: str, device: str, required_arch: str) -> None:
    """Refuse to build a GPU target on a machine that cannot compile kernels for it."""
    if device == "cpu":
        return
    arch = gpu_arch()
    if arch is None:
        raise PackageMismatchError(
            f"target {target!r} compiles CUDA kernels for {required_arch}, but no CUDA GPU is visible",
            "build GPU targets on a machine with that GPU (CI runs one runner per target), or use --target cpu",
        )
    if arch != required_arch:
        raise PackageMismatchError(
            f"target {target!r} is for {required_arch}; this GPU ({gpu_name()}) is {arch}",
            _suggest(arch),
        )


def check_package_runs_here(manifest, fingerprint: str | None) -> None:
    """Refuse, before any shared object is loaded, a package this machine/model cannot run."""
    here = torch_series(torch.__version__)
    built = torch_series(manifest.versions["torch"])
    if here != built:
        raise PackageMismatchError(
            f"package {manifest.target!r} was built with torch {manifest.versions['torch']}; this is torch "
            f"{torch.__version__} (AOTInductor packages are tied to the torch {built}.x series)",
            f"install torch=={built}.* or rebuild/pull a package built with torch {here}",
        )
    if manifest.device == "cuda":
        arch = gpu_arch()
        if arch is None:
            raise PackageMismatchError(
                f"package {manifest.target!r} is for a CUDA GPU ({manifest.gpu_arch}); none is visible here",
                "run it on that GPU, or build or pull --target cpu",
            )
        if arch != manifest.gpu_arch:
            raise PackageMismatchError(
                f"package built for {manifest.gpu_arch} ({manifest.target}); this GPU is {arch}",
                _suggest(arch),
            )
    if fingerprint is not None and fingerprint != manifest.fingerprint:
        raise PackageMismatchError(
            f"package was built for model {manifest.model['id']!r} (config fingerprint "
            f"{manifest.fingerprint[:12]}); the model given has fingerprint {fingerprint[:12]}",
            "pass the model the package was built from (see `aotpack inspect`), or build a package for this one",
        )
