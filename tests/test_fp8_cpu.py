"""The FP8 recipe's mechanics on the CPU: torchao row-wise FP8 weights exported as tensor subclasses,
compiled in a worker process and the build's own, flattened into constants at load and bound without a copy.

torchao refuses FP8 on a CPU (it checks for sm_89+), but torch runs row-wise `_scaled_mm` on the
CPU, so the test lifts that check. The numbers are not GPU numbers: torchao's eager CPU path
accumulates in low precision (1% off an exact reference, where the compiled program is 0.2% off),
so the per-program bound here is looser than the GPU recipes' 3e-2.
"""

from __future__ import annotations

import json

import pytest
import torch

from aotpack.recipes.recipe import load_recipe
from aotpack.store.inspect import format_manifest
from aotpack.store.manifest import read_manifest
from aotpack.store.manifest_schema import format_version_for


MODULATION = list(load_recipe("h200").unquantized_linears)  # the AdaLN modulation linears, as h200 keeps them


def test_fp8_weights_are_flattened_bound_and_validated(fp8_build):
    manifest, calls = read_manifest(fp8_build.path), fp8_build.calls
    assert manifest.quantization["method"] == "fp8_rowwise"
    assert manifest.recipe["fused_gelu_quant"] is True and calls.gelu  # GELU + quantization went through the op
    assert manifest.recipe["fused_qk_norm_rope"] is True and calls.qk  # and q/k norms + RoPE through theirs
    # and each block norm, quantized once: kept for the slotted programs, not for their no-slot twins
    assert manifest.recipe["fused_norm_quant"] is True and True in calls.norm and False in calls.norm
    assert manifest.build["compile_workers"] == 2
    # every program's compile, in this process or a worker, recorded with where its time went
    names = {p.name for p in manifest.programs} | {"merge_layers"}
    assert set(manifest.build["compile_cpu_seconds"]) == set(manifest.build["compile_phases"]) == names
    assert all("compile_fx_inner" in phases for phases in manifest.build["compile_phases"].values())
    assert 0 < len(manifest.build["compile_process_seconds"]) < len(names)  # the programs compiled in a worker
    block = next(p for p in manifest.programs if p.kind == "double_block")
    # torchao's Float8Tensor becomes two constants (qdata, scale) per quantized linear
    flattened = [c for c in block.constants if ".parametrizations.weight.original" in c]
    assert len(flattened) == 2 * 12  # its 12 FP8 linears; its 2 AdaLN ones run in the modulation program, in bf16
    assert manifest.quantization["unquantized_linears"] == MODULATION
    # the lowest format that says so: an aotpack before format 2 refuses the package instead of quantizing them
    # (format 4 for the batched modulation, which an aotpack before it would not feed)
    assert format_version_for(manifest.quantization) == 2
    assert manifest.format_version == 4 == format_version_for(manifest.quantization, manifest.recipe)
    shown = format_manifest(manifest)  # `aotpack inspect`
    assert "not quantized: *.norm1.linear, *.norm1_context.linear" in shown
    # every program's own compile time, the no-slot twins' and the merge program's included
    for name, seconds in manifest.build["compile_seconds"].items():
        assert any(line.split()[:1] == [name] and line.endswith(f"  {seconds}") for line in shown.splitlines()), name
    modulation = next(p for p in manifest.programs if p.kind == "modulation")
    # every block's AdaLN linears, bf16 weights there (nothing flattened), none left in the block programs
    adaln = {f"body.transformer_blocks.{i}.{norm}.linear.base.weight" for i in (0, 1) for norm in ("norm1", "norm1_context")}
    adaln |= {f"body.single_transformer_blocks.{i}.norm.linear.base.weight" for i in (0, 1)}
    assert adaln <= set(modulation.constants)
    assert not [c for c in modulation.constants if ".parametrizations." in c]
    assert not [c for c in block.constants if ".norm1" in c]
    assert not any(c.endswith("base.bias") for c in block.constants)  # the slot owns the bias
    # its no-slot twin (what runs with no LoRA): no LoRA inputs, and the bias still added after the FP8
    # matmul (cuBLASLt's row-wise FP8 + bias fails for small M)
    plain = next(p for p in manifest.programs if p.name == "double_block.noslot")
    assert plain.slots == [] and not [i for i in plain.inputs if "lora" in i["name"]]
    assert "body.attn.to_q.bias" in plain.constants and "body.attn.to_q.base.bias" not in plain.constants
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


