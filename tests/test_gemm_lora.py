"""`lora_up_in_gemm`: each FP8 slot's bias and LoRA up-projection added in its GEMM's epilogue (models/gemm_lora.py).

On the CPU the op runs its torch reference (the GPU runs a persistent TMA Triton kernel that the build checks against
it, and `scripts/check_gemm_lora_kernel.py` runs it under Triton's interpreter); these tests pin that the reference is
the unfused path's math bit for bit, that the rewiring reaches every block linear (q/k/v, the attention outputs, both
MLP linears, in both block kinds), the recipe field's rules and a real AOTInductor program.
"""

from __future__ import annotations

import pytest
import torch
from reference import SingleBlockProgram, cpu_test_recipe, fp8_tiny_transformer, tiny_block_inputs, tiny_lever_run

from aotpack.errors import RecipeError
from aotpack.models import gemm_lora
from aotpack.models.examples import relative_error
from aotpack.models.fused_quant import install_fused_gelu_quant, install_lora_up_in_gemm
from aotpack.models.norm_quant import install_fused_norm_quant
from aotpack.models.qk_norm_rope import install_fused_qk_norm_rope


def test_reference_is_the_unfused_linear_and_the_kernel_check_runs_on_the_cpu():
    q, q_scale, weight, weight_scale, bias, u, b = gemm_lora.example_inputs(5, 64, 48, 16)
    y = torch.ops.aotpack.fp8_linear_lora(q, q_scale, weight, weight_scale, bias, u, b, True)
    base = torch._scaled_mm(q, weight.t(), scale_a=q_scale, scale_b=weight_scale.t(), out_dtype=torch.bfloat16)
    assert y.shape == (5, 48) and y.dtype == torch.bfloat16
    assert torch.equal(y, base + bias + torch.nn.functional.linear(u, b))  # rounded after each add, as the slot
    empty = bias[:0]
    assert torch.equal(torch.ops.aotpack.fp8_linear_lora(q, q_scale, weight, weight_scale, empty, u[:, :0], b[:0],
                                                         True), base)
    errors = gemm_lora.kernel_errors("cpu", rows=3)  # the build's GPU check, on the CPU: reference against itself
    assert set(errors) == {"qkv", "qkv_precise", "mlp_up", "mlp_up_precise", "proj_out", "proj_out_precise",
                           "no_lora", "no_lora_precise"} and not any(errors.values())


def test_kernel_takes_fp8_operands_power_of_two_ranks_and_aligned_rows():
    q, q_scale, weight, weight_scale, bias, u, b = gemm_lora.example_inputs(4, 64, 48, 16)
    assert gemm_lora.kernel_fits(q, weight, u, b) and gemm_lora.kernel_fits(q, weight, u[:, :0], b[:0])
    assert not gemm_lora.kernel_fits(q, weight, u[:, :8], b[:, :8])  # rank 8: under tl.dot's 16
    assert not gemm_lora.kernel_fits(q.float(), weight, u, b)  # not FP8
    assert not gemm_lora.kernel_fits(q, weight[:40], u, b[:40])  # N = 40: rows of 80 bytes, not 16-byte tiles
    assert not gemm_lora.kernel_fits(q, weight, u.float(), b)  # u and B in different dtypes


def _install_h200_kernels(transformer) -> None:
    install_fused_gelu_quant(transformer)
    install_fused_qk_norm_rope(transformer)
    install_fused_norm_quant(transformer)


@pytest.mark.parametrize("rank", [0, 16])
def test_lever_gives_the_unfused_outputs_bit_for_bit_at_every_block_linear(monkeypatch, rank):
    """The whole tiny transformer and a single block region with h200's kernels, with the lever against without: the
    same numbers (the CPU runs the op's reference, which is the unfused math), and the op called once for each
    block linear with a slot bound that the fused forwards run: 12 a double block, 5 a single block region."""
    transformer, outputs, calls = tiny_lever_run(monkeypatch, rank, gemm_lora, "reference")
    with torch.no_grad():
        _install_h200_kernels(transformer)
        plain = outputs(transformer)
        marked = install_lora_up_in_gemm(transformer, min_in_features=0)
        lever = outputs(transformer)
    assert marked == len([m for m in transformer.modules() if getattr(m, "lora_up_in_gemm", False)])
    assert (marked > 0) == (rank > 0)  # no slots at rank 0
    assert all(torch.equal(a, b) for a, b in zip(lever, plain))
    # the whole model runs diffusers' single block forward (its MLP linears as plain slots, q/k/v through the fused
    # processor); the single block region, as its program, runs all five through `linear_after_gelu` and the op
    per_model = 12 * len(transformer.transformer_blocks) + 3 * len(transformer.single_transformer_blocks)
    assert len(calls) == (per_model + 5 if rank else 0)  # unbound: never


def test_by_default_only_the_wide_input_linears_take_the_op(monkeypatch):
    """The default floor (`MIN_IN_FEATURES`, where the op beat cuBLAS) marks no linear of the tiny model, and a floor
    at the MLP's hidden width marks exactly the linears after the GELUs (ff.net.2, ff_context.net.2, proj_out)."""
    transformer, _ = fp8_tiny_transformer(monkeypatch, 16)
    assert install_lora_up_in_gemm(transformer) == 0
    hidden = transformer.transformer_blocks[0].ff.net[2].in_features
    marked = install_lora_up_in_gemm(transformer, min_in_features=hidden)
    names = [n for n, m in transformer.named_modules() if getattr(m, "lora_up_in_gemm", False)]
    assert marked == len(names) == 2 * len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    assert all(n.endswith(("ff.net.2", "ff_context.net.2", "proj_out")) for n in names)


