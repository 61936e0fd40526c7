"""Recipe lever `batched_modulation`: one modulation program over every step of an image, block programs
taking its rows. A real package built on the CPU, compared with diffusers' eager FluxPipeline + PEFT."""

from __future__ import annotations

import dataclasses

import logging

import pytest
import torch
from reference import REQUEST, cpu_test_recipe, latents, reference_latents, rel_error

import aotpack
from aotpack.bench.denoise import denoising_loop
from aotpack.builder.build import apply_overrides, build_package
from aotpack.errors import RecipeError, UnsupportedCallError
from aotpack.models.tiny import make_pipeline
from aotpack.recipes.recipe import load_recipe
from aotpack.store.inspect import format_manifest
from aotpack.store.manifest import read_manifest

TOLERANCE = 1e-3  # latents vs diffusers, as in test_core
NORM_LINEARS = ("norm1.linear", "norm1_context.linear", "norm.linear")


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    recipe = tmp_path_factory.mktemp("recipe") / "cpu-batched-modulation.toml"
    recipe.write_text(cpu_test_recipe("cpu-batched-modulation", """
dtype = "float32"
max_rank = 16
batched_modulation = true
""", tolerance=1e-4, end_to_end=1e-4))
    # no no-slot twins: five programs to compile, not seven (CI time); the FP8 package below has them
    return build_package("tiny", str(recipe), out=tmp_path_factory.mktemp("pkg") / "batched", compile_workers=2,
                         no_slot_programs=False, progress=False)


@pytest.fixture(scope="module")
def served(package):
    return aotpack.load(package, model="tiny")


@pytest.fixture(scope="module")
def eager_pipeline():
    return make_pipeline()


def test_package_has_one_modulation_program_and_blocks_that_take_its_rows(package):
    manifest = read_manifest(package)
    assert manifest.format_version == 4  # older runtimes would pass temb to these blocks: they refuse it
    programs = {p.name: p for p in manifest.programs}
    assert sorted(programs) == ["double_block", "epilogue", "modulation", "prologue", "single_block"]
    modulation = programs["modulation"]
    assert [i["name"] for i in modulation.inputs] == ["pooled_projections", "timestep", "guidance"]
    assert modulation.inputs[1]["shape"] == ["steps", "batch"]
    assert sum(s.endswith(NORM_LINEARS) for s in modulation.slots) == 6  # 2 double blocks x 2 + 2 single
    _blocks_take_rows(programs, ("double_block", "single_block"))
    # the build validated it against eager diffusers (random LoRA in every slot, the modulation's included)
    assert manifest.validation["program_rel_errors"]["modulation"] <= 1e-4
    assert manifest.validation["max_rel_error"] <= 1e-4
    assert "modulation rows once an image" in format_manifest(manifest)  # `aotpack inspect`


def _blocks_take_rows(programs: dict, names) -> None:
    for name in names:
        inputs = [i["name"] for i in programs[name].inputs]
        assert "modulation" in inputs and "temb" not in inputs, (name, inputs)
        assert not any(s.endswith(NORM_LINEARS) for s in programs[name].slots)


def test_rows_once_an_image_match_diffusers_and_peft(served, demo_loras, eager_pipeline, caplog):
    rows = served.transformer.modulation_rows
    loras = [(demo_loras["tiny-style-all"], 0.7)]  # every linear, the modulation ones included
    served.set_loras(loras)
    try:
        calls, computed = rows.program_calls, rows.rows_computed
        ours = latents(served)
        assert REQUEST["num_inference_steps"] == 3
        assert (rows.program_calls - calls, rows.rows_computed - computed) == (1, 3)  # 3 steps, one call
        theirs = reference_latents(eager_pipeline, loras)
        assert rel_error(ours, theirs) <= TOLERANCE
        assert rel_error(theirs, reference_latents(eager_pipeline, [])) > 100 * TOLERANCE  # the LoRA matters

        # the same image with rows computed at every step (no schedule followed): the same latents
        served.transformer.follow_scheduler(None)
        calls = rows.program_calls
        rows._told = False
        with caplog.at_level(logging.WARNING):
            per_step = latents(served)
        assert caplog.text.count("follow_scheduler(pipe)") == 1  # said once, not at every step
        assert rows.program_calls - calls == 3
        assert rel_error(per_step, ours) <= 1e-5
    finally:
        served.transformer.follow_scheduler(served.pipeline)
        served.set_loras([])


