"""`fused_qk_norm_rope`: each Flux attention's q/k epilogue, RMSNorm and RoPE as one op.

On the CPU the op runs its torch reference (the GPU runs a Triton kernel that the build checks against
this reference; scripts/check_qk_norm_rope_kernel.py runs the kernel itself in Triton's interpreter).
These tests pin the reference to diffusers' own processor and the rewiring to the unfused model, bit for
bit; the FP8 package built with the lever on is in test_fp8_cpu.py.
"""

from __future__ import annotations

import re

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb
from reference import fp8_tiny_transformer

from aotpack.errors import RecipeError
from aotpack.models import qk_norm_rope
from aotpack.models.examples import transformer_inputs
from aotpack.models.qk_norm_rope import install_fused_qk_norm_rope, kernel_errors, uses_fused_qk_norm_rope


def test_reference_is_diffusers_norm_concat_and_rope():
    generator = torch.Generator().manual_seed(0)
    heads, head_dim = 3, 16
    norm_text, norm_image = (torch.nn.RMSNorm(head_dim, eps=1e-6).to(torch.bfloat16) for _ in range(2))
    with torch.no_grad():
        for norm in (norm_text, norm_image):
            norm.weight.copy_(1 + 0.3 * torch.randn(head_dim, generator=generator))
    text, image = (3 * torch.randn(2, n, heads * head_dim, generator=generator).to(torch.bfloat16) for n in (5, 7))
    bias = torch.randn(heads * head_dim, generator=generator).to(torch.bfloat16)
    delta = torch.randn(2, 7, heads * head_dim, generator=generator).to(torch.bfloat16)
    angles = 5 * torch.randn(12, head_dim, generator=generator)
    cos, sin = angles.cos(), angles.sin()
    none = text.new_empty(0)
    got = torch.ops.aotpack.qk_norm_rope(text, none, none, norm_text.weight, image, bias, delta, norm_image.weight,
                                         cos, sin, 1e-6, head_dim)
    # diffusers' FluxAttnProcessor: norms per part, concat text first, then RoPE (image part: bias, then delta)
    expected = apply_rotary_emb(torch.cat([norm_text(text.unflatten(-1, (heads, head_dim))),
                                           norm_image(((image + bias) + delta).unflatten(-1, (heads, head_dim)))], 1),
                                (cos, sin), sequence_dim=1)
    assert got.shape == (2, 12, heads, head_dim) and torch.equal(got, expected)
    # a single block: no text part
    alone = torch.ops.aotpack.qk_norm_rope(image[:, :0], none, none, norm_text.weight, image, none, none,
                                           norm_image.weight, cos[:7], sin[:7], 1e-6, head_dim)
    assert torch.equal(alone, apply_rotary_emb(norm_image(image.unflatten(-1, (heads, head_dim))), (cos[:7], sin[:7]),
                                               sequence_dim=1))
    # the build's GPU check, on the CPU (y read in place as a column slice of a wider output: joined_qkv)
    assert kernel_errors("cpu") == {name: 0.0 for name in ("double_block", "double_block_strided", "double_block_fp8",
                                                           "single_block", "single_block_strided", "single_block_fp8")}


