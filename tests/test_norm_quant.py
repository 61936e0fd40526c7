"""`fused_norm_quant`: each Flux block norm + modulation quantized once for the FP8 linears that read it.

On the CPU the op runs its torch reference (the GPU runs a Triton kernel that the build checks against this
reference; scripts/check_norm_quant_kernel.py runs the kernel itself in Triton's interpreter). These tests
pin the reference to diffusers' AdaLN-Zero + torchao's quantization and the rewired blocks to the unfused
ones, bit for bit; the FP8 package built with the lever on is in test_fp8_cpu.py.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.normalization import AdaLayerNormZeroSingle
from reference import fp8_tiny_transformer

from aotpack.errors import RecipeError
from aotpack.models import norm_quant
from aotpack.models.fused_quant import QuantizedActivation, install_fused_gelu_quant, quantize_rows
from aotpack.models.norm_quant import (
    fuses_norm_quant,
    install_fused_norm_quant,
    kernel_errors,
    modulated_norm_quant,
    norm_modulate_quant_reference,
)
from aotpack.models.qk_norm_rope import install_fused_qk_norm_rope


def test_reference_is_diffusers_adaln_zero_then_torchao_quantization():
    generator = torch.Generator().manual_seed(0)
    norm = AdaLayerNormZeroSingle(32).to(torch.bfloat16)
    x = (3 * torch.randn(2, 5, 32, generator=generator) + 1).to(torch.bfloat16)
    temb = torch.randn(2, 32, generator=generator).to(torch.bfloat16)
    with torch.no_grad():
        expected, _ = norm(x, emb=temb)
        shift, scale, _ = norm.linear(norm.silu(temb)).chunk(3, dim=1)
        q, row_scale, h = torch.ops.aotpack.norm_modulate_quant(x, shift, scale, norm.norm.eps, True)
        _, _, nothing = torch.ops.aotpack.norm_modulate_quant(x, shift, scale, norm.norm.eps, False)
    assert torch.equal(h, expected)  # diffusers' own norm + modulation, bit for bit
    q_expected, scale_expected = quantize_rows(expected)
    assert torch.equal(q.view(torch.uint8), q_expected.view(torch.uint8)) and torch.equal(row_scale, scale_expected)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (2, 5, 32) and row_scale.shape == (2, 5, 1)
    assert torch.allclose(q.float().abs().amax(-1), torch.tensor(448.0))  # each row spans e4m3
    assert nothing.numel() == 0  # the modulated input is only written when a LoRA slot reads it
    # each batch row takes its own modulation
    other = norm_modulate_quant_reference(x[1:], shift[1:], scale[1:], norm.norm.eps, True)[2]
    assert torch.equal(other, h[1:]) and not torch.equal(h[0], norm_modulate_quant_reference(
        x[:1], shift[1:], scale[1:], norm.norm.eps, True)[2][0])
    assert kernel_errors("cpu") == {"kept_input": 0.0, "quantized_only": 0.0}  # the build's GPU check, on the CPU


def _fused_levers(transformer):
    install_fused_gelu_quant(transformer)
    install_fused_qk_norm_rope(transformer)


@pytest.mark.parametrize("rank", [0, 8])
def test_blocks_quantize_each_norm_once_and_keep_the_output(monkeypatch, rank):
    """Block regions with and without LoRA slots: one op call per norm (4 in a double block, 1 in a single
    block), the modulated input kept iff slots read it, the same parameter names and the same outputs as the
    blocks with the other levers only, bit for bit."""
    from aotpack.models.regions import DOUBLE_BLOCK, SINGLE_BLOCK, make_region

    transformer, _ = fp8_tiny_transformer(monkeypatch, rank)
    _fused_levers(transformer)
    names = [name for name, _ in transformer.named_parameters()]
    generator = torch.Generator().manual_seed(2)
    width = transformer.inner_dim
    hidden, encoder = (torch.randn(2, n, width, generator=generator).to(torch.bfloat16) for n in (64, 16))
    temb = torch.randn(2, width, generator=generator).to(torch.bfloat16)
    rotary = transformer.pos_embed(torch.randn(80, 3, generator=generator))
    double = make_region(transformer, DOUBLE_BLOCK, "transformer_blocks.1")
    single = make_region(transformer, SINGLE_BLOCK, "single_transformer_blocks.0")
    for region in (double, single):
        region.bind_lora = lambda lora: None  # keep the slots bound as fp8_tiny_transformer left them
    calls = []
    with torch.no_grad():
        before = [*double(hidden, encoder, temb, *rotary, None), *single(torch.cat([encoder, hidden], 1), temb,
                                                                         *rotary, None)]
        marked = install_fused_norm_quant(transformer)
        monkeypatch.setattr(norm_quant, "norm_modulate_quant_reference",
                            lambda *args, _ref=norm_modulate_quant_reference: calls.append(args) or _ref(*args))
        after = [*double(hidden, encoder, temb, *rotary, None), *single(torch.cat([encoder, hidden], 1), temb,
                                                                        *rotary, None)]
    assert marked == len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    assert all(fuses_norm_quant(b) for b in (*transformer.transformer_blocks, *transformer.single_transformer_blocks))
    assert [args[0].shape[1] for args in calls] == [64, 16, 64, 16, 80]  # norm1, norm1_context, norm2, ..., single
    assert all(args[4] == bool(rank) for args in calls)
    assert [name for name, _ in transformer.named_parameters()] == names
    for a, b in zip(after, before):
        assert torch.equal(a, b)


def test_a_quantized_activation_feeds_every_reader_without_quantizing_again(monkeypatch):
    """The linears read the one quantization: no torchao quantization op runs in them, and their outputs equal
    the plain calls' (which quantize the same input themselves)."""
    from aotpack.models.fused_quant import linear_output

    transformer, _ = fp8_tiny_transformer(monkeypatch, 8)
    block = transformer.single_transformer_blocks[0]
    x = torch.randn(1, 6, transformer.inner_dim, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    shift = scale = torch.zeros(1, transformer.inner_dim, dtype=torch.bfloat16)  # modulation: identity
    readers = (block.attn.to_q, block.proj_mlp)
    with torch.no_grad():
        quantized = modulated_norm_quant(block.norm.norm, x, shift, scale, readers)
        normed = block.norm.norm(x)
        assert isinstance(quantized, QuantizedActivation) and torch.equal(quantized.hidden, normed)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            outputs = [linear_output(layer, quantized) for layer in readers]
        assert [torch.equal(out, layer(normed)) for out, layer in zip(outputs, readers)] == [True, True]
    names = {e.name for e in profile.events()}
    assert "aten::_scaled_mm" in names and not any("amax" in name for name in names)


def test_lever_is_the_hopper_default_and_needs_the_other_levers(tmp_path, monkeypatch):
    from pathlib import Path

    from aotpack.recipes import recipe as recipes

    text = (Path(recipes.__file__).parent / "h200.toml").read_text()
    assert "\nfused_norm_quant = true\n" in text and recipes.load_recipe("h100").fused_norm_quant  # the default there
    # joined_qkv and lora_tails need it: without it the loader names the one left on (the tails here)
    refused = tmp_path / "refused.toml"
    refused.write_text(text.replace("\nfused_norm_quant = true\n", "\n").replace("\njoined_qkv = true\n", "\n"))
    with pytest.raises(RecipeError, match="lora_tails = true needs fused_norm_quant = true") as caught:
        recipes.load_recipe(refused)
    assert "set lora_tails = false" in str(caught.value)
    text = (text.replace("\nfused_norm_quant = true\n", "\n").replace("\njoined_qkv = true\n", "\n")
            .replace("\nlora_tails = true\n", "\n"))
    off = tmp_path / "off.toml"
    off.write_text(text)
    assert recipes.load_recipe(off).fused_norm_quant is False  # off unless a recipe turns it on
    on = tmp_path / "on.toml"
    on.write_text(text.replace("[shapes]", "fused_norm_quant = true\n[shapes]", 1))
    assert recipes.load_recipe(on).fused_norm_quant is True and recipes.load_recipe(on).to_json()["fused_norm_quant"]
    bad = tmp_path / "bad.toml"
    bad.write_text(on.read_text().replace("fused_qk_norm_rope = true", "fused_qk_norm_rope = false"))
    with pytest.raises(RecipeError) as caught:
        recipes.load_recipe(bad)
    assert all(word in str(caught.value) for word in ("fused_norm_quant", "fused_qk_norm_rope = true", str(bad)))
    transformer, _ = fp8_tiny_transformer(monkeypatch, 0)
    install_fused_gelu_quant(transformer)  # attentions left unfused: the install refuses, marking nothing
    with pytest.raises(RecipeError, match="fused_qk_norm_rope = true"):
        install_fused_norm_quant(transformer)
    assert not any(fuses_norm_quant(b) for b in transformer.transformer_blocks)