def test_a_lora_switch_or_a_merge_recomputes_the_rows(served, demo_loras, eager_pipeline):
    rows = served.transformer.modulation_rows
    sets = [[(demo_loras["tiny-style-all"], 1.0)], [(demo_loras["tiny-style-all"], 0.4)], []]
    try:
        for loras in sets:
            served.set_loras(loras)
            calls = rows.program_calls
            assert rel_error(latents(served), reference_latents(eager_pipeline, loras)) <= TOLERANCE, loras
            assert rows.program_calls - calls == 1
        served.set_loras(sets[0], merge=True)  # folded into the weights: the bank is empty, the rows are new
        assert served.transformer.merged
        calls = rows.program_calls
        assert rel_error(latents(served), reference_latents(eager_pipeline, sets[0])) <= TOLERANCE
        assert rows.program_calls - calls == 1
    finally:
        served.set_loras([])


def _fixed_inputs(config, seed: int) -> dict:
    """One image's transformer inputs but the timestep: 16 image and 16 text tokens, random from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 16, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, 16, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
        "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(16, 3), "guidance": torch.full([1], 3.5),
    }


def test_a_timestep_outside_the_schedule_gets_its_own_rows(served):
    """Rows are found by the timestep's value: a call the schedule does not know computes its own."""
    pipe, compiled = served.pipeline, served.transformer
    rows = compiled.modulation_rows
    pipe.scheduler.set_timesteps(3, mu=1.0)
    inputs = _fixed_inputs(compiled.config, seed=3)
    listed = pipe.scheduler.timesteps / 1000
    with torch.no_grad():
        calls, computed = rows.program_calls, rows.rows_computed
        first = compiled(**inputs, timestep=listed[:1].clone(), return_dict=False)[0]
        assert (rows.program_calls - calls, rows.rows_computed - computed) == (1, 3)  # the schedule, at once
        compiled(**inputs, timestep=listed[1:2].clone(), return_dict=False)
        assert rows.program_calls - calls == 1  # found in the table
        outside = torch.tensor([0.123])
        theirs = compiled(**inputs, timestep=outside, return_dict=False)[0]
        assert (rows.program_calls - calls, rows.rows_computed - computed) == (2, 4)  # its own row
        compiled.follow_scheduler(None)
        try:
            assert torch.allclose(compiled(**inputs, timestep=outside, return_dict=False)[0], theirs)
            assert rel_error(compiled(**inputs, timestep=listed[:1].clone(), return_dict=False)[0], first) <= 1e-5
        finally:
            compiled.follow_scheduler(pipe)
        # another pooled tensor (the next image) does not take the first one's table
        calls = rows.program_calls
        compiled(**{**inputs, "pooled_projections": inputs["pooled_projections"] + 1}, timestep=listed[1:2].clone(),
                 return_dict=False)
        assert rows.program_calls - calls == 1
        # the benchmarks' denoising loop steps as FluxPipeline does: one program call an image
        loop = denoising_loop(compiled, pipe, {**inputs, "timestep": None}, steps=5)
        calls, computed, reads = rows.program_calls, rows.rows_computed, rows.host_reads
        loop()
        loop()
        assert (rows.program_calls - calls, rows.rows_computed - computed) == (2, 10)
        assert rows.host_reads - reads == 4  # rows by index: the schedule and the checks an image
        reads = rows.host_reads
        denoising_loop(compiled, pipe, {**inputs, "timestep": None}, steps=5, by_index=False)()
        assert rows.host_reads - reads == 6  # each step's timestep and the schedule