@pytest.mark.parametrize("rank", [0, 8])
def test_fused_attention_keeps_names_and_output(monkeypatch, rank):
    """Eagerly, with and without LoRA slots: same parameters, same output as diffusers' processor, bit for
    bit; every attention's q and k went through the op, and the split (context-parallel) blocks too."""
    from aotpack.models.regions import PROLOGUE, make_region, prologue_arguments
    from aotpack.models.split_regions import SplitRegion, split_block_eager

    transformer, _ = fp8_tiny_transformer(monkeypatch, rank)
    monkeypatch.setattr(SplitRegion, "bind_lora", lambda self, lora: None)  # keep fp8_tiny_transformer's slots bound
    names = [name for name, _ in transformer.named_parameters()]
    inputs = transformer_inputs(transformer.config, batch=2, image_tokens=64, text_tokens=16,
                                dtype=torch.bfloat16, device="cpu", generator=torch.Generator().manual_seed(1))
    blocks = ((transformer.transformer_blocks[0], True), (transformer.single_transformer_blocks[0], False))
    calls = []
    with torch.no_grad():
        prologue = make_region(transformer, PROLOGUE)(*prologue_arguments(inputs), None)
        before = transformer(**inputs, return_dict=False)[0]
        split_before = [split_block_eager(block, double, *prologue) for block, double in blocks]
        fused = install_fused_qk_norm_rope(transformer)
        monkeypatch.setattr(qk_norm_rope, "qk_norm_rope_reference",
                            lambda *args, _ref=qk_norm_rope.qk_norm_rope_reference: calls.append(args) or _ref(*args))
        after = transformer(**inputs, return_dict=False)[0]
        attentions = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
        assert fused == attentions and len(calls) == 2 * attentions
        split_after = [split_block_eager(block, double, *prologue) for block, double in blocks]
    assert len(calls) == 2 * attentions + 4
    text_y, _, text_delta, _, image_y, image_bias, image_delta, *_ = calls[0]  # the first double block's query
    assert text_y.shape[1] == 16 and image_y.shape[1] == 64 and image_bias.numel() > 0
    assert (image_delta.numel() > 0) == bool(rank) and (text_delta.numel() > 0) == bool(rank)
    assert all(uses_fused_qk_norm_rope(block.attn) for block, _ in blocks)
    assert [name for name, _ in transformer.named_parameters()] == names
    assert torch.equal(after, before)
    for outputs_before, outputs_after in zip(split_before, split_after):
        for b, a in zip(outputs_before, outputs_after):
            assert torch.equal(a, b)


def test_lever_is_a_recipe_field(tmp_path):
    from pathlib import Path

    from aotpack.recipes import recipe as recipes

    assert recipes.load_recipe("h200").fused_qk_norm_rope is True  # the default there (and in h100)
    text = re.sub(r"\nfused_qk_norm_rope = \w+\n", "\n", (Path(recipes.__file__).parent / "h200.toml").read_text())
    on = tmp_path / "on.toml"
    on.write_text(text.replace("[shapes]", "fused_qk_norm_rope = true\n[shapes]", 1))
    assert recipes.load_recipe(on).fused_qk_norm_rope is True and recipes.load_recipe(on).to_json()["fused_qk_norm_rope"]
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("[shapes]", "fused_qk_norm_rope = 1\n[shapes]", 1))
    with pytest.raises(RecipeError, match="fused_qk_norm_rope = 1 should be true or false"):
        recipes.load_recipe(bad)


def test_fused_processor_keeps_fp8_attention_and_its_norm_bound_scales():
    """With the opt-in FP8 attention (recipe attention = "cudnn_fp8"), the fused processor still routes
    attention through `aotpack::fp8_sdpa`, whose q/k scales read the attention module's norms: same output."""
    from aotpack.models.attention import attention_context
    from aotpack.models.tiny import make_transformer

    transformer = make_transformer()
    inputs = transformer_inputs(transformer.config, batch=1, image_tokens=64, text_tokens=16, dtype=torch.float32,
                                device="cpu", generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), attention_context(transformer, "cudnn_fp8"):
        unfused = transformer(**inputs, return_dict=False)[0]
        install_fused_qk_norm_rope(transformer)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            fused = transformer(**inputs, return_dict=False)[0]
    names = [e.name for e in profile.events()]
    assert names.count("aotpack::fp8_sdpa") == 4 and names.count("aotpack::qk_norm_rope") == 8
    assert torch.equal(fused, unfused)


