"""A diffusers-format pipeline directory we did not shape (other depths/widths, no guidance embedding)
with a LoRA saved by diffusers/PEFT themselves; and the whole-program layout with a narrowed slot set."""

from __future__ import annotations

import zipfile

import pytest
import torch
from click.testing import CliRunner
from reference import REQUEST, cpu_test_recipe, latents, reference_latents, rel_error
from safetensors.torch import load_file

from aotpack.builder.build import build_package
from aotpack.cli import cli
from aotpack.errors import AdapterLayerError, AdapterRankError, UnsupportedCallError
from aotpack.store.manifest import read_manifest

TOLERANCE = 1e-3

OTHER_CONFIG = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=3, attention_head_dim=16,
                    num_attention_heads=3, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
                    axes_dims_rope=(4, 6, 6))


@pytest.fixture(scope="module")
def other_pipeline_dir(tmp_path_factory):
    """A schnell-like tiny pipeline (1 double + 3 single blocks, width 48, no guidance) saved by diffusers."""
    from diffusers import FluxTransformer2DModel

    from aotpack.models.tiny import make_pipeline

    torch.manual_seed(7)
    transformer = FluxTransformer2DModel(**OTHER_CONFIG).eval()
    directory = tmp_path_factory.mktemp("other") / "pipeline"
    make_pipeline(transformer=transformer).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def peft_lora(other_pipeline_dir, tmp_path_factory):
    """A LoRA made by PEFT (`add_adapter`, random B) and written by `FluxPipeline.save_lora_weights`."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = FluxTransformer2DModel.from_pretrained(other_pipeline_dir / "transformer")
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out", "ff.net.2"])
    torch.manual_seed(3)
    transformer.add_adapter(config, adapter_name="someone_elses")
    directory = tmp_path_factory.mktemp("peft-lora")
    FluxPipeline.save_lora_weights(directory, transformer_lora_layers=get_peft_model_state_dict(
        transformer, adapter_name="someone_elses"), transformer_lora_adapter_metadata=config.to_dict())
    return directory / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def other_package(other_pipeline_dir, tmp_path_factory):
    # no_slot_programs = false: half the programs to compile (their path is covered by test_no_slot_programs);
    # with no LoRA live the slotted programs run, checked below
    return build_package(str(other_pipeline_dir), "cpu", out=tmp_path_factory.mktemp("pkg") / "other",
                         no_slot_programs=False, progress=False)


def test_package_of_another_model_matches_diffusers(other_package, other_pipeline_dir, peft_lora, tmp_path):
    from diffusers import FluxPipeline

    import aotpack

    manifest = read_manifest(other_package)
    assert manifest.model["config"]["num_single_layers"] == 3 and not manifest.model["config"]["guidance_embeds"]
    assert [len(p.instances) for p in manifest.programs] == [1, 1, 3, 1]  # no no-slot variants (fixture)
    assert manifest.recipe["no_slot_programs"] is False
    out = tmp_path / "lat.safetensors"
    result = CliRunner().invoke(cli, [
        "run", str(other_package), "--model", str(other_pipeline_dir), "--prompt", REQUEST["prompt"],
        "--steps", "3", "--height", "64", "--width", "64", "--max-sequence-length", "16", "--seed", "7",
        "--lora", f"{peft_lora}:0.9", "--save-latents", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    reference = FluxPipeline.from_pretrained(other_pipeline_dir)
    reference.set_progress_bar_config(disable=True)
    expected = reference_latents(reference, [(peft_lora, 0.9)])
    assert rel_error(load_file(str(out))["latents"], expected) <= TOLERANCE
    no_lora = reference_latents(reference, [])
    assert rel_error(expected, no_lora) > 100 * TOLERANCE
    # without no-slot programs, no LoRA runs the slotted programs with empty slots: still diffusers' output
    served = aotpack.load(str(other_package), model=str(other_pipeline_dir))
    assert served.transformer.bank.is_empty
    assert rel_error(latents(served), no_lora) <= TOLERANCE and served.transformer.last_variant == "slots"


def test_package_size_does_not_grow_with_the_weights(other_package, other_pipeline_dir):
    """Weights stay out of the package: the programs are code only."""
    weight_bytes = sum(p.stat().st_size for p in (other_pipeline_dir / "transformer").glob("*.safetensors"))
    for name in read_manifest(other_package).files:
        with zipfile.ZipFile(other_package / name) as archive:
            data = [i for i in archive.infolist() if not i.filename.endswith((".so", ".cpp", ".json"))]
            assert sum(i.file_size for i in data) < 64_000, [i.filename for i in data]
    assert weight_bytes > 0


@pytest.fixture(scope="module")
def whole_package(tmp_path_factory):
    """The tiny model as one whole program, slots only in the blocks, max_rank 8."""
    return build_package("tiny", "cpu", out=tmp_path_factory.mktemp("pkg") / "whole", layout="whole",
                         slots=["transformer_blocks.*", "single_transformer_blocks.*"], max_rank=8,
                         no_slot_programs=False, progress=False)  # the whole program alone: CI time


def _write_lora(path, patterns, rank, seed):
    from safetensors.torch import save_file

    from aotpack.demo import random_lora_state_dict
    from aotpack.models.tiny import make_transformer

    save_file(random_lora_state_dict(make_transformer(), rank, patterns, seed=seed), str(path))
    return path


def test_whole_layout_with_narrowed_slots(whole_package, tmp_path):
    import aotpack
    from aotpack.models.tiny import make_pipeline

    manifest = read_manifest(whole_package)
    assert [p.name for p in manifest.programs] == ["whole"]
    assert all(s.name.startswith(("transformer_blocks.", "single_transformer_blocks.")) for s in manifest.slots)
    block_lora = _write_lora(tmp_path / "blocks.safetensors", ["*transformer_blocks.*"], rank=4, seed=1)
    served = aotpack.load(whole_package, model="tiny")
    served.set_loras([(block_lora, 1.1)])
    with torch.no_grad():
        ours = latents(served)
    reference = make_pipeline()
    assert rel_error(ours, reference_latents(reference, [(block_lora, 1.1)])) <= TOLERANCE

    # Rejected adapters leave the active set exactly as it was.
    embedder_lora = _write_lora(tmp_path / "embedder.safetensors", ["x_embedder", "proj_out"], rank=4, seed=2)
    with pytest.raises(AdapterLayerError) as err:
        served.set_loras([(block_lora, 1.1), (embedder_lora, 1.0)])
    assert "x_embedder" in str(err.value) or "proj_out" in str(err.value)
    assert "--slots" in str(err.value)
    too_big = _write_lora(tmp_path / "rank12.safetensors", ["transformer_blocks.0.attn.to_q"], rank=12, seed=3)
    with pytest.raises(AdapterRankError) as err:
        served.set_loras([too_big])
    assert "transformer_blocks.0.attn.to_q" in str(err.value) and "12" in str(err.value)
    assert "max_rank 8" in str(err.value)
    with torch.no_grad():
        assert torch.equal(latents(served), ours)


def test_t5_nf4_policy_needs_bitsandbytes_and_says_so(other_pipeline_dir):
    """The rtx4090 recipe's 24 GB policy loads T5 in NF4; without bitsandbytes (this CPU machine) the
    pipeline refuses with the fix instead of silently loading T5 in full precision."""
    import importlib.util

    from aotpack.errors import ModelSourceError
    from aotpack.models.checkpoint import load_pipeline, parse_model_ref

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed; this test covers the refusal without it")
    with pytest.raises(ModelSourceError) as err:
        load_pipeline(parse_model_ref(str(other_pipeline_dir)), torch.float32, text_encoder_policy="t5_nf4")
    assert "bitsandbytes" in str(err.value) and "text_encoder_policy" in str(err.value)


def test_a_static_shape_recipe_builds_its_one_shape_and_refuses_others(other_pipeline_dir, tmp_path):
    """[shapes] ranges of one value make programs specialised to that shape (as the compiled recipe's
    first compile is; docs/design.md says why one would try it): the build validates that shape only,
    the package matches diffusers there and refuses any other with the range it has."""
    from diffusers import FluxTransformer2DModel

    import aotpack
    from aotpack.models.examples import transformer_inputs

    recipe = tmp_path / "cpu-static.toml"
    # no_slot_programs = false (the recipe field): half the programs to compile
    recipe.write_text(cpu_test_recipe("cpu-static", 'dtype = "float32"\nmax_rank = 4\nno_slot_programs = false',
                                      tolerance=1e-4, end_to_end=1e-3,
                                      shapes={"batch": [1, 1], "image_tokens": [64, 64], "text_tokens": [16, 16]}))
    package = build_package(str(other_pipeline_dir), str(recipe), out=tmp_path / "static", progress=False)
    manifest = read_manifest(package)
    assert [p.name for p in manifest.programs] == [p.kind for p in manifest.programs]  # no no-slot variants
    assert manifest.shapes == {"batch": [1, 1], "image_tokens": [64, 64], "text_tokens": [16, 16]}
    assert [(c["batch"], c["image_tokens"], c["text_tokens"]) for c in manifest.validation["cases"]] == [(1, 64, 16)]

    served = aotpack.load(str(package), model=str(other_pipeline_dir))
    eager = FluxTransformer2DModel.from_pretrained(other_pipeline_dir / "transformer").eval()

    def inputs(text_tokens):
        return transformer_inputs(eager.config, batch=1, image_tokens=64, text_tokens=text_tokens,
                                  dtype=torch.float32, device="cpu", generator=torch.Generator().manual_seed(2))

    with torch.no_grad():
        ours = served.transformer(**inputs(16), return_dict=False)[0]
        assert rel_error(ours, eager(**inputs(16), return_dict=False)[0]) < TOLERANCE
        with pytest.raises(UnsupportedCallError, match=r"text_tokens = 17 is outside .* \[16, 16\]"):
            served.transformer(**inputs(17), return_dict=False)
