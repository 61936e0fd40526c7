"""The Python API as a diffusers/PEFT user calls it: bad input is a typed error naming the value and the fix, a refused
call leaves the active set and its outputs as they were, and no NaN output is returned as an image."""

from __future__ import annotations

import logging
import math

import lora_formats as formats
import numpy as np
import pytest
import torch
from reference import latents, rel_error

from aotpack.errors import NonFiniteOutputError, RequestError, UnsupportedCallError


@pytest.fixture(scope="module")
def clip_lora(tmp_path_factory):
    """A kohya file with CLIP (text encoder) parts."""
    from aotpack.models.tiny import make_pipeline

    eager = make_pipeline()
    config, clip = dict(eager.transformer.config), formats.clip_layers(eager.text_encoder)
    return formats.write(formats.kohya(config, clip, seed=11, skip=("linear1",)),
                         tmp_path_factory.mktemp("clip") / "kohya.safetensors")


def test_set_loras_refuses_a_dict_a_bare_path_and_odd_entries_and_keeps_the_set(served_tiny, demo_loras):
    mlp = demo_loras["tiny-style-mlp"]
    served_tiny.set_loras([(mlp, 0.8)])
    try:
        before, active = latents(served_tiny), list(served_tiny.active)
        refusals = [
            (lambda: served_tiny.set_loras({mlp: 0.5}), "is a dict, not a list"),  # ran at scale 1.0
            (lambda: served_tiny.set_loras(str(mlp)), "is a str, not a list"),  # read '/' as an adapter folder
            (lambda: served_tiny.set_loras([(mlp, 0.5, "x")]), "has 3 items"),  # was a ValueError
            (lambda: served_tiny.set_loras([(mlp,)]), "has 1 items"),  # was an IndexError
            (lambda: served_tiny.set_loras([("", 1.0)]), "empty path"),
            (lambda: served_tiny.set_loras([(mlp, 0.5)], merge="false"), "merge = 'false'"),  # merged the set
        ]
        for call, says in refusals:
            with pytest.raises(RequestError, match=says):
                call()
            assert served_tiny.active == active and not served_tiny.transformer.merged
        assert torch.equal(latents(served_tiny), before)
    finally:
        served_tiny.set_loras([])


def test_numpy_and_tensor_scales_are_numbers_and_bools_are_not(served_tiny, demo_loras):
    mlp = demo_loras["tiny-style-mlp"]
    try:
        served_tiny.set_loras([(mlp, 0.5)])
        half = latents(served_tiny)
        for scale in (np.float32(0.5), torch.tensor(0.5), torch.tensor([0.5], dtype=torch.float16)):
            served_tiny.set_loras([(mlp, scale)])  # "is not a number" before
            assert served_tiny.active == [("tiny-style-mlp", 0.5)]
            assert torch.equal(latents(served_tiny), half)
        served_tiny.set_loras([(mlp, np.int64(1))])
        assert served_tiny.active == [("tiny-style-mlp", 1.0)]
        for scale, says in ((True, "True is not a number"), (np.float32("nan"), "is not finite"),
                            (torch.tensor(101.0), r"outside \[-100, 100\]")):
            with pytest.raises(RequestError, match=says):
                served_tiny.set_loras([(mlp, scale)])
            assert served_tiny.active == [("tiny-style-mlp", 1.0)]
    finally:
        served_tiny.set_loras([])


def test_diffusers_set_adapters_refuses_weights_set_loras_refuses(served_tiny, demo_loras):
    pipe = served_tiny.pipeline
    pipe.load_lora_weights(str(demo_loras["tiny-style-mlp"]), adapter_name="m")
    try:
        pipe.set_adapters(["m"], adapter_weights=[0.5])
        half = latents(pipe)
        for weight, says in ((math.nan, "not finite"), (math.inf, "not finite"), (1e6, "outside"),
                             ("0.5", "not a number"), (True, "not a number"), ((0.5,), "not a number")):
            with pytest.raises(RequestError, match=f"LoRA scale of adapter 'm' = .*{says}"):
                pipe.set_adapters(["m"], adapter_weights=[weight])  # NaN ran as NaN latents before
            assert torch.equal(latents(pipe), half)
        pipe.set_adapters(["m"], adapter_weights=[np.float32(0.5)])
        assert torch.equal(latents(pipe), half)
    finally:
        pipe.unload_lora_weights()
        served_tiny.set_loras([])


