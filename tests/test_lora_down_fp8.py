"""`lora_down_from_fp8`: the LoRA down-projections after the MLP GELUs read the FP8 GELU output, not a bf16 copy.

On the CPU the op runs its torch reference (the GPU runs a split-K Triton kernel that the build checks against it,
and `scripts/check_lora_down_fp8_kernel.py` checks under Triton's interpreter); these tests pin the reference's
numerics, the rewiring (only the marked slots' down-projections change, and only when a LoRA is bound) and the
recipe field.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import SingleBlockProgram, cpu_test_recipe, fp8_tiny_transformer, tiny_lever_run

from aotpack.errors import RecipeError
from aotpack.models import fused_quant
from aotpack.models.examples import relative_error
from aotpack.models.fused_quant import install_fused_gelu_quant, linear_after_gelu, quantize_rows
from aotpack.models.lora_down_fp8 import (
    _split,
    fp8_hi_lo_rows,
    kernel_errors,
    kernel_fits,
    lora_down_fp8_reference,
    mark_reads_fp8_input,
    reads_fp8_input,
)


def test_reference_is_the_product_of_the_dequantized_input():
    generator = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(2, 7, 96, generator=generator)).to(torch.bfloat16)
    q, scale = quantize_rows(x)
    a = torch.randn(16, 96, generator=generator).to(torch.bfloat16)
    u = torch.ops.aotpack.lora_down_fp8(q, scale, a)
    assert u.shape == (2, 7, 16) and u.dtype == torch.bfloat16
    exact = (q.double() * scale.double()) @ a.double().T
    assert relative_error(u.double(), exact) < 4e-3  # one bf16 rounding of the output
    # it is A times the FP8 copy, not the bf16 input: the difference is the activation's FP8 rounding
    from_bf16 = x.double() @ a.double().T
    assert 1e-3 < relative_error(u.double(), from_bf16) < 0.06
    # the build's GPU check, on the CPU: A in bf16, and with the lever lora_down_fp8_dots A's FP8 halves too
    assert kernel_errors("cpu") == {"single_block": 0.0, "double_block": 0.0}
    assert kernel_errors("cpu", dots=True) == {"single_block": 0.0, "single_block_dots": 0.0, "double_block": 0.0,
                                               "double_block_dots": 0.0}


def test_kernel_takes_power_of_two_ranks_and_slices_k_in_tiles():
    assert [kernel_fits(rank) for rank in (8, 16, 48, 64, 128)] == [False, True, False, True, True]
    # (columns per slice, slices): ~2048 columns a slice, whole K tiles, every column covered once
    assert _split(15360, 128, 2048) == (1920, 8) and _split(12288, 128, 2048) == (2048, 6)
    assert _split(3072, 128, 2048) == (1536, 2) and _split(100, 32, 2048) == (128, 1)
    for k in (200, 3072, 15360, 12289):
        columns, slices = _split(k, 128, 2048)
        assert columns % 128 == 0 and (slices - 1) * columns < k <= slices * columns


def test_marked_slot_adds_b_times_the_down_projection_of_the_fp8_gelu_output(monkeypatch):
    transformer, _ = fp8_tiny_transformer(monkeypatch, 8)
    install_fused_gelu_quant(transformer)
    layer = transformer.transformer_blocks[0].ff.net[2]
    generator = torch.Generator().manual_seed(4)
    pre = (3 * torch.randn(1, 5, layer.in_features, generator=generator)).to(torch.bfloat16)  # the GELU's input
    prefix = pre[..., :0]
    kept = []
    monkeypatch.setattr(fused_quant, "gelu_quant_reference",
                        lambda *args, _ref=fused_quant.gelu_quant_reference: kept.append(args[4]) or _ref(*args))
    with torch.no_grad():
        before = linear_after_gelu(layer, prefix, None, pre)
        assert mark_reads_fp8_input(layer) and reads_fp8_input(layer)
        after = linear_after_gelu(layer, prefix, None, pre)
        q, scale = quantize_rows(F.gelu(pre, approximate="tanh"))
        delta = F.linear(lora_down_fp8_reference(q, scale, layer.lora_A), layer.lora_B)
        lora_a, lora_b = layer.lora_A, layer.lora_B
        layer.lora_A = layer.lora_B = None  # unbound: the base output only
        unbound = linear_after_gelu(layer, prefix, None, pre)
        layer.lora_A, layer.lora_B = lora_a, lora_b
    assert kept == [True, False, False]  # the bf16 GELU output is written only for the unmarked slot
    assert torch.equal(after, unbound + delta.to(after.dtype))  # added and rounded as the slot adds its delta
    assert not torch.equal(after, before)
    # the LoRA's effect through the FP8 copy stays within its rounding of the bf16 one
    assert relative_error(after - unbound, before - unbound) < 0.05  # 0.031 here
    assert not mark_reads_fp8_input(transformer.transformer_blocks[0].norm1.norm)  # not a slot: nothing marked


@pytest.mark.parametrize("rank", [0, 8])
def test_lever_marks_the_linears_after_the_gelus_and_changes_only_the_lora_effect(monkeypatch, rank):
    from aotpack.models import lora_down_fp8

    base_transformer, _ = fp8_tiny_transformer(monkeypatch, 0)
    transformer, outputs, calls = tiny_lever_run(monkeypatch, rank, lora_down_fp8, "lora_down_fp8_reference")
    with torch.no_grad():
        install_fused_gelu_quant(base_transformer)
        base = outputs(base_transformer)
        install_fused_gelu_quant(transformer)
        plain = outputs(transformer)
        routed = install_fused_gelu_quant(transformer, lora_down_from_fp8=True)
        marked = [block.ff.net[2] for block in transformer.transformer_blocks]
        marked += [block.proj_out for block in transformer.single_transformer_blocks]
        text_stream = [block.ff_context.net[2] for block in transformer.transformer_blocks]
        assert routed == len(marked) + len(text_stream)
        assert all(reads_fp8_input(layer) == bool(rank) for layer in marked)
        assert not any(reads_fp8_input(m) for name, m in transformer.named_modules() if not name.endswith("ff.net.2")
                       and "proj_out" not in name)  # the text feed-forwards keep the bf16 copy
        lever = outputs(transformer)
    doubles = len(transformer.transformer_blocks)
    if not rank:  # no slots: nothing to mark, the same programs
        assert calls == [] and all(torch.equal(a, b) for a, b in zip(lever, plain))
        return
    assert len(calls) == doubles + 1  # the double blocks' image feed-forwards, the single block region's proj_out
    for with_lever, without, no_lora in zip(lever, plain, base):
        assert not torch.equal(with_lever, without)
        # what changes is the LoRA's effect, by the FP8 rounding of the GELU output it reads
        assert relative_error(with_lever - no_lora, without - no_lora) < 0.05  # 0.040 and 0.012 here


@pytest.mark.parametrize("field, needs, common", [
    ("lora_down_from_fp8", "fused_gelu_quant", ""),
    ("lora_down_fp8_gemm", "lora_down_from_fp8", "fused_gelu_quant = true\n"),
    ("lora_down_fp8_dots", "lora_down_from_fp8", "fused_gelu_quant = true\n"),
    ("lora_down_fp8_text", "lora_down_fp8_dots", "fused_gelu_quant = true\nlora_down_from_fp8 = true\n"),
])
def test_recipe_field_needs_the_field_it_builds_on(tmp_path, field, needs, common):
    """`lora_down_from_fp8` reads the fused GELU kernel's FP8 output; `lora_down_fp8_gemm` chooses how those
    down-projections run: each is refused without the other, naming both."""
    from aotpack.recipes.recipe import load_recipe

    fields = f'dtype = "bfloat16"\nquantization = "fp8_rowwise"\nmax_rank = 8\n{common}{field} = true\n'
    good = tmp_path / "good.toml"
    good.write_text(cpu_test_recipe("good", fields + f"{needs} = true\n", tolerance=0.1, end_to_end=2.0))
    assert getattr(load_recipe(good), field) is True
    bad = tmp_path / "bad.toml"
    bad.write_text(cpu_test_recipe("bad", fields, tolerance=0.1, end_to_end=2.0))
    with pytest.raises(RecipeError) as caught:
        load_recipe(bad)
    assert field in str(caught.value) and f"{needs} = true" in str(caught.value)


def test_single_block_program_with_the_lever_compiles_and_matches_its_eager_region(monkeypatch, tmp_path):
    """A real AOTInductor program (CPU) of a single block with the lever and a bound LoRA: the op survives export
    as one node, compiles, and the program's output matches its eager region's as closely as without the lever."""
    block = SingleBlockProgram(monkeypatch, lora_down_from_fp8=True)
    assert block.targets().count("aotpack.lora_down_fp8.default") == 1  # proj_out's
    expected, actual, no_lora = block.run(tmp_path / "single.pt2")
    # FP8 roundings that Inductor's fusions move: 0.046 here, and 0.046 without the lever (the CPU FP8 package's
    # program bound is 0.1). The LoRA moves the block's output by about its own size, so a wrong scale or slice in
    # the op would be off by far more.
    assert relative_error(expected - no_lora, no_lora) > 0.5
    assert relative_error(actual.float(), expected.float()) < 0.1


def test_a_split_into_fp8_high_and_low_rows_keeps_a_to_its_second_rounding():

    generator = torch.Generator().manual_seed(6)
    a = (torch.randn(8, 96, generator=generator) * 96**-0.5).to(torch.bfloat16)
    a[5] = 0  # an unused rank
    a8, scale = fp8_hi_lo_rows(a)
    assert a8.dtype == torch.float8_e4m3fn and a8.shape == (16, 96) and scale.shape == (1, 16)
    rebuilt = a8[:8].float() * scale[0, :8, None] + a8[8:].float() * scale[0, 8:, None]
    assert torch.equal(rebuilt[5], torch.zeros(96))
    high_only = a8[:8].float() * scale[0, :8, None]
    assert relative_error(high_only, a.float()) > 0.01  # one FP8 rounding: ~2.5%
    assert relative_error(rebuilt, a.float()) < 2e-3  # the second takes it to ~2^-8 of that


def test_the_fp8_gemm_down_projection_equals_the_reference_to_a_bf16_rounding():
    from aotpack.models.lora_down_fp8 import gemm_fits, lora_down_fp8_gemm

    generator = torch.Generator().manual_seed(7)
    x = 3 * torch.randn(2, 5, 256, generator=generator)
    q, scale = quantize_rows(x.to(torch.bfloat16))
    a = (torch.randn(16, 256, generator=generator) * 256**-0.5).to(torch.bfloat16)
    u = lora_down_fp8_gemm(q, scale, a)
    reference = lora_down_fp8_reference(q, scale, a)
    assert u.shape == reference.shape == (2, 5, 16) and u.dtype == torch.bfloat16
    assert 0 < relative_error(u.float(), reference.float()) < 1e-2
    assert gemm_fits(16) and not gemm_fits(4)
    small = a[:4]  # a rank the GEMM does not take runs the op, here its reference
    assert torch.equal(lora_down_fp8_gemm(q, scale, small), lora_down_fp8_reference(q, scale, small))


def test_single_block_program_with_the_fp8_gemm_down_projection_matches_its_eager_region(monkeypatch, tmp_path):
    """The lever `lora_down_fp8_gemm` in a real AOTInductor program (CPU): proj_out's down-projection is one
    `_scaled_mm` (no Triton op left), and the program matches its eager region as the Triton op's does."""
    triton_op = SingleBlockProgram(monkeypatch, lora_down_from_fp8=True).targets()  # exported, not compiled
    block = SingleBlockProgram(monkeypatch, lora_down_from_fp8=True, lora_down_fp8_gemm=True)
    targets = block.targets()
    assert "aotpack.lora_down_fp8.default" in triton_op and "aotpack.lora_down_fp8.default" not in targets
    assert targets.count("aten._scaled_mm.default") == triton_op.count("aten._scaled_mm.default") + 1
    expected, actual, no_lora = block.run(tmp_path / "single.pt2")
    assert relative_error(expected - no_lora, no_lora) > 0.5
    assert relative_error(actual.float(), expected.float()) < 0.1


