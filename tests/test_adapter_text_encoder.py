"""Text-encoder (CLIP) LoRA parts: applied to the eager CLIP encoder through PEFT, switched with the set."""

from __future__ import annotations

import lora_formats as formats
import pytest
import torch
from reference import REQUEST, reference_latents, rel_error

from aotpack.errors import AdapterLayerError
from aotpack.models.tiny import make_pipeline

TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def eager():
    return make_pipeline()


@pytest.fixture(scope="module")
def files(eager, tmp_path_factory):
    directory = tmp_path_factory.mktemp("te")
    clip = formats.clip_layers(eager.text_encoder)
    clip_only = formats.peft_with_alphas(eager.transformer, clip, seed=21, strength=1.5, patterns=())
    both = formats.peft_with_alphas(eager.transformer, clip, seed=22, patterns=("transformer_blocks.*",))
    # a CLIP part for a layer this CLIP does not have (PEFT would skip it silently)
    broken = dict(clip_only)
    broken["text_encoder.text_model.encoder.layers.7.self_attn.q_proj.lora_A.weight"] = torch.ones(2, 32)
    broken["text_encoder.text_model.encoder.layers.7.self_attn.q_proj.lora_B.weight"] = torch.ones(32, 2)
    return {
        "clip_only": formats.write(clip_only, directory / "clip-only.safetensors"),
        "both": formats.write(both, directory / "both.safetensors"),
        "transformer_only": formats.write(formats.peft_with_alphas(eager.transformer, seed=23),
                                          directory / "transformer-only.safetensors"),
        "broken_clip": formats.write(broken, directory / "broken-clip.safetensors"),
    }


def ours(served):
    with torch.no_grad():
        return served(**REQUEST, generator=torch.Generator("cpu").manual_seed(7), output_type="latent").images


def test_clip_only_adapter_matches_diffusers(files, served_tiny, eager):
    result = served_tiny.set_loras([(files["clip_only"], 0.9)])
    assert served_tiny.transformer.bank.used_rank and not any(served_tiny.transformer.bank.used_rank.values())
    theirs = reference_latents(eager, [(files["clip_only"], 0.9)])
    assert rel_error(ours(served_tiny), theirs) <= TOLERANCE
    assert rel_error(theirs, reference_latents(eager, [])) > 100 * TOLERANCE  # the CLIP part alone matters
    assert result.adapters == [("clip-only", 0.9)]


def test_switching_sets_switches_clip_parts(files, served_tiny, eager):
    """CLIP parts follow the active set: on, off, stacked with other weights, and back."""
    sets = [
        [(files["both"], 1.0)],
        [(files["transformer_only"], 1.0)],  # the CLIP LoRA of "both" must be off here
        [(files["clip_only"], 0.5), (files["both"], -0.7)],  # stacked CLIP parts vs set_adapters
        [],
        [(files["both"], 1.0)],  # back again, from the cache and the already injected PEFT adapter
    ]
    for loras in sets:
        served_tiny.set_loras(loras)
        error = rel_error(ours(served_tiny), reference_latents(eager, loras))
        assert error <= TOLERANCE, f"{loras}: {error:.2e}"


def test_rejected_clip_part_changes_nothing(files, served_tiny):
    served_tiny.set_loras([(files["both"], 0.8)])
    before = ours(served_tiny)
    with pytest.raises(AdapterLayerError, match="layers this text encoder does not have"):
        served_tiny.set_loras([(files["clip_only"], 1.0), (files["broken_clip"], 1.0)])
    assert torch.equal(ours(served_tiny), before)
    assert served_tiny.active == [("both", 0.8)]


def test_inactive_clip_adapters_are_pruned(files, served_tiny, eager, monkeypatch):
    """Injected CLIP adapters beyond KEEP_INACTIVE are deleted; switching back re-injects them correctly."""
    from aotpack.adapters import text_encoder

    monkeypatch.setattr(text_encoder, "KEEP_INACTIVE", 0)
    for name in ("clip_only", "both", "clip_only"):
        served_tiny.set_loras([(files[name], 0.6)])
        assert len(served_tiny.text_encoder_lora.loaded) == 1
        assert set(served_tiny.pipeline.text_encoder.peft_config) == set(served_tiny.text_encoder_lora.loaded.values())
    assert rel_error(ours(served_tiny), reference_latents(eager, [(files["clip_only"], 0.6)])) <= TOLERANCE
