"""`aotpack doctor`: can this machine build (and serve) packages? Each check says what to fix.

The checks that matter most are the C++ toolchain ones: a compiler that links libstdc++
statically builds packages that compile fine and then segfault inside `aoti_load_package`, so
`aotpack build` calls `require_working_toolchain()` before it spends minutes compiling.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
from pathlib import Path

import torch

from ..errors import PackageMismatchError, ToolchainError
from ..models.attention import check_attention_runs_here
from ..recipes.recipe import Recipe, known_targets, load_recipe
from ..store.package_ref import DEFAULT_OUT
from . import (
    compat as machine,  # module access: tests (and GPU-less CI) stand in for the GPU queries
)
from .dependencies import installed_version, supported_python
from .toolchain import (
    compiler,
    compiler_version,
    no_compiler_error,
    require_working_toolchain,
)

OK, WARN, FAIL = "ok", "warn", "fail"
# A full-size GPU build writes a few GB of inductor cache and intermediate files.
LOW_DISK_WARN_BYTES = 10 * 10**9
LOW_DISK_FAIL_BYTES = 1 * 10**9
CORE_PACKAGES = ("torch", "diffusers", "peft", "transformers")
FP8_MIN_ARCH = 89  # torchao float8 (row-wise scaled_mm) needs compute capability 8.9 (Ada, Hopper, ...)


@dataclasses.dataclass(frozen=True)
class CheckResult:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# -- the C++ toolchain ---------------------------------------------------------------------------

def check_compiler() -> CheckResult:
    cxx = compiler()
    if cxx is None:
        error = no_compiler_error()
        return CheckResult("compiler", FAIL, error.problem, error.fix)
    return CheckResult("compiler", OK, f"{cxx}: {compiler_version(cxx) or 'version unknown'}")


def check_compiler_linkage() -> CheckResult:
    try:
        cxx = require_working_toolchain()
    except ToolchainError as err:
        return CheckResult("compiler-linkage", FAIL, err.problem, err.fix)
    return CheckResult("compiler-linkage", OK, f"{cxx} links libstdc++ dynamically (probe .so lists libstdc++.so)")


# -- Python packages -----------------------------------------------------------------------------

def check_python() -> CheckResult:
    supported = supported_python()
    here = platform.python_version()
    if supported.contains(here):
        return CheckResult("python", OK, f"{here} ({supported})")
    return CheckResult("python", FAIL, f"Python {here} is outside the supported {supported}",
                       f"use a Python {supported}")


def check_package(package: str) -> CheckResult:
    """A required dependency: installed, and within the range aotpack declares."""
    info = installed_version(package)
    if info.version is None:
        return CheckResult(package, FAIL, f"{package} is not installed (needs {info.describe_range()})",
                           info.install_hint())
    if not info.in_range:
        return CheckResult(package, FAIL, f"{package} {info.version} is outside the supported "
                           f"{info.describe_range()}", info.install_hint())
    return CheckResult(package, OK, f"{info.version} ({info.describe_range()})")


def _fp8_targets() -> list[str]:
    return [name for name in known_targets() if load_recipe(name).quantization != "none"]


def check_torchao(recipe: Recipe | None) -> CheckResult:
    """torchao quantizes the FP8 targets' base weights, at build and at load."""
    needed = recipe is not None and recipe.quantization != "none"
    status_if_unusable = FAIL if needed else (WARN if recipe is None else OK)
    purpose = (f"target {recipe.name} quantizes with {recipe.quantization}" if needed
               else f"needed for the FP8 targets {', '.join(_fp8_targets())}")
    info = installed_version("torchao")

    def unusable(problem: str) -> CheckResult:
        fix = f"{info.install_hint()} (or `pip install 'aotpack[fp8]'`)" if status_if_unusable != OK else None
        return CheckResult("torchao", status_if_unusable, f"{problem}; {purpose}", fix)

    try:
        import torchao  # noqa: F401  (importable, not only installed: it can fail against this torch)
    except Exception as err:  # torchao raises more than ImportError against an incompatible torch
        return unusable(f"torchao cannot be imported ({type(err).__name__}: {err})")
    if not info.in_range:
        return unusable(f"torchao {info.version} is outside the supported {info.describe_range()}")
    return CheckResult("torchao", OK, f"{info.version} ({info.describe_range()}); {purpose}")