def test_fp8_package_merges_through_its_compiled_merge_program(fp8_package, demo_loras):
    """FP8 packages carry merge_layers.pt2 (verified by sha256 like every program). A merge runs it once per group
    of layers of one shape: the new rows equal `merged_rows` on the saved originals bit for bit, the output moves as
    the slots' output does, and the unmerge restores the FP8 weights bit for bit."""
    import torchao.quantization.quant_api as quant_api
    from reference import rel_error

    import aotpack
    from aotpack.models.examples import transformer_inputs
    from aotpack.models.merge_rows import merged_rows
    from aotpack.runtime.merge import _weight_storages

    manifest = read_manifest(fp8_package)
    assert manifest.merge_program == "merge_layers.pt2" and manifest.merge_program in manifest.files
    # the merge by address writes through a GPU kernel: CUDA packages only (tests/test_address_merge.py)
    assert manifest.merge_by_address_program is None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
        served = aotpack.load(fp8_package, model="tiny")
    transformer = served.transformer
    assert transformer.compiled_merge is not None and transformer.address_merge is None
    inputs = transformer_inputs(transformer.config, batch=1, image_tokens=64, text_tokens=16, dtype=torch.bfloat16,
                                device="cpu", generator=torch.Generator().manual_seed(2))
    lora = [(str(demo_loras["tiny-style-attn"]), 0.8)]
    calls = []
    original_program = transformer.compiled_merge.program
    transformer.compiled_merge.program = lambda flat: calls.append(flat) or original_program(flat)
    # the loader warms the program per weight shape on CUDA (its first call per shape costs ~8 ms there): scratch
    # inputs, one call per shape, stacked as a merge of every layer of that shape would stack them
    shapes = [(spec.out_features, spec.in_features) for spec in manifest.slots]
    transformer.compiled_merge.warm(shapes, manifest.max_rank, "cpu")
    assert sorted(tuple(flat[0].shape) for flat in calls) == sorted((shapes.count(s), *s) for s in set(shapes))
    calls.clear()
    with torch.no_grad():
        base = transformer(**inputs, return_dict=False)[0].float()
        served.set_loras(lora)
        slots = transformer(**inputs, return_dict=False)[0].float()
        originals = {spec.name: [t.clone() for t in _weight_storages(transformer.lora_modes._layer_weight(spec.name))]
                     for spec in manifest.slots}
        served.set_loras(lora, merge=True)
        merged = transformer(**inputs, return_dict=False)[0].float()
    assert transformer.merged and calls  # the compiled program did the merge, layers of one shape per call
    touched = list(transformer.lora_modes.merged_layers)
    assert len(calls) < len(touched) and max(flat[0].shape[0] for flat in calls) > 1
    assert sum(flat[0].shape[0] for flat in calls) == len(touched)
    for name in touched:  # each layer: its call's stacked factors, the eager math on its originals
        weight, (qdata, scale) = transformer.lora_modes._layer_weight(name), originals[name]
        flat, index = next((flat, i) for flat in calls for i in range(flat[0].shape[0])
                           if torch.equal(flat[0][i].view(torch.uint8), qdata.view(torch.uint8)))
        expected_qdata, expected_scale = merged_rows(qdata[None], scale.view(1, -1, 1), flat[2][index:index + 1],
                                                     flat[3][index:index + 1])
        assert torch.equal(weight.qdata.view(torch.uint8), expected_qdata[0].view(torch.uint8)), name
        assert torch.equal(weight.scale.view(-1, 1), expected_scale[0]), name
    effect = rel_error(slots, base)
    assert effect > 1e-2 and rel_error(merged, slots) < 0.25 * effect  # merged = slots, up to FP8 re-rounding
    with torch.no_grad():
        served.set_loras([])
    for name in touched:
        assert all(torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                               b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
                   for a, b in zip(_weight_storages(transformer.lora_modes._layer_weight(name)), originals[name])), name


def test_fp8_package_merges_its_bf16_modulation_beside_the_fp8_linears(fp8_package, demo_loras):
    """A LoRA on every linear of a package whose AdaLN modulation stays in bf16: a merge folds it into both kinds
    (FP8 rows re-quantized, bf16 weights added in place), moves the output as the slots do, and the unmerge
    restores every weight bit for bit."""
    import fnmatch

    import torchao.quantization.quant_api as quant_api
    from reference import rel_error

    import aotpack
    from aotpack.models.examples import transformer_inputs
    from aotpack.runtime.merge import _weight_storages

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
        served = aotpack.load(fp8_package, model="tiny")
    transformer, modes = served.transformer, served.transformer.lora_modes
    inputs = transformer_inputs(transformer.config, batch=1, image_tokens=64, text_tokens=16, dtype=torch.bfloat16,
                                device="cpu", generator=torch.Generator().manual_seed(3))
    lora = [(str(demo_loras["tiny-style-all"]), 0.5)]
    names = [spec.name for spec in read_manifest(fp8_package).slots]
    modulation = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in MODULATION)]
    assert modulation and all(modes._layer_weight(n).dtype == torch.bfloat16
                              and not hasattr(modes._layer_weight(n), "qdata") for n in modulation)
    originals = {n: [t.clone() for t in _weight_storages(modes._layer_weight(n))] for n in names}
    with torch.no_grad():
        base = transformer(**inputs, return_dict=False)[0].float()
        served.set_loras(lora)
        slots = transformer(**inputs, return_dict=False)[0].float()
        served.set_loras(lora, merge=True)
        merged = transformer(**inputs, return_dict=False)[0].float()
    assert set(modulation) <= set(modes.merged_layers)
    assert all(not torch.equal(modes._layer_weight(n), originals[n][0]) for n in modulation)
    effect = rel_error(slots, base)
    assert effect > 1e-2 and rel_error(merged, slots) < 0.25 * effect
    with torch.no_grad():
        served.set_loras([])
        restored = transformer(**inputs, return_dict=False)[0].float()
    for name in names:
        restored_weights = _weight_storages(modes._layer_weight(name))
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype == torch.float8_e4m3fn
                   else torch.equal(a, b) for a, b in zip(restored_weights, originals[name])), name
    assert torch.equal(restored, base)


