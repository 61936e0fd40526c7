"""`fused_gelu_quant`: GELU (+ concat) + row-wise FP8 quantization as one op feeding the FP8 linear.

On the CPU the op runs its torch reference (the GPU runs a Triton kernel that the build checks against
this reference); these tests pin the reference's numerics and the model rewiring. The FP8 build with
the lever on, validated and served, is in test_fp8_cpu.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import fp8_tiny_transformer, tiny_block_inputs

from aotpack.errors import RecipeError
from aotpack.models.examples import transformer_inputs
from aotpack.models.fused_quant import (
    FusedFeedForward,
    GeluIntoProjOut,
    gelu_quant_reference,
    install_fused_gelu_quant,
    kernel_errors,
)


def test_reference_quantizes_rows_of_the_concat_with_gelu():
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randn(2, 5, 8, generator=generator).to(torch.bfloat16)
    pre = (3 * torch.randn(2, 5, 24, generator=generator)).to(torch.bfloat16)
    pre[1, 2] = 0  # with the prefix row zeroed too: an all-zero row quantizes to zeros, not NaN
    prefix[1, 2] = 0
    none = pre.new_empty(0)
    q, scale, h = torch.ops.aotpack.gelu_quant_fp8(prefix, pre, none, none, True)
    assert torch.equal(h, torch.cat([prefix, F.gelu(pre, approximate="tanh")], -1))
    assert q.dtype == torch.float8_e4m3fn and q.shape == (2, 5, 32) and scale.shape == (2, 5, 1)
    assert torch.isfinite(scale).all() and (q[1, 2].float() == 0).all()
    rows = h.float().abs().amax(-1)
    assert torch.allclose(q.float().abs().amax(-1)[rows > 0], torch.tensor(448.0))  # each row spans e4m3
    dequantized = q.float() * scale
    # e4m3 keeps 3 mantissa bits: within half a step (2^-4 relative) of each normal value
    normal = h.float().abs() > 2 ** -6 * scale
    assert ((dequantized - h.float()).abs()[normal] <= 2 ** -4 * h.float().abs()[normal] + 1e-6).all()
    _, _, nothing = torch.ops.aotpack.gelu_quant_fp8(prefix, pre, none, none, False)
    assert nothing.numel() == 0  # the GELU output is only written when a LoRA slot reads it
    q2, scale2, _ = torch.ops.aotpack.gelu_quant_fp8(prefix[..., :0], pre, none, none, False)  # no prefix: GELU only
    assert q2.shape == (2, 5, 24) and torch.equal(q2.view(torch.uint8), gelu_quant_reference(
        prefix[..., :0], pre, none, none, False)[0].view(torch.uint8))
    # the preceding linear's epilogue: bias, then LoRA delta, each add rounded as the eager slot rounds it
    bias, delta = torch.randn(24, generator=generator).to(torch.bfloat16), torch.randn(2, 5, 24, generator=generator).to(torch.bfloat16)
    _, _, h3 = torch.ops.aotpack.gelu_quant_fp8(prefix, pre, bias, delta, True)
    assert torch.equal(h3, torch.cat([prefix, F.gelu((pre + bias) + delta, approximate="tanh")], -1))
    assert not torch.equal(h3, h)
    # the build's GPU check, on the CPU
    assert kernel_errors("cpu") == {"single_block": 0.0, "double_block": 0.0, "bare": 0.0}


@pytest.mark.parametrize("rank", [0, 8])
def test_rewired_transformer_keeps_names_and_output(monkeypatch, rank):
    """Eagerly, with and without LoRA slots: the same parameters under the same names, and the same output
    as the unfused FP8 model, bit for bit.
    The double blocks fuse wherever they run; a single block fuses in its program region (the whole
    model's eager forward runs diffusers' own, where `act_mlp` is the plain GELU)."""
    from aotpack.models.regions import SINGLE_BLOCK, make_region

    transformer, slots = fp8_tiny_transformer(monkeypatch, rank)
    names = [name for name, _ in transformer.named_parameters()]
    inputs, joint, temb, rotary = tiny_block_inputs(transformer)
    single = make_region(transformer, SINGLE_BLOCK, "single_transformer_blocks.1")
    lora = None
    calls = []
    with torch.no_grad():
        before = transformer(**inputs, return_dict=False)[0].float()
        _, single_before = single.body(hidden_states=joint, encoder_hidden_states=joint[:, :0], temb=temb,
                                       image_rotary_emb=rotary)
        routed = install_fused_gelu_quant(transformer)
        monkeypatch.setattr("aotpack.models.fused_quant.gelu_quant_reference",
                            lambda *args, _ref=gelu_quant_reference: calls.append(args[4]) or _ref(*args))
        after = transformer(**inputs, return_dict=False)[0].float()
        doubles = len(transformer.transformer_blocks)
        assert len(calls) == 2 * doubles  # ff and ff_context of every double block went through the op
        single.bind_lora = lambda lora: None  # keep the slots bound as _fp8_tiny left them
        (single_after,) = single(joint, temb, *rotary, lora)
    assert len(calls) == 2 * doubles + 1 and all(keep == bool(rank) for keep in calls)  # GELU kept iff slots read it
    assert routed == 2 * doubles + len(transformer.single_transformer_blocks)
    assert isinstance(transformer.transformer_blocks[0].ff, FusedFeedForward)
    assert isinstance(transformer.single_transformer_blocks[0].act_mlp, GeluIntoProjOut)
    assert [name for name, _ in transformer.named_parameters()] == names
    # bit for bit: the op's reference is torchao's own quantization (scale rounding included)
    assert torch.equal(after, before)
    assert torch.equal(single_after, single_before)


@pytest.mark.parametrize("rank", [0, 8])
def test_context_parallel_split_blocks_fuse_and_keep_the_output(monkeypatch, rank):
    """A context-parallel package's blocks (pre -> attention -> post): the single block's pre part hands
    the GELU's input to the post part, whose proj_out runs through the op; bit for bit the unfused output."""
    from aotpack.models.regions import PROLOGUE, make_region, prologue_arguments
    from aotpack.models.split_regions import SplitRegion, split_block_eager

    transformer, _ = fp8_tiny_transformer(monkeypatch, rank)
    monkeypatch.setattr(SplitRegion, "bind_lora", lambda self, lora: None)  # keep fp8_tiny_transformer's slots bound
    inputs = transformer_inputs(transformer.config, batch=1, image_tokens=64, text_tokens=16,
                                dtype=torch.bfloat16, device="cpu", generator=torch.Generator().manual_seed(1))
    calls = []
    with torch.no_grad():
        prologue = make_region(transformer, PROLOGUE)(*prologue_arguments(inputs), None)
        blocks = ((transformer.transformer_blocks[0], True), (transformer.single_transformer_blocks[0], False))
        before = [split_block_eager(block, double, *prologue) for block, double in blocks]
        install_fused_gelu_quant(transformer)
        monkeypatch.setattr("aotpack.models.fused_quant.gelu_quant_reference",
                            lambda *args, _ref=gelu_quant_reference: calls.append(args) or _ref(*args))
        after = [split_block_eager(block, double, *prologue) for block, double in blocks]
    assert len(calls) == 3  # the double block's ff and ff_context, the single block's proj_out
    prefix, pre, bias, delta, keep = calls[2]
    assert prefix.shape[-1] == transformer.inner_dim and bias.numel() == delta.numel() == 0 and keep == bool(rank)
    for outputs_before, outputs_after in zip(before, after):
        for b, a in zip(outputs_before, outputs_after):
            assert torch.equal(a, b)