def check_quantization(recipe: Recipe) -> CheckResult:
    """torchao's row-wise FP8 runs only on CUDA GPUs of compute capability 8.9+ (it refuses a CPU), so an
    FP8 recipe for device = "cpu" (or an older arch) cannot build anywhere."""
    if recipe.quantization == "none":
        return CheckResult("quantization", OK, f"target {recipe.name}: no weight quantization")
    arch_number = int("".join(ch for ch in recipe.gpu_arch if ch.isdigit()) or 0)
    if recipe.device != "cuda" or arch_number < FP8_MIN_ARCH:
        where = "device = \"cpu\"" if recipe.device != "cuda" else f"gpu_arch = {recipe.gpu_arch!r}"
        return CheckResult("quantization", FAIL,
                           f"target {recipe.name} quantizes with {recipe.quantization} for {where}; torchao's FP8 "
                           f"needs a CUDA GPU of sm_{FP8_MIN_ARCH} or newer",
                           "set quantization = \"none\" for this target, or use a GPU target (e.g. h100)")
    return CheckResult("quantization", OK, f"target {recipe.name}: {recipe.quantization} on {recipe.gpu_arch}")


def check_attention(recipe: Recipe) -> CheckResult:
    """Attention ops the programs call at run time (FlashAttention-3, cuDNN's FP8 SDPA) must be importable where
    they build (the build runs them to validate) and run; without this check an FP8-attention build fails its
    validation after minutes of compiling (H200, 2026-12-03: ~140 s spent that way)."""
    try:  # the runtime's own check: it knows which backends need an op from outside torch
        check_attention_runs_here(recipe.attention)
    except PackageMismatchError as err:
        return CheckResult("attention", FAIL, err.problem, err.fix)
    if recipe.attention == "cudnn_fp8" and not torch.cuda.is_available():
        return CheckResult("attention", WARN, f"target {recipe.name}: cudnn_fp8 needs the cuDNN frontend on the GPU "
                                              "machine; no CUDA here to check it", "pip install nvidia-cudnn-frontend "
                                              "(or 'aotpack[fp8]') on the machine that builds and serves this "
                                              "target, or build with --attention cudnn")
    return CheckResult("attention", OK, f"target {recipe.name}: {recipe.attention} attention runs here")


# -- CUDA and the GPU ----------------------------------------------------------------------------

def _needs_cuda(recipe: Recipe | None) -> bool:
    return recipe is not None and recipe.device == "cuda"


def check_cuda(recipe: Recipe | None) -> CheckResult:
    """torch's CUDA runtime against what the driver supports."""
    runtime = torch.version.cuda
    needed = _needs_cuda(recipe)
    if runtime is None:
        return CheckResult("cuda", FAIL if needed else OK, f"torch {torch.__version__} is a CPU-only build",
                           "install a CUDA build of torch (see pytorch.org/get-started)" if needed else None)
    driver = machine.cuda_driver_version()
    if driver is None:
        return CheckResult("cuda", FAIL if needed else WARN,
                           f"torch CUDA runtime {runtime}; no NVIDIA driver (libcuda.so.1) found",
                           "install the NVIDIA driver, or build only --target cpu here")
    runtime_version = tuple(int(x) for x in runtime.split(".")[:2])
    driver_version = tuple(int(x) for x in driver.split(".")[:2])
    detail = f"torch CUDA runtime {runtime}, driver supports CUDA {driver}"
    fix = f"upgrade the NVIDIA driver to one for CUDA >= {runtime}, or install a torch built for CUDA <= {driver}"
    if driver_version[0] < runtime_version[0]:
        return CheckResult("cuda", FAIL, f"{detail}: the driver is too old for this torch", fix)
    if driver_version < runtime_version:  # minor-version compatibility: runs, but JIT of newer PTX can fail
        return CheckResult("cuda", WARN, f"{detail}: older minor version (Triton kernels may fail to load)", fix)
    return CheckResult("cuda", OK, detail)


