"""The FP8 recipe's mechanics on the CPU: torchao row-wise FP8 weights exported as tensor subclasses,
compiled in worker processes, flattened into constants at load and bound without a copy.

torchao refuses FP8 on a CPU (it checks for sm_89+), but torch runs row-wise `_scaled_mm` on the
CPU, so the test lifts that check. The numbers are not GPU numbers: torchao's eager CPU path
accumulates in low precision (1% off an exact reference, where the compiled program is 0.2% off),
so the per-program bound here is looser than the GPU recipes' 3e-2.
"""

from __future__ import annotations

import pytest
import torch
from reference import cpu_test_recipe

from aotpack.builder.build import build_package
from aotpack.store.manifest import read_manifest


def _build_fp8(tmp_path_factory, max_rank=None):
    import torchao.quantization.quant_api as quant_api

    recipe = (tmp_path_factory.mktemp("recipe") / "cpu-fp8.toml")
    recipe.write_text(cpu_test_recipe("cpu-fp8", """
dtype = "bfloat16"
quantization = "fp8_rowwise"
max_rank = 16
""", tolerance=0.1, end_to_end=2.0))
    patch = pytest.MonkeyPatch()
    patch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    try:
        return build_package("tiny", str(recipe), out=tmp_path_factory.mktemp("pkg") / "fp8", compile_workers=2,
                             max_rank=max_rank, progress=False)
    finally:
        patch.undo()


@pytest.fixture(scope="module")
def fp8_package(tmp_path_factory):
    return _build_fp8(tmp_path_factory)


def test_fp8_weights_are_flattened_bound_and_validated(fp8_package):
    manifest = read_manifest(fp8_package)
    assert manifest.quantization["method"] == "fp8_rowwise"
    assert manifest.build["compile_workers"] == 2
    block = next(p for p in manifest.programs if p.kind == "double_block")
    # torchao's Float8Tensor becomes two constants (qdata, scale) per quantized linear
    flattened = [c for c in block.constants if ".parametrizations.weight.original" in c]
    assert len(flattened) == 2 * 14  # 14 linears in a double block (the 2 AdaLN ones included)
    assert not any(c.endswith("base.bias") for c in block.constants)  # the slot owns the bias
    errors = manifest.validation["program_rel_errors"]
    assert errors["double_block"] < 0.1 and errors["single_block"] < 0.1
    # prologue/epilogue stay in bf16 (not quantized) and emulate eager's casts
    assert errors["prologue"] < 2e-2 and errors["epilogue"] < 2e-2


def test_fp8_package_serves(fp8_package):
    import torchao.quantization.quant_api as quant_api
    from reference import latents

    import aotpack

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
        served = aotpack.load(fp8_package, model="tiny")
    weights = served.transformer._weights_owner.transformer_blocks[0].attn.to_q.base
    qdata = weights.parametrizations.weight.original0
    assert qdata.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        out = latents(served, max_sequence_length=16)
    assert out.shape == (1, 16, 16) and torch.isfinite(out).all()


def test_base_only_fp8_package_keeps_biases_out_of_the_fp8_matmul(tmp_path_factory, demo_loras):
    """`--max-rank 0`: no LoRA inputs at all (the slot-overhead baseline), still validated against eager;
    every FP8 linear's bias is added after the matmul (cuBLASLt's row-wise FP8 + bias fails for small M)."""
    import aotpack
    from aotpack.errors import AdapterLayerError

    package = _build_fp8(tmp_path_factory, max_rank=0)
    manifest = read_manifest(package)
    assert manifest.max_rank == 0 and manifest.slots == []
    block = next(p for p in manifest.programs if p.kind == "double_block")
    assert block.slots == [] and not [i for i in block.inputs if "lora" in i["name"]]
    assert "body.attn.to_q.bias" in block.constants and "body.attn.to_q.base.bias" not in block.constants
    errors = manifest.validation["program_rel_errors"]
    assert errors["double_block"] < 0.1 and errors["single_block"] < 0.1
    import torchao.quantization.quant_api as quant_api

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
        served = aotpack.load(package, model="tiny")
    with pytest.raises(AdapterLayerError, match="slot"):
        served.set_loras([(demo_loras["tiny-style-attn"], 1.0)])
