"""Shared fixtures: real packages built once per session on the CPU, demo LoRA files, references."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# Test builds compile AOTInductor's host-side wrapper at -O0 (default -O1; the kernels keep -O3): the
# same programs and numbers, less g++ time. The suite builds ~12 packages; one tiny CPU build spent
# 166 s in g++ at -O1 and 123 s at -O0 (2 cores, 2026-12-01). Set before torch reads its config.
os.environ.setdefault("AOT_INDUCTOR_COMPILE_WRAPPER_OPT_LEVEL", "O0")
warnings.filterwarnings("ignore")


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory):
    """The embedded tiny model built for the cpu target (regional layout, max_rank 32)."""
    from aotpack.builder.build import build_package

    return build_package("tiny", "cpu", out=tmp_path_factory.mktemp("pkg") / "tiny-cpu", progress=False)


@pytest.fixture(scope="session")
def split_package(tmp_path_factory):
    """The tiny model built for the cpu target with `--parallel ulysses` (blocks cut around attention), read-only:
    shared by the context-parallel tests and their launch-error tests (one build of ~55 s on 2 cores, not two)."""
    from aotpack.builder.build import build_package

    return build_package("tiny", "cpu", out=tmp_path_factory.mktemp("cp") / "tiny-cpu-ulysses", parallel="ulysses",
                         progress=False)


@pytest.fixture(scope="session")
def fp8_build(tmp_path_factory):
    """The h100/h200 recipes' shape at tiny size (`reference.fp8_cpu_recipe` + grouped LoRA down-projections and
    batched modulation, both on in h100/h200), read-only: shared by the FP8 and batched-modulation tests (one build
    of ~60 s on 2 cores, not two). `.path` is the package; `.calls` what the build ran through each fused op."""
    from reference import build_fp8_package

    return build_fp8_package(tmp_path_factory.mktemp("fp8"), "group_lora_down = true\nbatched_modulation = true")


@pytest.fixture(scope="session")
def fp8_package(fp8_build):
    return fp8_build.path


@pytest.fixture(scope="session")
def demo_loras(tmp_path_factory):
    from aotpack.demo import write_demo_loras

    return write_demo_loras(tmp_path_factory.mktemp("loras"))


@pytest.fixture(scope="session")
def served_tiny(tiny_package):
    """One loaded package shared by tests that only switch LoRAs (each test sets its own set)."""
    import aotpack

    return aotpack.load(tiny_package, model="tiny")


@pytest.fixture(scope="session")
def big_lora(tmp_path_factory):
    """A LoRA file of finite values (1e14, within the parse bound) whose effect at scale 100 overflows float32."""
    import torch
    from safetensors.torch import save_file

    from aotpack.demo import random_lora_state_dict
    from aotpack.models.tiny import make_transformer

    state = random_lora_state_dict(make_transformer(), 4, ["*"], seed=3)
    path = tmp_path_factory.mktemp("big") / "big.safetensors"
    save_file({k: torch.full_like(t, 1e14) for k, t in state.items()}, str(path))
    return path
