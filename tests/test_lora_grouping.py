"""Grouped LoRA down-projections: the graph pass merges the slots that read one activation, and the
exported program computes the same numbers before and after it."""

from __future__ import annotations

import pytest
import torch
from reference import REQUEST, reference_latents, rel_error

import aotpack
from aotpack.builder import build as builder
from aotpack.builder.lora_grouping import group_lora_down_projections, group_lora_up_projections
from aotpack.models.checkpoint import load_transformer, parse_model_ref
from aotpack.models.examples import transformer_inputs
from aotpack.models.prepare import prepare_transformer, regional_slot_names
from aotpack.models.tiny import make_pipeline
from aotpack.progress import Progress
from aotpack.recipes.recipe import _recipe_files, load_recipe

LINEAR = torch.ops.aten.linear.default


def exported_blocks(slot_patterns=("*",)):
    """The tiny model's block programs, exported without grouping, with the inputs they were traced on."""
    recipe = load_recipe("cpu").replace(group_lora_down=False, slots=tuple(slot_patterns))
    transformer = load_transformer(parse_model_ref("tiny"), torch.float32, "cpu")
    names = regional_slot_names(transformer, recipe.slots)
    specs = prepare_transformer(transformer, dtype=recipe.dtype, device="cpu", quantization=recipe.quantization,
                                slot_names=names)
    generator = torch.Generator().manual_seed(0)
    inputs = transformer_inputs(transformer.config, batch=2, image_tokens=recipe.example_image_tokens,
                                text_tokens=recipe.example_text_tokens, dtype=torch.float32, device="cpu",
                                generator=generator)
    shapes = {"batch": list(recipe.batch), "image_tokens": list(recipe.image_tokens),
              "text_tokens": list(recipe.text_tokens)}
    programs = builder._export_programs(transformer, recipe, specs, inputs, shapes, "cpu", generator,
                                        Progress(enabled=False))
    return {kind: (exported, activations) for kind, _, _, activations, exported in programs}


def linear_count(exported) -> int:
    return sum(1 for node in exported.graph.nodes if node.op == "call_function" and node.target == LINEAR)


def lora_up_calls(exported) -> list:
    """The program's `aotpack::lora_up` calls, as the number of up-projections each makes."""
    return [len(node.args[1]) for node in exported.graph.nodes
            if node.op == "call_function" and node.target == torch.ops.aotpack.lora_up.default]


def random_lora(exported, generator) -> dict:
    """Non-zero A/B tensors shaped like the program's LoRA inputs (zeros would hide a mis-wired split)."""
    lora = exported.example_inputs[0][-1]
    return {name: torch.randn(t.shape, generator=generator) * 0.3 for name, t in lora.items()}


@pytest.fixture(scope="module")
def blocks():
    return exported_blocks()


@pytest.mark.parametrize("kind, merged", [
    ("double_block", 4),  # to_q/to_k/to_v -> 1 and add_q/add_k/add_v_proj -> 1
    ("single_block", 3),  # to_q/to_k/to_v/proj_mlp -> 1
])
def test_grouping_merges_slots_sharing_an_input_and_keeps_the_numbers(blocks, kind, merged):
    exported, activations = blocks[kind]
    lora = random_lora(exported, torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = exported.module()(*activations, lora)
        linears = linear_count(exported)
        assert group_lora_down_projections(exported) == merged
        assert linear_count(exported) == linears - merged
        after = exported.module()(*activations, lora)
    for old, new in zip(before, after):
        assert old.shape == new.shape
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)
    assert group_lora_down_projections(exported) == 0  # nothing left to group: the pass is idempotent


@pytest.mark.parametrize("kind, calls", [
    # 14 slots: q/k/v and add_q/k/v grouped, 8 lone (to_out, to_add_out, norm1(_context).linear, ff in/out x 2)
    ("double_block", [3, 3] + [1] * 8),
    ("single_block", [4] + [1] * 2),  # q/k/v/proj_mlp grouped; proj_out and norm.linear alone
])
def test_up_projections_run_as_one_call_per_group_and_keep_the_numbers(kind, calls):
    exported, activations = exported_blocks()[kind]  # a fresh export: the module fixture's is grouped in place
    lora = random_lora(exported, torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = exported.module()(*activations, lora)
        linears = linear_count(exported)
        grouped_down = group_lora_down_projections(exported)
        assert group_lora_up_projections(exported) == sum(calls)
        assert sorted(lora_up_calls(exported)) == sorted(calls)
        assert linear_count(exported) == linears - grouped_down - sum(calls)
        after = exported.module()(*activations, lora)
    for old, new in zip(before, after):
        assert old.shape == new.shape
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)
    assert group_lora_up_projections(exported) == 0  # every up-projection is already in a call


