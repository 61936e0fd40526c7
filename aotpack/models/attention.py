"""Attention backends baked into the compiled programs.

SDPA backends are chosen when inductor lowers `scaled_dot_product_attention`, so export and
compile run under `sdpa_kernel([...])`. FlashAttention-3 goes through diffusers' `_flash_3`
backend, a registered custom op (`_diffusers_flash_attn_3::_flash_attn_forward`) that the
compiled program calls at run time: the runtime must be able to provide it.
"""

from __future__ import annotations

import contextlib
import zipfile
from pathlib import Path

from ..errors import AotpackError, PackageMismatchError

# Substrings of the generated C++ wrapper that show which attention kernel a program calls.
KERNEL_MARKERS = {
    "cudnn": "_scaled_dot_product_cudnn_attention",
    "flash": "_scaled_dot_product_flash_attention",
    "efficient": "_scaled_dot_product_efficient_attention",
    "fa3": "_diffusers_flash_attn_3",
    "cpu_flash": "_scaled_dot_product_flash_attention_for_cpu",
}


def fa3_available() -> bool:
    from diffusers.utils import is_flash_attn_3_available

    return bool(is_flash_attn_3_available())


def attention_context(transformer, backend: str):
    """Context for export + compile that makes the programs use `backend`.

    `transformer` may be None when only compiling an already exported program (FA3 is then already
    baked in as a custom op)."""
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
    raise AotpackError(f"unknown attention backend {backend!r}", "use sdpa, cudnn, flash or fa3")


def kernels_in_package(package: Path) -> list[str]:
    """Attention kernels the compiled wrapper of `package` calls (read from its generated C++)."""
    found = set()
    with zipfile.ZipFile(package) as archive:
        for name in archive.namelist():
            if name.endswith(".cpp"):
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