def test_the_two_down_projection_forms_of_a_are_not_both_chosen(tmp_path):
    from aotpack.recipes.recipe import load_recipe

    path = tmp_path / "both.toml"
    path.write_text(cpu_test_recipe("both", 'dtype = "bfloat16"\nquantization = "fp8_rowwise"\nmax_rank = 8\n'
                                            "fused_gelu_quant = true\nlora_down_from_fp8 = true\n"
                                            "lora_down_fp8_gemm = true\nlora_down_fp8_dots = true\n",
                                    tolerance=0.1, end_to_end=2.0))
    with pytest.raises(RecipeError, match="lora_down_fp8_dots = true cannot go with lora_down_fp8_gemm = true"):
        load_recipe(path)


def test_the_fp8_dot_down_projection_is_the_product_with_a_rebuilt_from_its_halves():
    """`lora_down_fp8_dots` (the op the lever `lora_down_fp8_dots` calls): u from A's FP8 halves is the product of the
    dequantized input with `A_hi s_hi + A_lo s_lo`, within A's second FP8 rounding of the bf16-A form's u."""
    from aotpack.models.lora_down_fp8 import lora_down_fp8_dots_reference

    generator = torch.Generator().manual_seed(8)
    x = (3 * torch.randn(2, 7, 256, generator=generator)).to(torch.bfloat16)
    q, scale = quantize_rows(x)
    a = (torch.randn(16, 256, generator=generator) * 256**-0.5).to(torch.bfloat16)
    a8, a_scale = fp8_hi_lo_rows(a)
    u = torch.ops.aotpack.lora_down_fp8_dots(q, scale, a8, a_scale, torch.bfloat16)
    assert u.shape == (2, 7, 16) and u.dtype == torch.bfloat16
    assert torch.equal(u, lora_down_fp8_dots_reference(q, scale, a8, a_scale, torch.bfloat16))  # the CPU op
    rebuilt = a8[:16].double() * a_scale[0, :16, None].double() + a8[16:].double() * a_scale[0, 16:, None].double()
    exact = (q.double() * scale.double()) @ rebuilt.T
    assert relative_error(u.double(), exact) < 4e-3  # one bf16 rounding of the output
    assert 0 < relative_error(u.float(), lora_down_fp8_reference(q, scale, a).float()) < 4e-3  # A's 2nd rounding
    assert torch.ops.aotpack.lora_down_fp8_dots(q, scale, a8, a_scale, torch.float16).dtype == torch.float16