def test_a_pipeline_step_takes_its_row_by_index_with_one_read_an_image(served, demo_loras):
    """Inside an AotpackPipeline call, where the pipeline's `_current_timestep` names the step (FluxPipeline sets it),
    no step reads its timestep from the device: one read of the schedule an image and one of the queued checks at
    the call's end, whatever the step count. The diffusers pipeline called directly, outside such a scope, reads
    each step's timestep (the value lookup). The latents are the same."""
    rows = served.transformer.modulation_rows
    served.set_loras([(demo_loras["tiny-style-all"], 0.7)])
    try:
        reads = rows.host_reads
        by_index = latents(served, num_inference_steps=5)
        assert rows.host_reads - reads == 2  # the schedule and the checks: 5 steps, no read a step
        reads = rows.host_reads
        by_value = latents(served.pipeline, num_inference_steps=5)
        assert rows.host_reads - reads == 6  # five steps and the schedule
        assert torch.equal(by_index, by_value)
        reads = rows.host_reads
        with served.transformer.verified_step_rows():  # a caller's own scope around the diffusers pipeline
            assert torch.equal(latents(served.pipeline, num_inference_steps=5), by_index)
        assert rows.host_reads - reads == 2
    finally:
        served.set_loras([])


def test_a_pipeline_passing_another_timestep_than_it_names_is_refused_then_read(served):
    """A caller whose `_current_timestep` names one step while it passes another's value: the verified scope's end
    raises a typed error naming the fix, and from then on each step reads its timestep, so the same calls get their
    own rows."""
    pipe, compiled = served.pipeline, served.transformer
    rows = compiled.modulation_rows
    inputs = _fixed_inputs(compiled.config, seed=5)

    def lying_image(outputs: list):  # names step i, passes step i + 1's timestep (the last step: its own)
        pipe.scheduler.set_timesteps(4, mu=1.0)
        timesteps = pipe.scheduler.timesteps
        try:
            for i, t in enumerate(timesteps):
                pipe._current_timestep = t
                passed = timesteps[min(i + 1, len(timesteps) - 1)].reshape(1) / 1000
                outputs.append(compiled(**inputs, timestep=passed, return_dict=False)[0])
        finally:
            pipe._current_timestep = None
        return outputs

    try:
        with torch.no_grad():
            wrong = []
            with pytest.raises(UnsupportedCallError, match="another timestep than its pipeline's _current_timestep"):
                with compiled.verified_step_rows():
                    lying_image(wrong)
            assert not rows._by_index
            with compiled.verified_step_rows():
                right = lying_image([])  # now each step reads what it was passed
            compiled.follow_scheduler(None)
            try:
                own = lying_image([])  # rows computed at every step: the reference
            finally:
                compiled.follow_scheduler(pipe)
        assert not torch.equal(wrong[0], own[0])  # the check was not idle: step 0 ran step 0's rows on step 1's t
        for ours, theirs in zip(right, own):
            assert rel_error(ours, theirs) <= 1e-5
    finally:
        rows._by_index = True


def test_recipes_refuse_the_lever_where_it_cannot_apply(caplog):
    with pytest.raises(RecipeError, match="batched_modulation = true needs the regional layout"):
        load_recipe("cpu").replace(batched_modulation=True, layout="whole")
    with caplog.at_level(logging.WARNING):
        recipe = apply_overrides(load_recipe("cpu").replace(batched_modulation=True), parallel="ulysses")
    assert not recipe.batched_modulation and "batched_modulation is off for this build" in caplog.text