def check_triton(recipe: Recipe | None) -> CheckResult:
    """Inductor writes the GPU kernels in Triton."""
    try:  # imported, not looked up by distribution name: nightlies ship it as `pytorch-triton`
        import triton

        return CheckResult("triton", OK, triton.__version__)
    except ImportError:
        pass
    if _needs_cuda(recipe) or (recipe is None and torch.cuda.is_available()):
        return CheckResult("triton", FAIL, "triton is not installed; inductor needs it for CUDA kernels",
                           "install the triton release that matches torch (CUDA builds of torch depend on it)")
    return CheckResult("triton", OK, "not installed (only CUDA targets need it)")


def check_gpu(recipe: Recipe | None) -> CheckResult:
    """The GPU, its arch and the recipes for it; with a GPU target, whether it can be built here."""
    if _needs_cuda(recipe):
        try:
            machine.check_can_build(recipe.name, recipe.device, recipe.gpu_arch)
        except PackageMismatchError as err:
            return CheckResult("gpu", FAIL, err.problem, err.fix)
    arch = machine.gpu_arch()
    if arch is None:
        return CheckResult("gpu", OK, "no CUDA GPU visible: this machine builds and serves --target cpu")
    targets = machine.targets_for_arch(arch)
    if not targets:
        return CheckResult("gpu", WARN, f"{machine.gpu_name()} ({arch}): no recipe targets this arch",
                           f"pass a recipe .toml for {arch} with --target; known targets: {', '.join(known_targets())}")
    return CheckResult("gpu", OK, f"{machine.gpu_name()} ({arch}); recipes for it: {', '.join(targets)}")


# -- disk ----------------------------------------------------------------------------------------

def inductor_cache_dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir())


def check_disk(name: str, path: Path, setting: str) -> CheckResult:
    """Free space where builds write; `setting` says how to point that elsewhere."""
    existing = Path(path).absolute()
    while not existing.exists():  # the directory may not be created yet: measure its filesystem
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    detail = f"{free / 1e9:.1f} GB free at {path}"
    fix = f"free space there, or {setting}"
    if free < LOW_DISK_FAIL_BYTES:
        return CheckResult(name, FAIL, f"{detail} (a build needs at least {LOW_DISK_FAIL_BYTES / 1e9:.0f} GB)", fix)
    if free < LOW_DISK_WARN_BYTES:
        return CheckResult(name, WARN, f"{detail} (a full-size GPU build can use several GB)", fix)
    return CheckResult(name, OK, detail)


def check_output(out: Path) -> CheckResult:
    """`--out` through `aotpack build`'s own check (`check_output_dir`): what build would refuse fails here."""
    from ..builder.output import OutputDirError, check_output_dir

    try:
        check_output_dir(out, overwrite=True)
    except OutputDirError as err:
        return CheckResult("output", FAIL, err.problem, err.fix)
    try:
        check_output_dir(out)
    except OutputDirError as err:  # a package there: build replaces it with --overwrite only
        return CheckResult("output", WARN, err.problem, err.fix)
    return CheckResult("output", OK, f"`aotpack build` can write {out}")


# -- all of them ---------------------------------------------------------------------------------

def resolve_target(target: str | None) -> Recipe | None:
    if target is None:
        return None
    return load_recipe(machine.auto_target() if target == "auto" else target)


def run_checks(target: str | None = None, out_dir: str | Path | None = None) -> list[CheckResult]:
    """Every check, in the order a user would fix them; `target` adds what that recipe needs."""
    recipe = resolve_target(target)
    results = [check_compiler()]
    if results[0].status != FAIL:
        results.append(check_compiler_linkage())
    results.append(check_python())
    results += [check_package(package) for package in CORE_PACKAGES]
    results += [check_triton(recipe), check_torchao(recipe), check_cuda(recipe), check_gpu(recipe)]
    if recipe is not None:
        results += [check_quantization(recipe), check_attention(recipe)]
    results.append(check_disk("disk-inductor-cache", inductor_cache_dir(), "set TORCHINDUCTOR_CACHE_DIR"))
    output = [check_output(Path(out_dir))] if out_dir is not None else []
    results += output
    if not output or output[0].status != FAIL:  # where build cannot write, its free space tells nothing
        results.append(check_disk("disk-output", Path(out_dir or DEFAULT_OUT), "pass --out elsewhere"))
    return results


def failed(results: list[CheckResult]) -> list[CheckResult]:
    return [result for result in results if result.status == FAIL]
