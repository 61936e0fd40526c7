"""`fused_gelu_lora`: the LoRA up-projection before each MLP GELU and the down-projection after it run inside the
GELU quantization kernel (models/gelu_lora.py).

On the CPU the op runs its torch reference (the GPU runs a two-pass Triton kernel that the build checks against it,
and `scripts/check_gelu_lora_kernel.py` checks under Triton's interpreter against the one-row GELU kernel); these
tests pin that the reference computes what the unfused path computes, bit for bit, that the rewiring takes the
right slots (both sides, either side alone, neither), the recipe field's rules and a real AOTInductor program.
"""

from __future__ import annotations

import pytest
import torch
from reference import SingleBlockProgram, cpu_test_recipe, fp8_tiny_transformer, tiny_block_inputs, tiny_lever_run

from aotpack.errors import RecipeError
from aotpack.models import gelu_lora
from aotpack.models.examples import relative_error
from aotpack.models.fused_quant import install_fused_gelu_quant


def test_reference_equals_the_unfused_gelu_quantization_and_projections():
    from aotpack.models.fused_quant import gelu_quant_reference

    prefix, pre, bias, u_in, b_in, a_out = gelu_lora.example_inputs(7, 32, 96, 16)
    q, scale, u_out = torch.ops.aotpack.gelu_lora_quant_fp8(prefix, pre, bias, u_in, b_in, a_out)
    delta = torch.nn.functional.linear(u_in, b_in)
    q_ref, scale_ref, h = gelu_quant_reference(prefix, pre, bias, delta, True)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(scale, scale_ref)
    assert torch.equal(u_out, torch.nn.functional.linear(h, a_out))
    assert q.shape == (7, 128) and scale.shape == (7, 1) and u_out.shape == (7, 16)
    # either side alone: no delta, or no u_out
    empty = pre.new_empty(0)
    q, _, u_out = torch.ops.aotpack.gelu_lora_quant_fp8(prefix, pre, bias, empty, empty, a_out)
    assert torch.equal(q.view(torch.uint8), gelu_quant_reference(prefix, pre, bias, empty, False)[0].view(torch.uint8))
    _, _, none = torch.ops.aotpack.gelu_lora_quant_fp8(prefix, pre, bias, u_in, b_in, empty)
    assert none.numel() == 0
    assert gelu_lora.kernel_errors("cpu") == {"single_block": 0.0, "double_block": 0.0, "up_only": 0.0,
                                              "down_only": 0.0}  # the build's GPU check, on the CPU


def test_kernel_takes_bf16_factors_of_power_of_two_ranks():
    prefix, pre, bias, u_in, b_in, a_out = gelu_lora.example_inputs(4, 0, 64, 16)
    empty = pre.new_empty(0)
    assert gelu_lora.kernel_fits(pre, u_in, b_in, a_out) and gelu_lora.kernel_fits(pre, empty, empty, a_out)
    assert gelu_lora.kernel_fits(pre, empty, empty, empty)
    assert not gelu_lora.kernel_fits(pre, u_in[..., :8], b_in[:, :8], a_out)  # rank 8: under tl.dot's 16
    assert not gelu_lora.kernel_fits(pre, u_in, b_in, a_out[:12])  # rank 12: not a power of two
    assert not gelu_lora.kernel_fits(pre, u_in.float(), b_in.float(), a_out)  # the dots take one dtype


@pytest.mark.parametrize("rank", [0, 16])
def test_lever_gives_the_unfused_outputs_bit_for_bit(monkeypatch, rank):
    """The whole tiny transformer and a single block region, with the lever against without: the same numbers (the
    CPU runs the op's reference, which is the unfused math), and the op called where a slot is bound."""
    transformer, outputs, calls = tiny_lever_run(monkeypatch, rank, gelu_lora, "reference")
    with torch.no_grad():
        install_fused_gelu_quant(transformer)
        plain = outputs(transformer)
        routed = install_fused_gelu_quant(transformer, fused_gelu_lora=True)
        lever = outputs(transformer)
    marked = [m for m in transformer.modules() if getattr(m, "gelu_lora_fused", False)]
    assert routed == len(marked) == 2 * len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    assert all(torch.equal(a, b) for a, b in zip(lever, plain))
    expected_calls = 2 * len(transformer.transformer_blocks) + 1 if rank else 0  # no slot bound: the one-row op
    assert len(calls) == expected_calls