def test_package_with_the_per_layer_merge_program_merges_in_eager_passes(fp8_package, demo_loras, tmp_path, caplog):
    """A package of earlier builds (`merge_rows.pt2`, one layer per call): this runtime does not call that program,
    says so, and merges in the eager passes, still restoring the base bit for bit."""
    import json
    import logging
    import shutil

    import torchao.quantization.quant_api as quant_api

    import aotpack
    from aotpack.runtime.merge import _weight_storages

    older = tmp_path / "older"
    shutil.copytree(fp8_package, older)
    (older / "merge_layers.pt2").rename(older / "merge_rows.pt2")
    data = json.loads((older / "manifest.json").read_text())
    data["merge_program"] = "merge_rows.pt2"
    data["files"]["merge_rows.pt2"] = data["files"].pop("merge_layers.pt2")
    (older / "manifest.json").write_text(json.dumps(data))
    with pytest.MonkeyPatch.context() as patch, caplog.at_level(logging.INFO, logger="aotpack.runtime.transformer"):
        patch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
        served = aotpack.load(older, model="tiny")
    assert served.transformer.compiled_merge is None
    assert "merge_rows.pt2" in caplog.text and "rebuild the package" in caplog.text
    layer = "transformer_blocks.0.attn.to_q"
    weight = served.transformer.lora_modes._layer_weight(layer)
    before = [t.clone() for t in _weight_storages(weight)]
    served.set_loras([(str(demo_loras["tiny-style-attn"]), 0.8)], merge=True)
    assert served.transformer.merged
    assert not torch.equal(weight.qdata.view(torch.uint8), before[0].view(torch.uint8))  # the eager passes merged
    served.set_loras([])
    assert torch.equal(weight.qdata.view(torch.uint8), before[0].view(torch.uint8))
    assert torch.equal(weight.scale, before[1])


def test_merge_policy_leaves_a_set_in_slots_that_fp8_would_weaken(fp8_package, demo_loras, caplog):
    """The merge policy (here: always) measures what a merge into the FP8 weights would keep (merge_check.py): the
    demo LoRA at full scale merges unasked; at a scale small enough for FP8 re-rounding to lose much of it, it stays
    in slots with a warning that gives the number, and its output is the slots' output. Asked for (`merge=True`),
    the weak set is merged all the same, with the warning."""
    import logging

    import torchao.quantization.quant_api as quant_api
    from reference import rel_error

    import aotpack
    from aotpack.models.examples import transformer_inputs
    from aotpack.runtime.merge import MERGED, SLOTS
    from aotpack.runtime.merge_policy import MergePolicy

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
        served = aotpack.load(fp8_package, model="tiny")
    transformer, modes = served.transformer, served.transformer.lora_modes
    modes.auto.policy = MergePolicy(0)  # merge before the first step, where the estimate allows
    inputs = transformer_inputs(transformer.config, batch=1, image_tokens=64, text_tokens=16, dtype=torch.bfloat16,
                                device="cpu", generator=torch.Generator().manual_seed(4))
    path = str(demo_loras["tiny-style-all"])

    def step():
        with torch.no_grad():
            return transformer(**inputs, return_dict=False)[0].float()

    served.set_loras([(path, 1.0)])
    step()
    assert modes.mode == MERGED and modes.auto.merges == 1 and modes.last_merge_estimate.faithful
    with caplog.at_level(logging.WARNING, logger="aotpack.runtime.merge"):
        served.set_loras([(path, 0.02)])
        pinned = step()
        estimate = modes.last_merge_estimate
        assert modes.mode == SLOTS and modes.auto.declined == 1 and modes.auto.merges == 1
        assert not estimate.faithful and "not merging the LoRA set unasked" in caplog.text
        assert f"keep only {estimate.strength:.0%}" in caplog.text
        served.set_loras([])
        served.set_loras([(path, 0.02)], merge=False)  # pinned in slots from the base weights
        assert rel_error(step(), pinned) == 0.0  # the declined set ran in slots
        caplog.clear()
        served.set_loras([(path, 0.02)], merge=True)
    assert modes.mode == MERGED and "merging the LoRA set as asked, though" in caplog.text
    served.set_loras([])