@pytest.mark.parametrize("rank", [0, 8])
def test_fused_fp8_blocks_take_their_rows_bit_for_bit(monkeypatch, rank):
    """The H100/H200 block forwards (FP8, fused GELU, q/k and norm kernels, their CPU references here) fed the
    modulation program's rows give what they gave fed `temb`, bit for bit, LoRA slots bound or not."""
    from reference import fp8_tiny_transformer

    from aotpack.models.examples import transformer_inputs
    from aotpack.models.fused_quant import install_fused_gelu_quant
    from aotpack.models.modulation import (
        MODULATION,
        block_index,
        block_widths,
        mark_batched_modulation,
        modulation_example,
        split_step_rows,
    )
    from aotpack.models.norm_quant import install_fused_norm_quant
    from aotpack.models.qk_norm_rope import install_fused_qk_norm_rope
    from aotpack.models.regions import DOUBLE_BLOCK, PROLOGUE, SINGLE_BLOCK, prologue_arguments
    from aotpack.models.units import make_region

    transformer, _ = fp8_tiny_transformer(monkeypatch, rank)
    install_fused_gelu_quant(transformer)
    install_fused_qk_norm_rope(transformer)
    install_fused_norm_quant(transformer)
    inputs = transformer_inputs(transformer.config, batch=2, image_tokens=64, text_tokens=16, dtype=torch.bfloat16,
                                device="cpu", generator=torch.Generator().manual_seed(1))
    blocks = ((DOUBLE_BLOCK, "transformer_blocks.1"), (SINGLE_BLOCK, "single_transformer_blocks.0"))

    def region(kind, instance=None):
        made = make_region(transformer, kind, instance)
        made.bind_lora = lambda lora: None  # keep the slots fp8_tiny_transformer bound
        return made

    def run(kind, module, hidden, encoder, emb, cos, sin):
        if kind == DOUBLE_BLOCK:
            return module(hidden, encoder, emb, cos, sin, None)
        return module(torch.cat([encoder, hidden], 1), emb, cos, sin, None)

    with torch.no_grad():
        hidden, encoder, temb, cos, sin = region(PROLOGUE)(*prologue_arguments(inputs), None)
        before = [run(kind, region(kind, i), hidden, encoder, temb, cos, sin) for kind, i in blocks]
        mark_batched_modulation(transformer)
        # rows as the build's example activations compute them, but with the bound slots kept (the build's
        # `_region_activations` passes no LoRA, which would leave the rank-8 case without its slots)
        rows = region(MODULATION)(*modulation_example(inputs, steps=1), None)[0]
        per_block = split_step_rows(rows, block_widths(transformer), 2)
        after = [run(kind, region(kind, i), hidden, encoder, per_block[block_index(transformer, i)], cos, sin)
                 for kind, i in blocks]
    for old, new in zip(before, after):
        for a, b in zip(old, new):
            assert torch.equal(a, b)
    norms = transformer.transformer_blocks[1].norm1
    assert type(norms.linear).__name__ != "_Columns"  # the model itself is unchanged: the regions hold copies