@pytest.mark.parametrize("min_tokens", [0, 48, 200])
def test_fp8_qk_lever_writes_q_and_k_in_fp8_for_the_same_output(min_tokens):
    """`fp8_qk_in_norm_rope`: under FP8 attention the q/k op writes e4m3 at the norm-bound scales (no bf16 q/k
    for a separate quantization to read back), inside the FP8 branch when `fp8_attention_min_tokens` sets one;
    below the threshold the bf16 branch runs the bf16 op. Either way the output is the unquantized-q/k path's, bit
    for bit (80 tokens here: FP8 for thresholds 0 and 48, bf16 attention for 200)."""
    from aotpack.models.attention import attention_context
    from aotpack.models.tiny import make_transformer

    transformer = make_transformer()
    inputs = transformer_inputs(transformer.config, batch=1, image_tokens=64, text_tokens=16, dtype=torch.float32,
                                device="cpu", generator=torch.Generator().manual_seed(1))
    outputs, calls = {}, {}
    with torch.no_grad(), attention_context(transformer, "cudnn_fp8", fp8_min_tokens=min_tokens):
        for lever in (False, True):
            install_fused_qk_norm_rope(transformer, quantize_qk=lever)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                outputs[lever] = transformer(**inputs, return_dict=False)[0]
            names = [e.name for e in profile.events()]
            calls[lever] = {op: names.count(f"aotpack::{op}") for op in
                            ("qk_norm_rope", "qk_norm_rope_fp8", "fp8_sdpa", "bf16_sdpa")}
    fp8 = 80 >= min_tokens
    assert calls[False] == {"qk_norm_rope": 8, "qk_norm_rope_fp8": 0, "fp8_sdpa": 4 * fp8, "bf16_sdpa": 4 * (not fp8)}
    assert calls[True] == {"qk_norm_rope": 8 * (not fp8), "qk_norm_rope_fp8": 8 * fp8, "fp8_sdpa": 4 * fp8,
                           "bf16_sdpa": 4 * (not fp8)}
    assert torch.equal(outputs[True], outputs[False])


def test_fp8_qk_op_is_the_bf16_op_quantized_at_the_given_scale():
    generator = torch.Generator().manual_seed(2)
    width, head_dim = 4 * 32, 32

    def part(tokens):  # GEMM output, bias, LoRA delta, norm weight
        shapes = ((2, tokens, width), (width,), (2, tokens, width))
        return ([torch.randn(shape, generator=generator).bfloat16() for shape in shapes]
                + [(1 + torch.randn(head_dim, generator=generator)).bfloat16()])

    angles = torch.randn(5 + 9, head_dim, generator=generator)
    args = part(5) + part(9) + [angles.cos(), angles.sin()]
    bf16 = torch.ops.aotpack.qk_norm_rope(*args, 1e-6, head_dim)
    descale = (bf16.float().abs().amax() / 600).reshape(1, 1, 1, 1)  # values up to 600: the largest saturate
    q8 = torch.ops.aotpack.qk_norm_rope_fp8(*args, descale, 1e-6, head_dim)
    assert q8.dtype == torch.float8_e4m3fn and q8.shape == bf16.shape == (2, 14, 4, head_dim)
    expected = (bf16.float() / descale).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(q8.view(torch.uint8), expected.view(torch.uint8))
    assert q8.float().abs().max() == 448  # saturated, not inf/nan


def test_fp8_qk_lever_is_a_recipe_field_that_needs_fp8_attention(tmp_path):
    from pathlib import Path

    from aotpack.recipes import recipe as recipes

    assert recipes.load_recipe("h200").fp8_qk_in_norm_rope is True  # the default there (and in h100) since 2026-12-06
    text = (Path(recipes.__file__).parent / "h200.toml").read_text().replace("\nfp8_qk_in_norm_rope = true\n", "\n")
    off = tmp_path / "off.toml"
    off.write_text(text)
    assert recipes.load_recipe(off).fp8_qk_in_norm_rope is False  # off unless a recipe turns it on
    on = tmp_path / "on.toml"
    on.write_text(text.replace("[shapes]", "fp8_qk_in_norm_rope = true\n[shapes]", 1))
    recipe = recipes.load_recipe(on)
    assert recipe.fp8_qk_in_norm_rope and recipe.to_json()["fp8_qk_in_norm_rope"]
    assert recipe.replace(attention="cudnn").fp8_qk_in_norm_rope is False  # the build's --attention cudnn
    for old, new in (('attention = "cudnn_fp8"', 'attention = "cudnn"'),
                     ("fused_qk_norm_rope = true", "fused_qk_norm_rope = false")):
        bad = tmp_path / "bad.toml"
        edited = on.read_text().replace(old, new, 1).replace("fp8_attention_min_tokens = 4096\n", "")
        edited = edited.replace("fused_norm_quant = true", "fused_norm_quant = false")
        bad.write_text(edited)
        with pytest.raises(RecipeError, match="fp8_qk_in_norm_rope = true needs fused_qk_norm_rope = true and "
                                              "attention"):
            recipes.load_recipe(bad)