def test_lever_needs_fp8_and_excludes_the_sigmoid_gelu(tmp_path):
    from pathlib import Path

    from aotpack.recipes import recipe as recipes

    text = (Path(recipes.__file__).parent / "h200.toml").read_text()
    assert "\nfused_gelu_quant = true\n" in text and recipes.load_recipe("h200").fused_gelu_quant is True  # the default there
    unfused = tmp_path / "unfused.toml"
    # fused_norm_quant and lora_down_from_fp8 need this lever (and joined_qkv, lora_tails need fused_norm_quant,
    # lora_down_fp8_dots needs lora_down_from_fp8): off with it
    unfused.write_text(text.replace("fused_gelu_quant = true", "fused_gelu_quant = false")
                       .replace("fused_norm_quant = true", "fused_norm_quant = false")
                       .replace("joined_qkv = true", "joined_qkv = false")
                       .replace("lora_down_from_fp8 = true", "lora_down_from_fp8 = false")
                       .replace("lora_down_fp8_dots = true", "lora_down_fp8_dots = false")
                       .replace("lora_tails = true", "lora_tails = false"))
    assert recipes.load_recipe(unfused).fused_gelu_quant is False
    # (without unquantized_linears, which quantization = "none" refuses first)
    no_fp8 = "\n".join(line for line in text.split("\n") if not line.startswith("unquantized_linears ="))
    no_fp8 = no_fp8.replace('quantization = "fp8_rowwise"', 'quantization = "none"')
    for bad_text, words in ((no_fp8, ["fused_gelu_quant", "fp8_rowwise", "'none'"]),
                            (text.replace("[shapes]", 'gelu_via_sigmoid = "all"\n[shapes]', 1),
                             ["gelu_via_sigmoid", "'all'", "fused_gelu_quant"])):
        bad = tmp_path / "bad.toml"
        bad.write_text(bad_text)
        with pytest.raises(RecipeError) as caught:
            recipes.load_recipe(bad)
        assert all(word in str(caught.value) for word in words) and str(bad) in str(caught.value)