def test_regions_with_rows_equal_diffusers_on_a_model_without_guidance():
    """A schnell-like model (no guidance embedding; other depth and width): the eager chain of the lever's regions,
    the modulation program's rows feeding the blocks, is diffusers' forward exactly."""
    from diffusers import FluxTransformer2DModel

    from aotpack.models.examples import transformer_inputs
    from aotpack.models.modulation import MODULATION, mark_batched_modulation, modulation_example
    from aotpack.models.regions import (
        DOUBLE_BLOCK,
        EPILOGUE,
        PROLOGUE,
        SINGLE_BLOCK,
        block_prefixes,
        prologue_arguments,
        run_joint,
    )
    from aotpack.models.units import make_region

    torch.manual_seed(7)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=3, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6)).eval()
    inputs = transformer_inputs(transformer.config, batch=2, image_tokens=16, text_tokens=8, dtype=torch.float32,
                                device="cpu", generator=torch.Generator().manual_seed(1))
    assert inputs.get("guidance") is None
    with torch.no_grad():
        expected = transformer(**inputs, return_dict=False)[0]
        mark_batched_modulation(transformer)
        example = modulation_example(inputs, steps=2)
        assert example[2] is None
        rows = make_region(transformer, MODULATION)(*example, None)
        assert rows.shape == (2, 2 * (12 + 3 * 3) * 48)  # 2 steps; per image 1 double (12 x 48) + 3 single (3 x 48)
        rows = rows[0]  # the first step's: the call's own timestep
        hidden, encoder, temb, cos, sin = make_region(transformer, PROLOGUE)(*prologue_arguments(inputs), None)
        offset = 0
        blocks = block_prefixes(transformer)
        for instance in blocks[DOUBLE_BLOCK]:
            encoder, hidden = make_region(transformer, DOUBLE_BLOCK, instance)(
                hidden, encoder, rows[:2 * 576].view(2, 576), cos, sin, None)
            offset += 2 * 576
        singles = []
        for instance in blocks[SINGLE_BLOCK]:
            block_rows = rows[offset:offset + 2 * 144].view(2, 144)
            offset += 2 * 144
            singles.append(lambda joint, _temb, c, s, i=instance, r=block_rows:
                           make_region(transformer, SINGLE_BLOCK, i)(joint, r, c, s, None))
        hidden = run_joint(singles, hidden, encoder, temb, cos, sin)
        actual = make_region(transformer, EPILOGUE)(hidden, temb, None)
    assert offset == rows.numel()
    assert torch.allclose(actual, expected, atol=1e-6, rtol=1e-5)


def test_fp8_package_with_the_lever_takes_rows_once_an_image_and_merges(fp8_package, demo_loras):
    """What a GPU build of the lever compiles (`fp8_package`, conftest: the h100/h200 recipes' shape), built and run
    here: the table's rows give the per-step rows' image bit for bit, a merge moves the output as the slots do, and
    the unmerge gives the base image back exactly."""
    import torchao.quantization.quant_api as quant_api

    manifest = read_manifest(fp8_package)
    assert manifest.validation["program_rel_errors"]["modulation"] <= 1e-2  # bf16 linears: only bf16 rounding
    programs = {p.name: p for p in manifest.programs}
    assert "modulation" in programs and "modulation.noslot" not in programs  # runs once an image: no twin
    _blocks_take_rows(programs, ("double_block", "double_block.noslot", "single_block", "single_block.noslot"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
        served = aotpack.load(fp8_package, model="tiny")
    rows = served.transformer.modulation_rows
    lora = [(demo_loras["tiny-style-all"], 0.8)]
    base = latents(served)
    served.set_loras(lora)
    calls = rows.program_calls
    slots = latents(served)
    assert rows.program_calls - calls == 1
    served.transformer.follow_scheduler(None)
    try:
        assert torch.equal(latents(served), slots)  # rows from the table = rows computed at each step
    finally:
        served.transformer.follow_scheduler(served.pipeline)
    served.set_loras(lora, merge=True)
    merged = latents(served)
    effect = rel_error(slots, base)
    assert served.transformer.merged and effect > 1e-2 and rel_error(merged, slots) < 0.25 * effect
    served.set_loras([])
    assert torch.equal(latents(served), base)
    # a partial merge (merge_share.py): the modulation linears are no block's own, so they stay in slots
    modes = served.transformer.lora_modes
    modes.auto.policy = dataclasses.replace(modes.auto.policy, share=0.5)
    served.set_loras(lora, merge=True)
    in_slots = {name for name, rank in served.transformer.bank.used_rank.items() if rank}
    assert served.transformer.merged_blocks and any(name.endswith("norm1.linear") for name in in_slots)
    partial = latents(served)
    assert rel_error(partial, slots) < 0.25 * effect
    served.set_loras([])
    assert torch.equal(latents(served), base)