def test_lever_without_the_fused_kernels_keeps_diffusers_forward(monkeypatch):
    """Marked slots in blocks that diffusers' own forward runs (no fused kernels): the slots' forward as before."""
    transformer, outputs, calls = tiny_lever_run(monkeypatch, 16, gemm_lora, "reference")
    with torch.no_grad():
        plain = outputs(transformer)
        install_lora_up_in_gemm(transformer, min_in_features=0)
        lever = outputs(transformer)
    assert all(torch.equal(a, b) for a, b in zip(lever, plain)) and not calls


def test_a_lora_in_another_dtype_keeps_the_unfused_path(monkeypatch):
    transformer, _ = fp8_tiny_transformer(monkeypatch, 16)
    inputs, *_ = tiny_block_inputs(transformer)
    _install_h200_kernels(transformer)
    install_lora_up_in_gemm(transformer, min_in_features=0)
    layer = transformer.single_transformer_blocks[0].attn.to_q
    layer.lora_A, layer.lora_B = layer.lora_A.float(), layer.lora_B.float()
    from aotpack.models.fused_quant import lora_up_in_gemm

    assert not lora_up_in_gemm(layer, torch.zeros(1, dtype=torch.bfloat16))
    with torch.no_grad():
        assert torch.isfinite(transformer(**inputs, return_dict=False)[0]).all()


@pytest.mark.parametrize("other", ["lora_down_from_fp8", "group_lora_up", "fused_gelu_lora"])
def test_recipe_field_needs_fp8_and_excludes_the_other_lora_levers(tmp_path, other):
    from aotpack.recipes.recipe import load_recipe

    fields = 'dtype = "bfloat16"\nmax_rank = 8\nlora_up_in_gemm = true\nfused_gelu_quant = true\n'
    good = tmp_path / "good.toml"
    good.write_text(cpu_test_recipe("good", fields + 'quantization = "fp8_rowwise"\ngroup_lora_down = true\n',
                                    tolerance=0.1, end_to_end=2.0))
    assert load_recipe(good).lora_up_in_gemm is True
    for name, extra, words in (("bf16", 'quantization = "none"\nfused_gelu_quant = false\n', "fp8_rowwise"),
                               ("both", f'quantization = "fp8_rowwise"\n{other} = true\n', other)):
        bad = tmp_path / f"{name}.toml"
        bad.write_text(cpu_test_recipe(name, fields.replace("fused_gelu_quant = true\n", "") + extra
                                       + ("fused_gelu_quant = true\n" if name == "both" else ""),
                                       tolerance=0.1, end_to_end=2.0))
        with pytest.raises(RecipeError) as caught:
            load_recipe(bad)
        assert "lora_up_in_gemm" in str(caught.value) and words in str(caught.value)


def test_single_block_program_with_the_lever_compiles_and_matches_its_eager_region(monkeypatch, tmp_path):
    """A real AOTInductor program (CPU) of a single block with h200's kernels and the lever, a LoRA bound: the op
    survives export as one node a slot, the down-projections still group, it compiles, and the program matches its
    eager region."""
    from aotpack.builder.lora_grouping import group_lora_down_projections

    def install(transformer):
        install_fused_qk_norm_rope(transformer)
        install_fused_norm_quant(transformer)
        install_lora_up_in_gemm(transformer, min_in_features=0)

    block = SingleBlockProgram(monkeypatch, install=install)
    assert block.targets().count("aotpack.fp8_linear_lora.default") == 5  # q, k, v, proj_mlp, proj_out
    assert group_lora_down_projections(block.program) == 3  # q/k/v/mlp read one input: one down GEMM for four
    expected, actual, no_lora = block.run(tmp_path / "single.pt2")
    assert relative_error(expected - no_lora, no_lora) > 0.5  # the LoRA moves the block: a lost delta would show
    assert relative_error(actual.float(), expected.float()) < 0.1  # FP8 roundings Inductor's fusions move (~0.05)


def test_package_scratch_is_scaled_by_the_program_count_for_the_persistent_kernel_only():
    """torch 2.11's AOTInductor allocates a device-made TMA descriptor's scratch for one program (builder/
    aoti_scratch.py): inside the context the persistent kernel's scratch is multiplied by its program count, other
    kernels' and kernels without scratch stay as they are, and torch's method comes back afterwards."""
    from aotpack.builder.aoti_scratch import scratch_for_every_program

    class Wrapper:  # stands in for torch's DeferredTritonCallWrapper
        def __init__(self, kernel_name):
            self.kernel_name = kernel_name

        def generate_launch_kernel(self, prefix, wrapper, kernel_var_name, params):
            return params

    original = Wrapper.generate_launch_kernel
    with scratch_for_every_program(Wrapper, programs=132):
        ours = Wrapper("fp8_linear_lora_kernel_0").generate_launch_kernel(None, None, "k", {"global_scratch": 640})
        other = Wrapper("triton_poi_fused_0").generate_launch_kernel(None, None, "k", {"global_scratch": 640})
        none = Wrapper("fp8_linear_lora_kernel_1").generate_launch_kernel(None, None, "k", {"global_scratch": None})
    assert ours["global_scratch"] == 640 * 132 and other["global_scratch"] == 640 and none["global_scratch"] is None
    assert Wrapper.generate_launch_kernel is original
