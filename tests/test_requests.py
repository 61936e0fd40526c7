"""Request validation (issue 15 item 3): every field of a request is checked before any work, with a typed
error that names the value; sizes are reported as FluxPipeline produces them; a non-finite output is an
error and writes nothing; adapters with non-float or overflowing values are refused."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from aotpack.adapters.parse import parse_adapter, parse_state_dict
from aotpack.adapters.sources import adapter_source
from aotpack.errors import AdapterFileError, NonFiniteOutputError, RequestError
from aotpack.runtime.jobs import Request, parse_lora_option, request_from_json
from aotpack.runtime.requests import (
    MAX_LORA_SCALE,
    PackageLimits,
    check_output_path,
    check_scale,
    check_size,
    produced_size,
    validate_request,
)

TINY = PackageLimits(image_tokens=(16, 4096), text_tokens=(8, 512))  # the cpu recipe's shapes
GOOD = {"prompt": "a cat", "steps": 2, "height": 64, "width": 64, "max_sequence_length": 16, "seed": 1}


def job(**changes):
    return request_from_json({**GOOD, **changes}, "jobs.jsonl:1", TINY)


# -- LoRA scales and guidance ------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, 1e309, float("1e309"), 100.0001, -101, 1e6])
def test_bad_lora_scales_are_refused(scale):
    with pytest.raises(RequestError, match="LoRA scale"):
        check_scale(scale)
    with pytest.raises(RequestError, match="LoRA scale"):
        job(loras=[["style.safetensors", scale]])


@pytest.mark.parametrize("scale", [0, 0.8, -1.5, MAX_LORA_SCALE, -MAX_LORA_SCALE, 3])
def test_scales_in_range_are_kept(scale):
    assert job(loras=[["style.safetensors", scale]]).loras == [("style.safetensors", float(scale))]


@pytest.mark.parametrize("scale", ["0.8", True, None, [1]])
def test_non_number_scales_are_refused(scale):
    with pytest.raises(RequestError, match="not a number"):
        job(loras=[["style.safetensors", scale]])


def test_lora_option_with_a_word_for_a_scale_names_the_scale():
    with pytest.raises(RequestError, match="the scale 'abc' is not a number"):
        parse_lora_option("f:abc")
    assert parse_lora_option("f.safetensors:0.5") == ("f.safetensors", 0.5)
    assert parse_lora_option("f.safetensors") == ("f.safetensors", 1.0)
    assert parse_lora_option("hf://owner/repo@refs/pr/3/x.safetensors") == ("hf://owner/repo@refs/pr/3/x.safetensors", 1.0)
    assert parse_lora_option("hf://owner/repo/x.safetensors:nan")[0] == "hf://owner/repo/x.safetensors"


def test_an_existing_file_with_a_colon_in_its_name_is_taken_whole(tmp_path):
    path = tmp_path / "style:v2.safetensors"
    path.write_bytes(b"")
    assert parse_lora_option(str(path)) == (str(path), 1.0)


@pytest.mark.parametrize("loras", [{"style.safetensors": 0.8}, "style.safetensors", 3, [["a", 1, 2]], [[1, 2]]])
def test_loras_that_are_not_a_list_of_pairs_are_refused(loras):
    with pytest.raises(RequestError, match="loras|LoRA entry"):
        job(loras=loras)


@pytest.mark.parametrize("guidance", [math.nan, math.inf, -0.1, 100.5, 1e309, "3.5", None, False])
def test_bad_guidance_is_refused(guidance):
    with pytest.raises(RequestError, match="guidance"):
        job(guidance=guidance)


# -- steps, seed, max_sequence_length ----------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("steps", 0), ("steps", -3), ("steps", 1001), ("steps", 2.5), ("steps", "28"), ("steps", True),
    ("seed", -1), ("seed", 2**63), ("seed", 2**70), ("seed", 1.5), ("seed", math.nan),
    ("max_sequence_length", 513), ("max_sequence_length", 7), ("max_sequence_length", 0), ("max_sequence_length", "16"),
])
def test_integers_out_of_range_or_mistyped_are_refused(field, value):
    with pytest.raises(RequestError, match=field):
        job(**{field: value})


def test_integers_at_the_limits_are_kept():
    request = job(steps=1000, seed=2**63 - 1, max_sequence_length=512)
    assert (request.steps, request.seed, request.max_sequence_length) == (1000, 2**63 - 1, 512)
    assert job(steps=2.0).steps == 2  # an integral float from JSON is fine


def test_max_sequence_length_is_bounded_by_the_package():
    narrow = PackageLimits(image_tokens=(16, 256), text_tokens=(8, 64))
    with pytest.raises(RequestError, match=r"max_sequence_length = 65 is outside \[8, 64\]"):
        validate_request(Request(prompt="x", height=64, width=64, max_sequence_length=65), narrow)


# -- sizes ---------------------------------------------------------------------------------------------

def test_sizes_are_rounded_as_fluxpipeline_does_and_reported():
    height, width, notes = check_size(100, 72, TINY)
    assert (height, width) == (96, 64) == produced_size(100, 72)
    assert notes == ["size 72x100 is produced as 64x96 (FluxPipeline rounds down to multiples of 16)"]
    request = job(height=100, width=72)
    assert (request.height, request.width) == (96, 64) and "produced as 64x96" in request.notes[0]
    assert check_size(64, 128, TINY) == (64, 128, [])


@pytest.mark.parametrize("height, width, nearest", [(8, 8, "64x64"), (15, 500, None), (32, 32, "64x64"),
                                                    (4096, 4096, "1024x1024"), (1040, 1040, "1024x1024")])
def test_sizes_outside_the_package_range_name_the_nearest_valid_one(height, width, nearest):
    with pytest.raises(RequestError, match="image tokens") as info:
        check_size(height, width, TINY)
    if nearest:
        assert f"use e.g. {nearest}" in info.value.fix
    suggested = info.value.fix.split("use e.g. ")[1].split(" ")[0]
    w, h = (int(x) for x in suggested.split("x"))
    assert 16 <= (h // 16) * (w // 16) <= 4096 and h % 16 == 0 and w % 16 == 0  # the suggestion is valid


@pytest.mark.parametrize("value", [0, -64, "64", 64.5, None, 2**40])
def test_mistyped_sizes_are_refused(value):
    with pytest.raises(RequestError, match="height"):
        job(height=value)


# -- output paths --------------------------------------------------------------------------------------

def test_output_paths_are_checked_before_any_work(tmp_path):
    assert check_output_path(str(tmp_path / "new" / "deeper" / "a.png")) == str(tmp_path / "new" / "deeper" / "a.png")
    for name in ("a.PNG", "b.jpg", "c.jpeg", "d.webp"):
        check_output_path(str(tmp_path / name))
    with pytest.raises(RequestError, match="does not end in .png"):
        check_output_path(str(tmp_path / "image"))
    with pytest.raises(RequestError, match="does not end in .png"):
        check_output_path(str(tmp_path / "image.txt"))
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(RequestError, match="is a directory"):
        check_output_path(str(tmp_path / "folder.png"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(RequestError, match="not a writable directory"):
        check_output_path(str(tmp_path / "file" / "a.png"))  # its parent is a file
    with pytest.raises(RequestError, match="not a file path"):
        check_output_path("a\0.png")
    with pytest.raises(RequestError, match="save_latents"):
        job(save_latents=str(tmp_path / "latents.png"))
    assert not any(p.name == "new" for p in tmp_path.iterdir())  # checking created nothing


def test_an_unwritable_parent_is_refused(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root may write anywhere (CI runs as root): make the kernel's answer a no
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == locked else real_access(p, mode))
    with pytest.raises(RequestError, match="not a writable directory"):
        check_output_path(str(locked / "a.png"))


# -- jobs fields --------------------------------------------------------------------------------------

def test_diffusers_field_names_mean_the_short_ones():
    ours = job(steps=3, guidance=2.0)
    theirs = request_from_json({**{k: v for k, v in GOOD.items() if k != "steps"}, "num_inference_steps": 3,
                                "guidance_scale": 2.0}, "jobs.jsonl:1", TINY)
    assert ours == theirs
    with pytest.raises(RequestError, match="both 'num_inference_steps' and 'steps'"):
        job(num_inference_steps=3)
    with pytest.raises(RequestError, match="both 'guidance_scale' and 'guidance'"):
        job(guidance=1.0, guidance_scale=2.0)


def test_unknown_fields_are_named_with_a_suggestion():
    with pytest.raises(RequestError, match="unknown field 'stpes' \\(did you mean 'steps'\\?\\)"):
        job(stpes=3)
    with pytest.raises(RequestError, match="'prompt'"):
        request_from_json({"steps": 2}, "x", TINY)
    with pytest.raises(RequestError, match="must be a JSON object"):
        request_from_json([GOOD], "x", TINY)
    with pytest.raises(RequestError, match="merge"):
        job(merge="yes")
    assert job(merge=True).merge is True


# -- adapters: dtypes, overflow, Hub references ------------------------------------------------------

def _lora(tmp_path, a, b, name="l.safetensors"):
    key = "transformer.transformer_blocks.0.attn.to_q"
    path = tmp_path / name
    save_file({f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}, str(path))
    return path


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int32, torch.uint8])
def test_integer_and_bool_adapter_tensors_are_refused(tmp_path, dtype):
    a = torch.ones(4, 32).to(dtype)
    path = _lora(tmp_path, a, torch.ones(32, 4).to(dtype))
    with pytest.raises(AdapterFileError, match="non-float tensors"):
        parse_adapter(path)


def test_float_adapter_tensors_of_every_width_are_read(tmp_path):
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        adapter = parse_adapter(_lora(tmp_path, torch.ones(4, 32, dtype=dtype), torch.ones(32, 4, dtype=dtype),
                                      f"{dtype}.safetensors"))
        assert adapter.max_rank == 4


@pytest.mark.parametrize("value", [1e37, 1e20, 3e38])
def test_finite_values_whose_product_overflows_are_refused(tmp_path, value):
    path = _lora(tmp_path, torch.full((4, 32), value), torch.full((32, 4), value))
    with pytest.raises(AdapterFileError, match="overflows"):
        parse_adapter(path)


def test_large_but_safe_values_are_kept():
    key = "transformer.transformer_blocks.0.attn.to_q"
    adapter = parse_state_dict({f"{key}.lora_A.weight": torch.full((4, 32), 1e3),
                                f"{key}.lora_B.weight": torch.full((32, 4), 1e3)}, name="x", source="x")
    assert adapter.max_rank == 4


@pytest.mark.parametrize("text, repo, weight, revision", [
    ("hf://owner/repo@refs/pr/3/lora.safetensors", "owner/repo", "lora.safetensors", "refs/pr/3"),
    ("hf://owner/repo@refs%2Fpr%2F3/sub/lora.safetensors", "owner/repo", "sub/lora.safetensors", "refs/pr/3"),
    ("hf://owner/repo@v1.0/sub/lora.safetensors", "owner/repo", "sub/lora.safetensors", "v1.0"),
    ("owner/repo@main/lora.safetensors", "owner/repo", "lora.safetensors", "main"),
    ("owner/repo/sub/lora.safetensors", "owner/repo", "sub/lora.safetensors", None),
])
def test_hub_adapter_references_parse_with_huggingface_hub(text, repo, weight, revision):
    source = adapter_source(text)
    assert (source.location, source.weight_name, source.revision) == (repo, weight, revision)


@pytest.mark.parametrize("text", ["hf://owner/repo", "hf://datasets/owner/repo/lora.safetensors", "hf://owner",
                                  "hf://owner/repo@/x.safetensors"])
def test_hub_references_without_a_model_file_are_refused(text):
    with pytest.raises(AdapterFileError):
        adapter_source(text)


# -- non-finite outputs ------------------------------------------------------------------------------

def test_non_finite_latents_are_an_error_and_write_nothing(served_tiny, tmp_path, monkeypatch):
    from aotpack.runtime import jobs

    out = tmp_path / "img.png"
    latents_file = tmp_path / "lat.safetensors"
    request = validate_request(Request(prompt="a cat", steps=1, height=64, width=64, max_sequence_length=16,
                                       out=str(out), save_latents=str(latents_file)), TINY)
    real_call = type(served_tiny).__call__

    def nan_latents(self, *args, **kwargs):
        result = real_call(self, *args, **kwargs)
        result.images[0, 0, 0] = math.nan
        return result

    monkeypatch.setattr(type(served_tiny), "__call__", nan_latents)
    with pytest.raises(NonFiniteOutputError, match="1 NaN/Inf values"):
        jobs.run_request(served_tiny, request)
    assert not out.exists() and not latents_file.exists()
    monkeypatch.undo()
    result = jobs.run_request(served_tiny, request)  # the same request, finite: both files written
    assert out.is_file() and latents_file.is_file() and result.image_path == str(out)


def test_the_vae_refuses_to_make_an_image_of_non_finite_pixels(served_tiny):
    latents = torch.full((1, 16, 16), math.nan)  # 64x64: 16 packed tokens of 4x4 latent channels
    with pytest.raises(NonFiniteOutputError, match="NaN/Inf pixels"):
        served_tiny.decode_latents(latents, 64, 64)


@pytest.mark.parametrize("scale", [math.nan, math.inf, 1e309, 101.0])
def test_set_loras_refuses_bad_scales_before_reading_files(served_tiny, scale):
    before = list(served_tiny.active)
    with pytest.raises(RequestError, match="LoRA scale"):
        served_tiny.set_loras([("/does/not/exist.safetensors", scale)])
    assert served_tiny.active == before


def test_report_numbers_stay_json():
    from aotpack.runtime.jobs import _finite

    assert json.dumps(_finite({"a": [math.nan, 1.0], "b": math.inf})) == '{"a": [null, 1.0], "b": null}'


@pytest.mark.parametrize("prompt, says", [("x \ud800", "lone surrogate"), ("a" * 20_001, "20001 characters"),
                                          (None, "not a string")])
def test_prompts_the_tokenizers_cannot_take_are_refused(prompt, says):
    with pytest.raises(RequestError, match=says):
        validate_request(Request(prompt=prompt))
    assert validate_request(Request(prompt="a" * 20_000)).prompt == "a" * 20_000