def test_lora_on_one_side_only(monkeypatch):
    """Slots bound on one side of the GELU only (a LoRA on the MLP's first or second linear): the op takes that side,
    and the output is the unfused one."""
    transformer, _ = fp8_tiny_transformer(monkeypatch, 16)
    inputs, *_ = tiny_block_inputs(transformer)
    install_fused_gelu_quant(transformer)
    with torch.no_grad():
        for block in transformer.transformer_blocks:  # unbind the linears before the GELUs
            for feed_forward in (block.ff, block.ff_context):
                feed_forward.net[0].proj.lora_A = feed_forward.net[0].proj.lora_B = None
        for block in transformer.single_transformer_blocks:  # and the single blocks' linears after them
            block.proj_out.lora_A = block.proj_out.lora_B = None
        plain = transformer(**inputs, return_dict=False)[0]
        install_fused_gelu_quant(transformer, fused_gelu_lora=True)
        lever = transformer(**inputs, return_dict=False)[0]
    assert torch.equal(lever, plain)


@pytest.mark.parametrize("other", ["lora_down_from_fp8", "group_lora_up"])
def test_recipe_field_needs_the_gelu_kernel_and_excludes_the_other_lora_levers(tmp_path, other):
    from aotpack.recipes.recipe import load_recipe

    fields = 'dtype = "bfloat16"\nquantization = "fp8_rowwise"\nmax_rank = 8\nfused_gelu_lora = true\n'
    good = tmp_path / "good.toml"
    good.write_text(cpu_test_recipe("good", fields + "fused_gelu_quant = true\n", tolerance=0.1, end_to_end=2.0))
    assert load_recipe(good).fused_gelu_lora is True
    good.write_text(cpu_test_recipe("good", fields + "fused_gelu_quant = true\ngroup_lora_down = true\n",
                                    tolerance=0.1, end_to_end=2.0))
    assert load_recipe(good).group_lora_down is True  # as in h100/h200: it groups u_in's down-projection too
    for name, extra, words in (("alone", "", "fused_gelu_quant = true"),
                               ("both", f"fused_gelu_quant = true\n{other} = true\n", other)):
        bad = tmp_path / f"{name}.toml"
        bad.write_text(cpu_test_recipe(name, fields + extra, tolerance=0.1, end_to_end=2.0))
        with pytest.raises(RecipeError) as caught:
            load_recipe(bad)
        assert "fused_gelu_lora" in str(caught.value) and words in str(caught.value)


def test_single_block_program_with_the_lever_compiles_and_matches_its_eager_region(monkeypatch, tmp_path):
    """A real AOTInductor program (CPU) of a single block with the lever and a bound LoRA: the op survives export as
    one node taking both sides' factors, groups with q/k/v's down-projections, compiles, and the program matches its
    eager region."""
    from aotpack.builder.lora_grouping import group_lora_down_projections

    block = SingleBlockProgram(monkeypatch, fused_gelu_lora=True)
    targets = block.targets()
    assert targets.count("aotpack.gelu_lora_quant_fp8.default") == 1 and "aotpack.gelu_quant_fp8.default" not in targets
    # as h100/h200 build it, with group_lora_down: proj_mlp's down-projection (the op's u_in) joins q/k/v's
    assert group_lora_down_projections(block.program) == 3
    expected, actual, no_lora = block.run(tmp_path / "single.pt2")
    assert relative_error(expected - no_lora, no_lora) > 0.5  # the LoRA moves the block: a wrong slice would show
    assert relative_error(actual.float(), expected.float()) < 0.1  # FP8 roundings Inductor's fusions move (~0.05)