@pytest.mark.parametrize("output_type", ["pil", "np", "latent"])
def test_non_finite_outputs_are_refused_not_returned_as_black_images(served_tiny, big_lora, output_type):
    served_tiny.set_loras([(big_lora, 100.0)])
    try:
        with pytest.raises(NonFiniteOutputError, match="NaN/Inf latents"):  # a black PIL image before
            served_tiny(prompt="a cat", height=64, width=64, num_inference_steps=2, max_sequence_length=16,
                        output_type=output_type)
    finally:
        served_tiny.set_loras([])
    image = served_tiny(prompt="a cat", height=64, width=64, num_inference_steps=2, max_sequence_length=16,
                        output_type=output_type).images
    assert image is not None  # a finite call goes through the same checks


def test_diffusers_lora_calls_on_the_served_pipeline_point_to_set_loras(served_tiny, demo_loras):
    for name in ("load_lora_weights", "fuse_lora", "unload_lora_weights", "set_adapters"):
        assert not hasattr(served_tiny, name)
        with pytest.raises(UnsupportedCallError, match=f"no {name}\\(\\).*set_loras"):  # an AttributeError before
            getattr(served_tiny, name)(str(demo_loras["tiny-style-mlp"]))
    with pytest.raises(AttributeError):
        served_tiny.no_such_attribute  # noqa: B018 -- other names stay plain AttributeErrors


def test_set_loras_injects_clip_parts_again_after_unload_lora_weights_removed_them(served_tiny, clip_lora):
    try:
        served_tiny.set_loras([(clip_lora, 1.0)])
        with_lora = latents(served_tiny)
        served_tiny.pipeline.unload_lora_weights()  # diffusers' call removes every PEFT layer of the text encoder
        served_tiny.set_loras([(clip_lora, 1.0)])  # ran without its CLIP part before (rel. error 0.40)
        assert rel_error(latents(served_tiny), with_lora) <= 1e-6
    finally:
        served_tiny.set_loras([])


def test_merge_false_stays_pinned_with_auto_merge_after(served_tiny, demo_loras):
    lora = [(demo_loras["tiny-style-mlp"], 0.7)]
    served_tiny.auto_merge_after = 2
    try:
        for _ in range(3):
            served_tiny.set_loras(lora, merge=False)
            assert not served_tiny.transformer.merged and served_tiny.transformer.lora_modes.mode == "slots"
    finally:
        served_tiny.auto_merge_after = None
        served_tiny.set_loras([])


def test_to_another_dtype_warns_and_keeps_the_programs_dtype(served_tiny, caplog):
    transformer = served_tiny.transformer
    with caplog.at_level(logging.WARNING, logger="aotpack.runtime.transformer"):
        assert transformer.to(torch.float16) is transformer
    assert transformer.dtype == torch.float32
    assert "runs in torch.float32" in caplog.text and ".to(torch.float16)" in caplog.text
    with pytest.raises(UnsupportedCallError, match="cannot move to meta"):
        transformer.to("meta")


def test_from_pretrained_takes_the_packages_torch_dtype_and_refuses_another(tiny_package):
    import aotpack

    transformer = aotpack.AotpackFluxTransformer.from_pretrained(tiny_package, model="tiny", torch_dtype=torch.float32)
    assert transformer.dtype == torch.float32  # was a TypeError for the keyword diffusers users pass
    with pytest.raises(UnsupportedCallError, match=r"torch_dtype=torch.bfloat16: .* compiled for float32") as err:
        aotpack.AotpackFluxTransformer.from_pretrained(tiny_package, model="tiny", torch_dtype=torch.bfloat16)
    assert "leave torch_dtype out" in err.value.fix


@pytest.mark.parametrize("value", ["3", 0, -2, 1.5, True])
def test_auto_merge_after_that_is_not_a_whole_number_is_refused_before_the_load(tiny_package, value):
    import aotpack

    with pytest.raises(RequestError, match=f"auto_merge_after = {value!r} is not a whole number"):
        aotpack.load(tiny_package, auto_merge_after=value)


def test_an_attribute_error_inside_a_property_keeps_its_own_message():
    from aotpack.runtime.pipeline import AotpackPipeline

    bare = object.__new__(AotpackPipeline)  # no transformer: `device` fails inside its getter
    with pytest.raises(AttributeError, match="transformer"):
        bare.device  # noqa: B018 (the lookup is the test)
    with pytest.raises(AttributeError, match="no_such_thing"):
        bare.no_such_thing  # noqa: B018