def test_a_batch_of_a_splits_into_halves_as_each_alone():
    """The runtime splits the A's of one weight shape as one batch (runtime/a_halves_bank.py); the build's example
    inputs and eager runs split each alone: the same bits either way."""
    generator = torch.Generator().manual_seed(9)
    batch = (torch.randn(3, 8, 64, generator=generator) * 0.1).to(torch.bfloat16)
    batch[1, 4:] = 0  # a slot filled to rank 4
    halves, scales = fp8_hi_lo_rows(batch)
    assert halves.shape == (3, 16, 64) and scales.shape == (3, 1, 16)
    for a, a8, a_scale in zip(batch, halves, scales):
        alone = fp8_hi_lo_rows(a)
        assert torch.equal(a8.view(torch.uint8), alone[0].view(torch.uint8)) and torch.equal(a_scale, alone[1])


def test_single_block_program_with_fp8_dots_reads_a_halves_as_inputs_and_matches_its_eager_region(monkeypatch,
                                                                                                   tmp_path):
    """The lever `lora_down_fp8_dots` in a real AOTInductor program (CPU): proj_out's down-projection is the FP8-dot
    op over two more program inputs, A's halves (its A stays an input, unread), and the program matches its eager
    region, which splits A itself, as the Triton op's program does; the output moves from the Triton op's by A's
    second FP8 rounding only."""
    block = SingleBlockProgram(monkeypatch, lora_down_from_fp8=True, lora_down_fp8_dots=True)
    targets = block.targets()
    assert targets.count("aotpack.lora_down_fp8_dots.default") == 1 and "aotpack.lora_down_fp8.default" not in targets
    names = block.region.lora_names()
    assert names[names.index("proj_out.lora_B") + 1:][:2] == ["proj_out.lora_A_fp8", "proj_out.lora_A_fp8_scale"]
    assert not any(n.endswith("_fp8") for n in names if not n.startswith("proj_out."))  # only the marked slot
    assert block.lora["proj_out.lora_A_fp8"].dtype == torch.float8_e4m3fn
    expected, actual, no_lora = block.run(tmp_path / "single.pt2")
    assert relative_error(expected - no_lora, no_lora) > 0.5
    assert relative_error(actual.float(), expected.float()) < 0.1  # 0.046 here, as the Triton op's program
    triton_op, _, _ = SingleBlockProgram(monkeypatch, lora_down_from_fp8=True).run(tmp_path / "op.pt2")
    assert 0 < relative_error(expected.float(), triton_op.float()) < 3e-3  # 3.5e-4 here
    # the program reads the halves it is given, not its A: halves of another A move its output
    other = dict(block.lora)
    other["proj_out.lora_A_fp8"], other["proj_out.lora_A_fp8_scale"] = fp8_hi_lo_rows(-block.lora["proj_out.lora_A"])
    compiled = torch._inductor.aoti_load_package(str(tmp_path / "single.pt2"))
    with torch.no_grad():
        (flipped,) = compiled(*block.activations, other)
    assert relative_error(flipped.float(), actual.float()) > 0.1


