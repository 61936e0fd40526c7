"""diffusers' own LoRA calls on a stock `FluxPipeline` whose transformer is the compiled package.

`pipe.load_lora_weights(file, adapter_name=...)`, `set_adapters`, `disable_lora`, `enable_lora`,
`delete_adapters`, `unload_lora_weights` and `get_active_adapters` are run step by step on the
pipeline `aotpack.load` returns and on diffusers + PEFT eager (`make_pipeline()`), with the same
files; after every step the latents and the adapter bookkeeping must agree. One adapter is a kohya
file with CLIP parts, so the text encoder takes diffusers' own path on both sides.
"""

from __future__ import annotations

import lora_formats as formats
import pytest
from reference import latents, rel_error

import aotpack
from aotpack.errors import AdapterError, AdapterRankError, UnsupportedCallError
from aotpack.models.tiny import make_pipeline
from aotpack.runtime.transformer import CompiledFluxTransformer

TOLERANCE = 1e-4  # latents, relative error vs diffusers + PEFT eager on the CPU


@pytest.fixture(scope="module")
def files(demo_loras, tmp_path_factory):
    eager = make_pipeline()
    config, clip = dict(eager.transformer.config), formats.clip_layers(eager.text_encoder)
    directory = tmp_path_factory.mktemp("contract")
    return {
        "kohya_clip": formats.write(formats.kohya(config, clip, seed=11, skip=("linear1",)),
                                    directory / "kohya.safetensors"),
        "mlp": demo_loras["tiny-style-mlp"],
        "all": demo_loras["tiny-style-all"],
    }


@pytest.fixture(scope="module")
def pipes(tiny_package):
    """(compiled, eager): the stock FluxPipeline of `aotpack.load` and diffusers + PEFT eager."""
    return aotpack.load(tiny_package, model="tiny").pipeline, make_pipeline()


def both(pipes, action) -> float:
    """Run `action` on both pipelines; the latents' relative error, after checking the bookkeeping."""
    compiled, eager = pipes
    action(compiled)
    action(eager)
    assert compiled.get_active_adapters() == eager.get_active_adapters()
    assert compiled.get_list_adapters() == eager.get_list_adapters()
    return rel_error(latents(compiled), latents(eager))


def test_load_lora_weights_and_set_adapters_match_peft(pipes, files):
    compiled, eager = pipes
    assert type(compiled).__name__ == "FluxPipeline" and isinstance(compiled.transformer, CompiledFluxTransformer)
    base = latents(eager)
    assert both(pipes, lambda p: None) <= TOLERANCE

    assert both(pipes, lambda p: p.load_lora_weights(str(files["kohya_clip"]), adapter_name="kohya")) <= TOLERANCE
    assert compiled.get_active_adapters() == ["kohya"]
    assert "kohya" in compiled.get_list_adapters()["text_encoder"]  # CLIP parts: diffusers' own path
    assert rel_error(latents(eager), base) > 100 * TOLERANCE  # the adapter must matter

    assert both(pipes, lambda p: p.load_lora_weights(str(files["mlp"]), adapter_name="mlp")) <= TOLERANCE
    # PEFT: the newly loaded adapter alone is active in the transformer (the pipeline reports its last
    # component's adapters, here the text encoder's)
    assert compiled.transformer.active_adapters() == eager.transformer.active_adapters() == ["mlp"]

    stacked = both(pipes, lambda p: p.set_adapters(["kohya", "mlp"], adapter_weights=[0.8, 1.0]))
    print(f"stack of two via set_adapters: rel. error {stacked:.2e}")
    assert stacked <= TOLERANCE
    assert compiled.get_active_adapters() == ["kohya", "mlp"]
    assert rel_error(latents(eager), base) > 100 * TOLERANCE


def test_disable_enable_delete_unload_behave_like_peft(pipes, files):
    compiled, eager = pipes
    if "mlp" not in compiled.get_list_adapters().get("transformer", []):  # run alone: load the pair first
        test_load_lora_weights_and_set_adapters_match_peft(pipes, files)
    with_loras = latents(compiled)

    assert both(pipes, lambda p: p.set_adapters(["kohya", "mlp"], adapter_weights=[0.5, -0.7])) <= TOLERANCE
    assert both(pipes, lambda p: p.disable_lora()) <= TOLERANCE
    base = latents(eager)
    assert rel_error(latents(compiled), base) <= TOLERANCE  # disabled: the base model
    assert both(pipes, lambda p: p.enable_lora()) <= TOLERANCE  # the weights 0.5 / -0.7 come back
    assert rel_error(latents(compiled), with_loras) > 100 * TOLERANCE

    assert both(pipes, lambda p: p.delete_adapters("kohya")) <= TOLERANCE
    assert compiled.get_active_adapters() == ["mlp"]
    assert both(pipes, lambda p: p.load_lora_weights(str(files["all"]), adapter_name="all")) <= TOLERANCE
    assert both(pipes, lambda p: p.set_adapters("mlp")) <= TOLERANCE  # weight back to 1.0

    assert both(pipes, lambda p: p.unload_lora_weights()) <= TOLERANCE
    assert compiled.get_list_adapters() == {} and compiled.get_active_adapters() == []
    assert not hasattr(compiled.transformer, "peft_config")
    assert rel_error(latents(compiled), base) <= TOLERANCE


def test_refusals_leave_the_active_set_unchanged(pipes, files, tiny_package):
    compiled, _ = pipes
    compiled.load_lora_weights(str(files["mlp"]), adapter_name="keep")
    before = latents(compiled)
    with pytest.raises(AdapterError, match="already loaded"):
        compiled.load_lora_weights(str(files["all"]), adapter_name="keep")
    compiled.load_lora_weights(str(files["all"]), adapter_name="all16")  # rank 16: with "keep" (8), 24 <= 32
    compiled.load_lora_weights(str(files["all"]), adapter_name="all16b")
    with pytest.raises(AdapterRankError, match="max_rank"):  # 16 + 16 + 8 > 32: nothing may change
        compiled.set_adapters(["keep", "all16", "all16b"])
    with pytest.raises(UnsupportedCallError, match="fused"):
        compiled.fuse_lora()
    with pytest.raises(UnsupportedCallError, match="per-block"):
        compiled.set_adapters(["keep"], adapter_weights=[{"transformer": {"transformer_blocks.0": 0.5}}])
    compiled.set_adapters(["keep"])
    assert rel_error(latents(compiled), before) <= 1e-6
    compiled.unload_lora_weights()


def test_apply_swaps_the_transformer_of_a_stock_pipeline(tiny_package, files):
    """`aotpack.apply(pipe, package)` binds the pipeline's own transformer weights to the programs."""
    pipe, eager = make_pipeline(), make_pipeline()
    assert aotpack.apply(pipe, tiny_package) is pipe
    assert isinstance(pipe.transformer, CompiledFluxTransformer)
    assert rel_error(latents(pipe), latents(eager)) <= TOLERANCE
    assert both((pipe, eager), lambda p: p.load_lora_weights(str(files["all"]), adapter_name="all")) <= TOLERANCE
    with pytest.raises(UnsupportedCallError, match="CompiledFluxTransformer"):
        aotpack.apply(pipe, tiny_package)


def test_from_pretrained_makes_a_transformer_for_a_stock_pipeline(tiny_package):
    transformer = aotpack.AotpackFluxTransformer.from_pretrained(tiny_package, model="tiny")
    assert isinstance(transformer, CompiledFluxTransformer)
    pipe, eager = make_pipeline(transformer=transformer), make_pipeline()
    assert rel_error(latents(pipe), latents(eager)) <= TOLERANCE
