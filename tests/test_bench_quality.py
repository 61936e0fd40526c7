"""`aotpack bench quality`: a package's images on the user's model, prompts and LoRAs against eager diffusers +
PEFT, on the tiny model with a real CPU package. The metrics must report agreement where there is agreement and
catch a weakened LoRA where there is one."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from aotpack.bench import quality
from aotpack.bench.fidelity import lora_effect_error
from aotpack.cli.main import cli
from aotpack.runtime.pipeline import AotpackPipeline

REQUEST = ["--height", "64", "--width", "64", "--steps", "3", "--max-sequence-length", "16"]


def _args(tiny_package, lora, out, *extra):
    return ["--model", "tiny", "--package", f"tiny={tiny_package}", "--lora", f"{lora}:0.9",
            "--prompt", "a lighthouse on a cliff at dusk", "--prompt", "a red fox in the snow", *REQUEST,
            "--out", str(out), *extra]


def test_quality_package_matches_eager_in_slots_and_merged(tiny_package, demo_loras, tmp_path):
    out = tmp_path / "quality"
    results = quality.main(_args(tiny_package, demo_loras["tiny-style-attn"], out))
    rows = results["contenders"]
    assert list(rows) == ["eager", "tiny/slots", "tiny/merged"] and results["reference"] == "eager"
    assert rows["eager"]["summary"] == {"latents_error_no_lora": 0.0, "latents_error_lora": 0.0,
                                        "lora_fidelity_error": 0.0, "lora_strength": 1.0, "psnr_db_min": None}
    for key in ("tiny/slots", "tiny/merged"):
        for row in rows[key]["prompts"]:  # fp32 on the CPU: the package is diffusers' computation, recompiled
            assert row["latents_error_no_lora"] <= 1e-3 and row["latents_error_lora"] <= 1e-3, (key, row)
            assert row["lora_fidelity_error"] <= 1e-2 and abs(row["lora_strength"] - 1) <= 1e-2, (key, row)
            assert row["psnr_db"] is None or row["psnr_db"] >= 40, (key, row)
    # what was saved is what was measured, and the LoRA really moves the reference (or fidelity proves nothing)
    eager, slots = (load_file(out / "latents" / f"{stem}.safetensors") for stem in ("eager", "tiny-slots"))
    assert len(eager) == len(slots) == 4
    for i in range(2):
        assert lora_effect_error(slots[f"lora_{i}"], slots[f"base_{i}"], eager[f"lora_{i}"], eager[f"base_{i}"]) \
            == pytest.approx(rows["tiny/slots"]["prompts"][i]["lora_fidelity_error"], rel=1e-9, abs=1e-12)
        assert quality.relative_error(eager[f"lora_{i}"], eager[f"base_{i}"]) > 0.05
    pngs = sorted(p.name for p in (out / "images").iterdir())
    assert len(pngs) == 12 and "tiny-merged-1-lora.png" in pngs
    assert json.loads((out / "quality.json").read_text())["contenders"] == rows
    table = (out / "quality.md").read_text()
    assert "| `tiny/merged` |" in table and "LoRA fidelity error" in table
    # the merge check, beside the images: this package's weights are not FP8, so there is nothing to re-round
    assert results["merge_checks"] == {"tiny/merged": None}
    assert "- `tiny/merged`: no FP8 weight touched" in table
    results["merge_checks"] = {"fp8/merged": {"strength": 0.331, "error": 1.78, "rows": 3072}}
    assert "- `fp8/merged`: strength 0.331, error 1.780 (3072 rows)" in quality.markdown(results)


def test_quality_catches_a_weakened_lora(tiny_package, demo_loras, tmp_path, monkeypatch):
    """A runtime that applied the set at half its scale (the FP8 complaint, exaggerated) must score it."""
    set_loras = AotpackPipeline.set_loras

    def halved(self, loras=(), **kwargs):
        return set_loras(self, [(path, scale / 2) for path, scale in loras], **kwargs)

    monkeypatch.setattr(AotpackPipeline, "set_loras", halved)
    results = quality.main(_args(tiny_package, demo_loras["tiny-style-attn"], tmp_path / "q", "--modes", "slots"))
    summary = results["contenders"]["tiny/slots"]["summary"]
    assert 0.3 < summary["lora_strength"] < 0.7, summary
    assert summary["lora_fidelity_error"] > 0.3, summary
    assert summary["latents_error_no_lora"] <= 1e-3  # the base is untouched: only the LoRA's effect is off


def test_quality_against_eager_upcast_reads_eager_itself_against_it(tiny_package, demo_loras, tmp_path):
    """--reference eager-upcast: diffusers' pipeline one dtype up (float64 for the CPU's float32 package), from the
    same noise, as the reference; eager beside it parts by rounding alone (drawn in float64, the noise alone made the
    tiny model's images part by 57%), and the package's rows are read against the upcast pipeline."""
    results = quality.main(_args(tiny_package, demo_loras["tiny-style-attn"], tmp_path / "q", "--modes", "slots",
                                 "--reference", "eager-upcast"))
    rows = results["contenders"]
    assert list(rows) == ["eager", "eager-upcast", "tiny/slots"] and results["reference"] == "eager-upcast"
    assert rows["eager-upcast"]["summary"]["lora_strength"] == 1.0
    for key, bound in (("eager", 1e-5), ("tiny/slots", 1e-3)):
        for row in rows[key]["prompts"]:
            assert 0 < row["latents_error_no_lora"] <= bound and 0 < row["latents_error_lora"] <= bound, (key, row)
            assert abs(row["lora_strength"] - 1) <= 10 * bound, (key, row)
    eager, upcast = (load_file(tmp_path / "q" / "latents" / f"{stem}.safetensors") for stem in ("eager", "eager-upcast"))
    assert quality.relative_error(upcast["lora_0"], upcast["base_0"]) > 0.05  # the LoRA moves the reference
    table = (tmp_path / "q" / "quality.md").read_text()
    assert "# Image quality against eager-upcast" in table and "the `eager` row is the package dtype's own" in table


def test_eager_upcast_of_a_bf16_pipeline_differs_by_rounding_alone(demo_loras, monkeypatch):
    """bf16 -> float32, the GPU case, on the tiny model: with the timesteps rounded as the bf16 pipeline rounds them
    the two part by ~1% (bf16 noise through a random model) and the LoRA's effect agrees; without it, by ~90%."""
    from aotpack.bench.fidelity import effect_strength

    request = dict(height=64, width=64, num_inference_steps=3, guidance_scale=3.5, max_sequence_length=16)
    lora = [(demo_loras["tiny-style-attn"], 0.9)]

    def images(upcast):
        return quality.eager_images("tiny", torch.bfloat16, "cpu", lora, ["a red fox"], [1], request, upcast=upcast)

    low, upcast = images(False), images(True)
    assert quality.relative_error(low.base[0], upcast.base[0]) < 0.03
    assert abs(effect_strength(low.lora[0], low.base[0], upcast.lora[0], upcast.base[0]) - 1) < 0.03
    monkeypatch.setattr(quality, "_condition_as", lambda low, module, args, kwargs: (args, kwargs))
    assert quality.relative_error(low.base[0], images(True).base[0]) > 0.3


def test_conditioning_as_gives_the_upcast_model_the_low_dtype_timestep():
    """diffusers' Flux multiplies timestep and guidance by 1000 in its own dtype: bf16 makes 0.537 into 536."""
    from aotpack.bench.fidelity import conditioning_as, upcast_dtype

    timestep_and_guidance = torch.tensor([0.537, 3.5])
    assert (timestep_and_guidance.to(torch.bfloat16) * 1000).tolist() == [536.0, 3504.0]
    scaled = conditioning_as(timestep_and_guidance, torch.bfloat16) * 1000
    assert scaled.dtype == torch.float32 and scaled.tolist() == pytest.approx([536.0, 3504.0], abs=1e-3)
    # FluxPipeline passes t.to(bf16) / 1000 (t = 537.2: 536 / 1000 -> 0.53515625 in bf16 -> x 1000 -> 536)
    piped = conditioning_as(torch.tensor([0.5372]), torch.bfloat16, from_pipeline=True) * 1000
    assert piped.tolist() == pytest.approx([536.0], abs=1e-3)
    unpiped = conditioning_as(torch.tensor([0.5372]), torch.bfloat16) * 1000  # the transformer's rounding alone
    assert unpiped.tolist() == pytest.approx([540.0], abs=1e-3)
    assert upcast_dtype(torch.bfloat16) == torch.float32 and upcast_dtype(torch.float32) == torch.float64


def test_quality_against_a_package_skips_eager(tiny_package, tmp_path, monkeypatch):
    """--reference LABEL compares packages with each other, with no eager pipeline in memory (small cards)."""
    monkeypatch.setattr(quality, "eager_images", lambda *a, **k: pytest.fail("eager ran"))
    results = quality.main(["--package", f"a={tiny_package}", "--package", f"b={tiny_package}", "--reference", "a",
                            "--prompt", "a boat", *REQUEST, "--out", str(tmp_path / "q")])
    assert list(results["contenders"]) == ["a", "b"]  # no --lora: one run per package, no modes
    assert results["contenders"]["b"]["summary"] == {"latents_error_no_lora": 0.0, "psnr_db_min": None}


@pytest.mark.parametrize("args, message", [
    (["--package", "nolabel", "--prompt", "x"], "write LABEL=PACKAGE"),
    (["--package", "a=p", "--package", "a=q", "--prompt", "x"], "the label 'a' is given twice"),
    (["--package", "eager=p", "--prompt", "x"], "not 'eager'"),
    (["--package", "eager-upcast=p", "--prompt", "x"], "or 'eager-upcast'"),
    (["--package", "a=p"], "give at least one --prompt"),
    (["--package", "a=p", "--prompt", "x", "--height", "100"], "--height 100: give a positive multiple of 16"),
])
def test_quality_usage_errors_exit_2_naming_the_value(args, message, tmp_path):
    result = CliRunner().invoke(cli, ["bench", "quality", *args, "--out", str(tmp_path / "q")])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "q").exists()


