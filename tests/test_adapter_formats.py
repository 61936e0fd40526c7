"""Every width-independent Flux LoRA layout, parsed through diffusers' converters, against diffusers' eager
`FluxPipeline` + `load_lora_weights` on the same file and seed (the tiny model's package).

Layouts whose converters hard-code Flux.1 widths (kohya/ComfyUI `single_blocks_*_linear1`) run on
a Flux-width model in `test_adapter_flux_width.py`.
"""

from __future__ import annotations

import json
import re

import lora_formats as formats
import pytest
import torch
from reference import REQUEST, reference_latents, rel_error

from aotpack.adapters import parse_adapter
from aotpack.errors import AdapterFormatError
from aotpack.models.tiny import make_pipeline

TOLERANCE = 1e-3  # issue 3: latents relative error vs diffusers on the CPU


@pytest.fixture(scope="module")
def eager():
    return make_pipeline()


@pytest.fixture(scope="module")
def files(eager, tmp_path_factory):
    """One file per layout, written with the layout's original keys."""
    directory = tmp_path_factory.mktemp("formats")
    config, clip = dict(eager.transformer.config), formats.clip_layers(eager.text_encoder)
    return {
        "xlabs": formats.write(formats.xlabs(config, seed=1), directory / "xlabs.safetensors"),
        "mixture": formats.write(formats.mixture(eager.transformer, clip, seed=2), directory / "mixture.safetensors"),
        "ai_toolkit_alphas_mixed_ranks": formats.write(formats.peft_with_alphas(eager.transformer, clip, seed=3),
                                                       directory / "peft.safetensors"),
        "diffusers_saved_metadata": formats.diffusers_saved(eager.transformer, clip, directory / "saved", seed=4),
        # kohya without single_blocks linear1 (its split needs Flux.1 widths): blocks, embedders, final
        # layer, CLIP (lora_te1_) and T5 (lora_te3_) parts.
        "kohya_no_linear1": formats.write(formats.kohya(config, clip, seed=5, skip=("linear1",), t5_blocks=1),
                                          directory / "kohya.safetensors"),
    }


def our_latents(served, loras, **kwargs):
    result = served.set_loras(loras, **kwargs)
    with torch.no_grad():
        latents = served(**REQUEST, generator=torch.Generator("cpu").manual_seed(7), output_type="latent").images
    return latents, result


@pytest.mark.parametrize("layout", ["xlabs", "mixture", "ai_toolkit_alphas_mixed_ranks", "diffusers_saved_metadata",
                                    "kohya_no_linear1"])
def test_layout_matches_diffusers(layout, files, served_tiny, eager):
    ours, result = our_latents(served_tiny, [(files[layout], 0.8)])
    theirs = reference_latents(eager, [(files[layout], 0.8)])
    error, effect = rel_error(ours, theirs), rel_error(theirs, reference_latents(eager, []))
    print(f"{layout}: rel. error {error:.2e}, LoRA effect {effect:.2e}, notes {result.notes}")
    assert error <= TOLERANCE
    assert effect > 100 * TOLERANCE  # the adapter must matter, or the comparison proves nothing


def test_notes_report_what_diffusers_drops(files, served_tiny):
    notes = " | ".join(served_tiny.set_loras([files["mixture"]]).notes)
    assert "lora_unet_extra_layer" in notes and "non-zero" in notes  # mixture converter discards lora_unet_ keys
    notes = " | ".join(served_tiny.set_loras([files["kohya_no_linear1"]]).notes)
    assert "T5" in notes and "lora_te3_" in notes
    # diffusers' kohya converter emits embedders and the final layer without the "transformer." prefix,
    # so load_lora_weights never loads them: reported, and left out exactly like diffusers does.
    assert "lora_unet_img_in" in notes or "lora_unet_final_layer" in notes or "lora_unet_guidance_in" in notes
    assert served_tiny.set_loras([files["xlabs"]]).notes == []


def test_stack_of_layouts_matches_set_adapters(files, served_tiny, eager):
    """Three layouts stacked (with CLIP parts from two of them) against diffusers' set_adapters."""
    loras = [(files["xlabs"], 0.7), (files["mixture"], 1.2), (files["ai_toolkit_alphas_mixed_ranks"], -0.5)]
    ours, _ = our_latents(served_tiny, loras)
    theirs = reference_latents(eager, loras)
    error, effect = rel_error(ours, theirs), rel_error(theirs, reference_latents(eager, loras[:1]))
    print(f"stack of layouts: rel. error {error:.2e}, effect of the 2nd and 3rd {effect:.2e}")
    assert error <= TOLERANCE
    assert effect > 100 * TOLERANCE


# Files diffusers loads, parsed layer by layer against its PEFT model (diffusers' load_lora_weights on the tiny
# model): the deltas must match, not merely load.
DELTA_TOLERANCE = 1e-6  # float32 products of the same factors


def _renamed(state, **renames):
    """`state` with factor names replaced, e.g. lora_A="lora_down"."""
    renamed = {}
    for key, value in state.items():
        for old, new in renames.items():
            key = key.replace(f".{old}.", f".{new}.")
        renamed[key] = value
    return renamed


def _peft(eager, with_alphas=True):
    state = formats.peft_with_alphas(eager.transformer, patterns=("transformer_blocks.0.*",), seed=11)
    return state if with_alphas else {k: v for k, v in state.items() if not k.endswith(".alpha")}


def _factors_as(state, dtype):
    return {k: v if k.endswith(".alpha") else v.to(dtype) for k, v in state.items()}