def test_up_projections_of_ungrouped_slots_run_alone():
    exported, activations = exported_blocks()["single_block"]
    lora = random_lora(exported, torch.Generator().manual_seed(6))
    with torch.no_grad():
        before = exported.module()(*activations, lora)
        assert group_lora_up_projections(exported) == 6  # no group_lora_down: each slot's u on its own
        assert lora_up_calls(exported) == [1] * 6
        after = exported.module()(*activations, lora)
    for old, new in zip(before, after):
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)


def test_slots_that_share_no_input_are_left_alone():
    blocks = exported_blocks(slot_patterns=("*.attn.to_q", "*.proj_out"))
    for kind in ("double_block", "single_block"):
        exported, _ = blocks[kind]
        linears = linear_count(exported)
        assert group_lora_down_projections(exported) == 0
        assert linear_count(exported) == linears


def test_a_grouped_package_matches_diffusers_with_peft_loras(demo_loras, tmp_path):
    """The levers end to end: an opt-in recipe (grouped down-projections, up-projections in `aotpack::lora_up`)
    builds, validates and serves stacked LoRA files like eager PEFT."""
    recipe = tmp_path / "cpu-grouped.toml"
    text = _recipe_files()["cpu"].read_text()
    # without the no-slot programs (which have no LoRA to group): half the programs to compile
    recipe.write_text(text.replace('layout = "regional"', 'layout = "regional"\ngroup_lora_down = true\n'
                                   'group_lora_up = true\nno_slot_programs = false', 1))
    package = builder.build_package("tiny", str(recipe), out=tmp_path / "grouped", progress=False)
    served = aotpack.load(package, model="tiny")
    assert served.manifest.recipe["group_lora_down"] is True and served.manifest.recipe["group_lora_up"] is True
    loras = [(demo_loras["tiny-style-all"], 0.7), (demo_loras["tiny-style-attn"], 0.5)]
    served.set_loras(loras)
    with torch.no_grad():
        ours = served(**REQUEST, generator=torch.Generator("cpu").manual_seed(7), output_type="latent").images
    eager = make_pipeline()
    theirs = reference_latents(eager, loras)
    assert rel_error(ours, theirs) <= 1e-3
    assert rel_error(theirs, reference_latents(eager, [])) > 0.1  # the LoRAs move the output: the check has teeth


def test_the_kernel_takes_only_groups_it_can_index():
    """Where the CUDA kernel of `aotpack::lora_up` runs; every other group takes the reference (F.linear per slot)."""
    from aotpack.models.lora_up import MAX_SLOTS_PER_LAUNCH, kernel_fits, lora_up_reference

    def group(rows=8, ranks=(64, 64, 64), widths=(256, 256, 512), dtype=torch.bfloat16):
        bs = [torch.zeros(width, rank, dtype=dtype) for width, rank in zip(widths, ranks)]
        return torch.zeros(rows, sum(ranks), dtype=dtype), bs

    assert kernel_fits(*group())
    assert not kernel_fits(*group(ranks=(64, 64, 32)))  # ranks differ: u's columns per slot would not be j * R
    assert not kernel_fits(*group(ranks=(48, 48, 48)))  # not a power of two: no tl.dot of that size
    assert not kernel_fits(*group(widths=(256, 200, 512)))  # a width that is no multiple of the column tile
    many = group(ranks=(64,) * (MAX_SLOTS_PER_LAUNCH + 1), widths=(128,) * (MAX_SLOTS_PER_LAUNCH + 1))
    assert not kernel_fits(*many)  # more slots than the kernel's B pointers
    u, bs = group()
    assert not kernel_fits(u.t().contiguous().t(), bs)  # u's columns strided
    assert not kernel_fits(u.float(), bs)  # dtypes differ
    u, bs = (torch.randn(5, 128), [torch.randn(128, 64), torch.randn(256, 64)])
    out = lora_up_reference(u, bs)
    torch.testing.assert_close(out, torch.cat([u[:, :64] @ bs[0].t(), u[:, 64:] @ bs[1].t()], -1))
