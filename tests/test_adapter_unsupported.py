"""What a LoRA slot cannot hold is refused with a message listing the parts, never dropped silently;
all-zero additive parts (no effect), and bias / norm deltas that diffusers never applies, are dropped with a note."""

from __future__ import annotations

import lora_formats as formats
import pytest
import torch
from reference import REQUEST, reference_latents, rel_error

from aotpack.adapters import parse_adapter
from aotpack.errors import AdapterFormatError, AdapterShapeError
from aotpack.models.tiny import make_pipeline


@pytest.fixture(scope="module")
def eager():
    return make_pipeline()


def _peft(eager, **kwargs):
    return formats.peft_with_alphas(eager.transformer, patterns=("transformer_blocks.0.attn.to_*",), **kwargs)


def _kohya(eager):
    return formats.kohya(dict(eager.transformer.config), skip=("linear1",))


# name -> (state dict maker, words the refusal must contain); the makers add one kind of part each
REFUSED = {
    "dora_peft": (lambda e: {**_peft(e), "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector":
                             torch.ones(32)}, "DoRA magnitude vectors"),
    # diffusers' own loader filters `dora_scale` away with only a log message
    "dora_kohya": (lambda e: {**_kohya(e), "lora_unet_double_blocks_0_img_attn_proj.dora_scale": torch.ones(1, 32)},
                   "DoRA magnitude vectors"),
    "lokr": (lambda e: {"lora_unet_double_blocks_0_img_attn_proj.lokr_w1": torch.ones(4, 4),
                        "lora_unet_double_blocks_0_img_attn_proj.lokr_w2": torch.ones(8, 8)}, "LoKr"),
    "loha": (lambda e: {f"lora_unet_double_blocks_0_img_attn_proj.hada_w{i}_{ab}": torch.ones(4, 32)
                        for i in (1, 2) for ab in "ab"}, "LoHa"),
    "lora_bias": (lambda e: _peft(e, lora_bias="nonzero"), "LoRA biases"),
    "linear_diff": (lambda e: {**_kohya(e), "diffusion_model.double_blocks.0.img_attn.proj.diff":
                               torch.full((32, 32), 0.1)}, "full weight deltas (diff)"),
    "control_norm_scales": (lambda e: {**_peft(e), "double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(16)},
                            "norm scale replacements"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_slot_incompatible_parts_are_refused_by_name(case, eager, tmp_path):
    make, words = REFUSED[case]
    path = formats.write(make(eager), tmp_path / f"{case}.safetensors")
    with pytest.raises(AdapterFormatError) as caught:
        parse_adapter(path)
    message = str(caught.value)
    assert "cannot represent" in message and words in message and "fix:" in message


def test_control_lora_input_expansion_is_refused(eager, tmp_path, served_tiny):
    state = _peft(eager)
    state["transformer.x_embedder.lora_A.weight"] = torch.randn(4, 32)  # 2x the 16 input channels
    state["transformer.x_embedder.lora_B.weight"] = torch.randn(32, 4)
    path = formats.write(state, tmp_path / "control.safetensors")
    with pytest.raises(AdapterShapeError, match="Control-LoRA input expansion"):
        served_tiny.set_loras([path])


@pytest.mark.parametrize("part", ["lora_bias", "diff_b"])
def test_all_zero_additive_parts_are_dropped_with_a_note(part, eager, tmp_path, served_tiny):
    config = dict(eager.transformer.config)
    state = _peft(eager, lora_bias="zero") if part == "lora_bias" else \
        formats.comfyui(config, diff_b="zero", skip=("linear1",))
    path = formats.write(state, tmp_path / f"zero-{part}.safetensors")
    result = served_tiny.set_loras([(path, 1.0)])
    assert any("all-zero" in note and "no effect" in note for note in result.notes)
    with torch.no_grad():
        ours = served_tiny(**REQUEST, generator=torch.Generator("cpu").manual_seed(7), output_type="latent").images
    theirs = reference_latents(eager, [(path, 1.0)])
    assert rel_error(ours, theirs) <= 1e-3
    assert rel_error(theirs, reference_latents(eager, [])) > 0.1


# ComfyUI's LoRA extraction writes bias deltas and norm weight deltas by default; diffusers' load_lora_weights drops
# them (an info log line) and loads the factors
DROPPED_BY_DIFFUSERS = {
    "diff_b": (lambda e: formats.comfyui(dict(e.transformer.config), diff_b="nonzero", skip=("linear1",)),
               "bias deltas (diff_b)"),
    "norm_diff": (lambda e: {**formats.comfyui(dict(e.transformer.config), skip=("linear1",)),
                             "diffusion_model.double_blocks.0.img_attn.norm.query_norm.diff": torch.full((16,), 0.1),
                             "diffusion_model.double_blocks.0.txt_attn.norm.key_norm.scale.diff":
                                 torch.full((16,), 0.1)}, "norm weight deltas (diff)"),
}


@pytest.mark.parametrize("case", sorted(DROPPED_BY_DIFFUSERS))
def test_nonzero_parts_diffusers_drops_are_dropped_with_a_note(case, eager, tmp_path):
    make, words = DROPPED_BY_DIFFUSERS[case]
    path = formats.write(make(eager), tmp_path / f"{case}.safetensors")
    adapter = parse_adapter(path)
    assert formats.delta_error(adapter, formats.peft_deltas(eager, path)) <= 1e-6
    assert any(words in note and "non-zero" in note and "not applied" in note for note in adapter.notes), adapter.notes