LOADED_LIKE_DIFFUSERS = {
    # factors stored as float8: PEFT copies them into float32 LoRA weights
    "float8_e4m3fn": lambda e: _factors_as(_peft(e), torch.float8_e4m3fn),
    "float8_e5m2": lambda e: _factors_as(_peft(e), torch.float8_e5m2),
    # kohya factor names under transformer.<diffusers name>, with alphas (mixed ranks): diffusers' kohya converter
    # renames the factors and leaves the alphas, which load_lora_weights ignores (scale 1)
    "transformer_lora_down_with_alphas": lambda e: _renamed(_peft(e), lora_A="lora_down", lora_B="lora_up"),
    # a PEFT file with alphas plus stray kohya keys: the same converter, so again no alpha is applied
    "peft_alphas_and_stray_lora_down": lambda e: {**_peft(e), **formats.kohya(dict(e.transformer.config),
                                                                                skip=("linear1",))},
    # old diffusers names, converted by load_lora_adapter's convert_unet_state_dict_to_peft
    "old_diffusers_lora_down_up": lambda e: _renamed(_peft(e, with_alphas=False), lora_A="lora.down",
                                                     lora_B="lora.up"),
}


@pytest.mark.parametrize("case", sorted(LOADED_LIKE_DIFFUSERS))
def test_file_loads_with_diffusers_deltas(case, eager, tmp_path):
    path = formats.write(LOADED_LIKE_DIFFUSERS[case](eager), tmp_path / f"{case}.safetensors")
    adapter = parse_adapter(path)
    assert formats.delta_error(adapter, formats.peft_deltas(eager, path)) <= DELTA_TOLERANCE
    if "alphas" in case:  # the unapplied alphas are reported
        assert any("alpha keys not applied" in note and ".alpha" in note for note in adapter.notes), adapter.notes


def test_misnamed_note_cites_its_own_example(eager, tmp_path):
    """kohya embedders and final layer convert to names load_lora_weights does not load; the note's example
    and the converted name it quotes are the same module's."""
    path = formats.write(formats.kohya(dict(eager.transformer.config), skip=("linear1", "_mod.lin", "attn.qkv")),
                         tmp_path / "kohya.safetensors")
    converted_to = {"final_layer_adaLN_modulation_1": "norm_out.linear", "final_layer_linear": "proj_out",
                    "img_in": "x_embedder", "txt_in": "context_embedder",
                    "time_in": "time_text_embed.timestep_embedder", "vector_in": "time_text_embed.text_embedder",
                    "guidance_in": "time_text_embed.guidance_embedder"}
    (note,) = [n for n in parse_adapter(path).notes if "does not load" in n]
    example, name = re.search(r"e\.g\. (\S+) \(.*this one to (\S+)\)", note).groups()
    module = next(m for m in converted_to if f"lora_unet_{m}." in example)
    assert name.startswith(converted_to[module] + "."), note


@pytest.mark.parametrize("prefix", ["diffusion_model.", "lora_unet_"])
def test_kohya_module_names_with_peft_factor_names_are_refused_for_what_they_are(prefix, eager, tmp_path):
    """diffusers loads nothing from such a file (silently); the refusal says why instead of 'not a Flux LoRA'."""
    from diffusers import FluxPipeline

    state = {}
    for name, (down, up, _) in formats.kohya_style(dict(eager.transformer.config), skip=("linear1",))[0].items():
        key = prefix + (name if prefix == "diffusion_model." else name.replace(".", "_"))
        state.update({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up})
    path = formats.write(state, tmp_path / "mixed-naming.safetensors")
    assert not any(k.startswith(("transformer.", "text_encoder.")) for k in FluxPipeline.lora_state_dict(str(path)))
    with pytest.raises(AdapterFormatError) as caught:
        parse_adapter(path)
    message = str(caught.value)
    assert prefix in message and ".lora_A.weight" in message and "lora_down" in message
    assert "SD/SDXL" not in message


def test_metadata_and_alphas_together_are_refused_as_diffusers_refuses_them(eager, tmp_path):
    metadata = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 16})}
    path = formats.write(_peft(eager), tmp_path / "both.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match="Both `network_alphas` and `metadata`"):
        eager.load_lora_weights(str(path), adapter_name="both")  # raises before anything is loaded
    with pytest.raises(AdapterFormatError) as caught:
        parse_adapter(path)
    message = str(caught.value)
    assert "lora_adapter_metadata" in message and "transformer.transformer_blocks.0." in message
    assert ".alpha" in message and "fix:" in message


def test_mixture_block_modules_diffusers_cannot_map_are_refused(eager, tmp_path):
    """diffusers' mixture converter maps a block's ff / proj_mlp / proj_out / norm LoRAs onto the block's own
    name, where they overwrite each other (its load_lora_weights then fails with a KeyError)."""
    state = formats.mixture(eager.transformer, seed=12, unet_keys=False)
    down, up = formats.Factors(13, 0.3)(32, 128, 4)
    state.update({"lora_transformer_single_transformer_blocks_0_proj_mlp.lora_down.weight": down,
                  "lora_transformer_single_transformer_blocks_0_proj_mlp.lora_up.weight": up,
                  "lora_transformer_single_transformer_blocks_0_proj_mlp.alpha": torch.tensor(4.0)})
    path = formats.write(state, tmp_path / "mixture-ff.safetensors")
    with pytest.raises(AdapterFormatError) as caught:
        parse_adapter(path)
    message = str(caught.value)
    assert "lora_transformer_single_transformer_blocks_0_proj_mlp" in message
    assert "block name single_transformer_blocks.0," in message and "cannot map" in message