def test_the_text_lever_marks_the_text_feed_forwards_for_the_fp8_dots_too(monkeypatch):
    """`lora_down_fp8_text`: the double blocks' `ff_context.net.2` read A's FP8 halves as well (without it their few
    text rows keep the bf16 copy); every marked slot lists the halves among its program inputs."""
    from aotpack.models.slots import reads_a_halves, slot_input_names

    transformer, _ = fp8_tiny_transformer(monkeypatch, 8)
    install_fused_gelu_quant(transformer, lora_down_from_fp8=True, lora_down_fp8_dots=True)
    text = [block.ff_context.net[2] for block in transformer.transformer_blocks]
    image = [block.ff.net[2] for block in transformer.transformer_blocks]
    assert not any(reads_fp8_input(layer) or reads_a_halves(layer) for layer in text)
    assert all(reads_a_halves(layer) for layer in image)
    install_fused_gelu_quant(transformer, lora_down_from_fp8=True, lora_down_fp8_dots=True, lora_down_fp8_text=True)
    assert all(reads_fp8_input(layer) and reads_a_halves(layer) for layer in text + image)
    assert slot_input_names("ff_context.net.2", text[0]) == (
        "ff_context.net.2.lora_A", "ff_context.net.2.lora_B", "ff_context.net.2.lora_A_fp8",
        "ff_context.net.2.lora_A_fp8_scale")
