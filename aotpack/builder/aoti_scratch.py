"""Scratch memory for every program of aotpack's persistent TMA kernel in an AOTInductor package (torch < 2.13).

A Triton kernel that makes TMA descriptors on the device (`tl.make_tensor_descriptor`) writes them into global
scratch memory, `global_scratch_size` bytes for each program it launches. torch 2.11's C++ wrapper allocates that size
once, not once a program: in a package the 132 programs of `aotpack::fp8_linear_lora` wrote their descriptors past a
640-byte buffer and the first of two launches returned NaN (H100 and H200, 2026-12-05,
`scripts/gpu/check_gemm_lora_aoti.py`). torch 2.13 scales the allocation by the launch grid itself
(`DeferredTritonCallWrapper._generate_lazy_scratch`). Host-made descriptors (Triton's `TensorDescriptor`) would need
no scratch, but torch 2.11 fails to compile them inside a program (an assertion in the post-grad pass
`decompose_triton_kernel_wrapper_functional`).

`scratch_for_every_program()` wraps the wrapper's launch code generation for the duration of one compile: for the
kernels named in `PERSISTENT_KERNELS` (whose grid is one program per SM, baked in at trace time) the scratch size is
multiplied by the compiling GPU's SM count. On a torch that scales it already, or without CUDA, it changes nothing.
"""

from __future__ import annotations

import contextlib

import torch

PERSISTENT_KERNELS = ("fp8_linear_lora_kernel",)  # models/gemm_lora.py: grid = (SM count,)


def _wrapper_class():
    try:
        from torch._inductor.codegen.cpp_wrapper_gpu import DeferredTritonCallWrapper
    except ImportError:
        return None
    if hasattr(DeferredTritonCallWrapper, "_generate_lazy_scratch") or not hasattr(
            DeferredTritonCallWrapper, "generate_launch_kernel"):
        return None  # torch scales the scratch by the grid itself, or generates launches some other way
    return DeferredTritonCallWrapper


@contextlib.contextmanager
def scratch_for_every_program(wrapper_class=None, programs: int | None = None):
    """Patch torch's launch generation for one compile (see the module's note); `wrapper_class` and `programs` (the
    kernel's grid) default to torch's class, where it needs the fix, and the current GPU's SM count."""
    wrapper_class = wrapper_class or _wrapper_class()
    if wrapper_class is None or (programs is None and not torch.cuda.is_available()):
        yield
        return
    programs = programs or torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    original = wrapper_class.generate_launch_kernel

    def generate_launch_kernel(self, prefix, wrapper, kernel_var_name, params):
        if params.get("global_scratch") and self.kernel_name.startswith(PERSISTENT_KERNELS):
            params = {**params, "global_scratch": params["global_scratch"] * programs}
        return original(self, prefix, wrapper, kernel_var_name, params)

    wrapper_class.generate_launch_kernel = generate_launch_kernel
    try:
        yield
    finally:
        wrapper_class.generate_launch_kernel = original
