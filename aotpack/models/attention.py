"""Attention backends baked into the compiled programs.

SDPA backends are chosen when inductor lowers `scaled_dot_product_attention`, so export and
compile run under `sdpa_kernel([...])`. FlashAttention-3 goes through diffusers' `_flash_3`
backend, a registered custom op (`_diffusers_flash_attn_3::_flash_attn_forward`) that the
compiled program calls at run time: the runtime must be able to provide it. FP8 attention
(`cudnn_fp8`, opt-in) works the same way through aotpack's own op `aotpack::fp8_sdpa`
(models/fp8_attention.py): cuDNN's FP8 SDPA on CUDA, a reference implementation on the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import zipfile
from pathlib import Path

from ..errors import AotpackError, PackageMismatchError

# Registers `aotpack::fp8_sdpa` on import (a few ms, no cuDNN import): a process that reads an exported
# or compiled program calling it (compile workers, the runtime) has imported this module first.
from . import fp8_attention as _fp8_attention

# Substrings of the generated C++ wrapper (or, for custom ops that the program calls through
# AOTInductor's proxy executor, of its `.json` of extern kernel nodes: `"target": "aotpack::fp8_sdpa"`)
# that show which attention kernel a program calls.
KERNEL_MARKERS = {
    "cudnn": "_scaled_dot_product_cudnn_attention",
    "flash": "_scaled_dot_product_flash_attention",
    "efficient": "_scaled_dot_product_efficient_attention",
    "fa3": "_diffusers_flash_attn_3",
    "cpu_flash": "_scaled_dot_product_flash_attention_for_cpu",
    "cudnn_fp8": "aotpack::fp8_sdpa",
    "bf16_branch": "aotpack::bf16_sdpa",  # cudnn_fp8 with fp8_attention_min_tokens: bf16 below the threshold
}


def fa3_available() -> bool:
    from diffusers.utils import is_flash_attn_3_available

    return bool(is_flash_attn_3_available())


def attention_context(transformer, backend: str, fp8_min_tokens: int = 0):
    """Context for export + compile that makes the programs use `backend`.

    `transformer` may be None when only compiling an already exported program (FA3 is then already
    baked in as a custom op). `fp8_min_tokens` (cudnn_fp8 only, the recipe's `fp8_attention_min_tokens`):
    shorter sequences take bf16 attention, a branch that export records in the program."""
    if backend == "sdpa":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if backend == "cudnn":
        return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
    if backend == "flash":
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    if backend == "fa3":
        if not fa3_available():
            raise AotpackError(
                "the recipe asks for FlashAttention-3, but flash_attn_interface is not importable here",
                "install FlashAttention-3 (hopper/ build of flash-attention) or build with a cudnn recipe",
            )
        if transformer is not None:
            transformer.set_attention_backend("_flash_3")
        return contextlib.nullcontext()
    if backend == "cudnn_fp8":
        attention_fn = _fp8_attention.fp8_attention
        if fp8_min_tokens > 0:
            attention_fn = functools.partial(attention_fn, min_tokens=fp8_min_tokens)
        return _flux_attention_through(attention_fn)
    raise AotpackError(f"unknown attention backend {backend!r}", "use sdpa, cudnn, flash, fa3 or cudnn_fp8")


@contextlib.contextmanager
def _flux_attention_through(attention_fn):
    """Flux attention calls `attention_fn` instead of diffusers' `dispatch_attention_fn` while inside.

    Patches the name that diffusers' Flux processors (FluxAttnProcessor, FluxIPAdapterAttnProcessor) look up
    in their module at call time, and restores it on exit. Chosen over a custom processor, which would have
    to copy diffusers' processor body (projections, q/k norms, RoPE: the math the slots and regions rely on)
    and stay in sync with it; and over diffusers' backend registry, whose backend names are a closed enum.
    Process-wide while inside (every Flux model): export and compile are single-threaded, and the
    compiled programs keep the op after exit. `transformer` is not needed."""
    from diffusers.models.transformers import transformer_flux

    processor = transformer_flux.FluxAttnProcessor
    original, original_call = transformer_flux.dispatch_attention_fn, processor.__call__

    # wraps: FluxAttention.forward filters its kwargs by the processor's signature (inspect follows __wrapped__)
    @functools.wraps(original_call)
    def call_with_module(self, attn, *args, **kwargs):  # the FP8 scales of q/k come from attn's norms
        token = _fp8_attention.current_attention_module.set(attn)
        try:
            return original_call(self, attn, *args, **kwargs)
        finally:
            _fp8_attention.current_attention_module.reset(token)

    transformer_flux.dispatch_attention_fn = attention_fn
    processor.__call__ = call_with_module
    try:
        yield
    finally:
        transformer_flux.dispatch_attention_fn = original
        processor.__call__ = original_call


def kernels_in_package(package: Path) -> list[str]:
    """Attention kernels the compiled wrapper of `package` calls (read from its generated C++, and from the
    `.json` through which it calls custom ops such as `aotpack::fp8_sdpa`)."""
    found = set()
    with zipfile.ZipFile(package) as archive:
        for name in archive.namelist():
            if name.endswith((".cpp", ".json")):
                text = archive.read(name).decode("utf-8", "replace")
                found |= {kernel for kernel, marker in KERNEL_MARKERS.items() if marker in text}
    if "cpu_flash" in found:
        found.discard("flash")
    return sorted(found)


def check_attention_runs_here(attention: str) -> None:
    """Refuse a package whose attention op this process cannot provide (before loading it)."""
    if attention == "fa3" and not fa3_available():
        raise PackageMismatchError(
            "this package calls FlashAttention-3 (flash_attn_interface), which is not importable here",
            "install FlashAttention-3, or pull/build a package with a cudnn/sdpa attention recipe",
        )
    if attention == "cudnn_fp8":
        # `aotpack::fp8_sdpa` is registered (module import above) before any program is loaded; on a
        # CUDA machine its kernel needs the cuDNN frontend (raises PackageMismatchError naming the pip fix).
        import torch

        if torch.cuda.is_available():
            _fp8_attention.import_cudnn()