def test_quality_bad_reference_and_lora_fail_before_any_pipeline_loads(tiny_package, demo_loras, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr(quality, "load_package", lambda *a, **k: pytest.fail("a package loaded"))
    monkeypatch.setattr(quality, "eager_images", lambda *a, **k: pytest.fail("eager ran"))
    base = ["bench", "quality", "--package", f"tiny={tiny_package}", "--prompt", "x", "--out", str(tmp_path / "q")]
    result = CliRunner().invoke(cli, [*base, "--reference", "other"])
    assert result.exit_code == 1 and "--reference 'other' is neither 'eager', 'eager-upcast' nor a --package label " \
        "(tiny)" in result.output
    result = CliRunner().invoke(cli, [*base, "--lora", f"{demo_loras['tiny-style-attn']}:nan"])
    assert result.exit_code == 1 and "LoRA scale" in result.output and "nan" in result.output
    result = CliRunner().invoke(cli, [*base, "--lora", str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 1 and "missing.safetensors" in result.output
    result = CliRunner().invoke(cli, [*base, "--model", "random:flux-dev"])
    assert result.exit_code == 1 and "'random:flux-dev' has random weights" in result.output
    assert not (tmp_path / "q").exists()


def test_quality_refuses_a_set_that_does_not_move_the_reference(tiny_package, demo_loras, tmp_path):
    """Scale 0: there is no LoRA effect to compare, so fidelity would be 0/0; a typed error, and nothing written."""
    out = tmp_path / "q"
    result = CliRunner().invoke(cli, ["bench", "quality", *_args(tiny_package, demo_loras["tiny-style-attn"], out),
                                      "--lora", f"{demo_loras['tiny-style-mlp']}:0", "--modes", "slots"])
    assert result.exit_code == 0, result.output  # attn at 0.9 + mlp at 0: the set still moves the output
    args = [a.replace(":0.9", ":0") for a in _args(tiny_package, demo_loras["tiny-style-attn"], tmp_path / "z")]
    result = CliRunner().invoke(cli, ["bench", "quality", *args, "--modes", "slots"])
    assert result.exit_code == 1, result.output
    assert "the LoRA set leaves eager's latents for prompt 'a lighthouse on a cliff at dusk' unchanged" in result.output
    assert not (tmp_path / "z").exists()


def test_quality_refuses_an_out_that_is_a_file_before_any_pipeline_loads(tiny_package, demo_loras, tmp_path,
                                                                         monkeypatch):
    """--out naming a file failed with an untyped FileExistsError after every image was made; now it is refused
    first, and the file is left as it was."""
    monkeypatch.setattr(quality, "load_package", lambda *a, **k: pytest.fail("a package loaded"))
    monkeypatch.setattr(quality, "eager_images", lambda *a, **k: pytest.fail("eager ran"))
    afile = tmp_path / "afile.txt"
    afile.write_text("mine")
    result = CliRunner().invoke(cli, ["bench", "quality", *_args(tiny_package, demo_loras["tiny-style-attn"], afile),
                                      "--steps", "1"])
    assert result.exit_code == 1, result.output
    assert f"--out {str(afile)!r} exists and is not a folder" in result.output and "unexpected" not in result.output
    assert afile.read_text() == "mine"
