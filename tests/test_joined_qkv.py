"""Recipe lever `joined_qkv`: each double-block stream's q/k/v as one FP8 GEMM over their weights joined along N.

A real CPU package built with the lever, with FP8 attention from 48 tokens and q/k written in FP8 by their kernel
(as h100/h200 run it: the q/k column slices then pass through the attention's token-count `torch.cond`, which
refuses aliasing operands), beside the FP8 test package built without any of those. Its double-block programs read
the joined weights only; below the threshold every output (no LoRA, slots, merged, restored) equals the other
package's bit for bit (row-wise FP8 makes the joined weight the members' rows stacked; the bf16 branch is the same
attention), and from it FP8 attention runs with an FP8-sized difference. A merge writes the members' rows in place,
which are the joined buffer's rows.
"""

from __future__ import annotations

import pytest
import torch

from aotpack.errors import RecipeError
from aotpack.store.manifest import read_manifest
from aotpack.store.manifest_schema import format_version_for

MEMBERS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
THRESHOLD = 48  # joint tokens from which the package takes FP8 attention


@pytest.fixture(scope="module")
def joined_package(tmp_path_factory):
    from reference import build_fp8_package

    # the FP8 test package's recipe (tests/conftest.py: fp8_build) plus the lever and h200's FP8 attention
    return build_fp8_package(tmp_path_factory.mktemp("joined"), f"""
group_lora_down = true
batched_modulation = true
joined_qkv = true
attention = "cudnn_fp8"
fp8_attention_min_tokens = {THRESHOLD}
fp8_qk_in_norm_rope = true
""").path


def _load(package):
    import torchao.quantization.quant_api as quant_api

    import aotpack

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
        return aotpack.load(package, model="tiny")


def _outputs(served, lora, image_tokens: int, text_tokens: int) -> tuple[list[torch.Tensor], int]:
    """No LoRA, `lora` in slots, merged, and no LoRA again after the unmerge; and how often FP8 attention ran."""
    from aotpack.models.examples import transformer_inputs

    transformer = served.transformer
    inputs = transformer_inputs(transformer.config, batch=1, image_tokens=image_tokens, text_tokens=text_tokens,
                                dtype=torch.bfloat16, device="cpu", generator=torch.Generator().manual_seed(2))
    outputs = []
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for loras, merge in (([], False), (lora, False), (lora, True), ([], False)):
            served.set_loras(loras, merge=merge)
            outputs.append(transformer(**inputs, return_dict=False)[0].float())
    return outputs, len([e for e in profile.events() if e.name == "aotpack::fp8_sdpa"])


def test_joined_package_reads_joined_weights_only(joined_package, fp8_package):
    manifest, unjoined = read_manifest(joined_package), read_manifest(fp8_package)
    assert manifest.recipe["joined_qkv"] is True and not unjoined.recipe.get("joined_qkv")
    # an aotpack before the lever would not join the weights: it refuses the package by its format
    assert manifest.format_version == 5 == format_version_for(manifest.quantization, manifest.recipe)
    for name in ("double_block", "double_block.noslot"):
        constants = next(p for p in manifest.programs if p.name == name).constants
        before = next(p for p in unjoined.programs if p.name == name).constants
        joined = {c for c in constants if ".joined_" in c}
        assert joined == {f"body.attn.{holder}.parametrizations.weight.original{i}"
                          for holder in ("joined_qkv", "joined_added_qkv") for i in (0, 1)}
        # no member's weight is a constant; everything else is as before (the members' biases included)
        members = {c for c in before if any(f".{m}." in c for m in MEMBERS) and ".weight" in c}
        assert len(members) == 2 * len(MEMBERS) and set(constants) == (set(before) - members) | joined
    single = next(p for p in manifest.programs if p.name == "single_block").constants
    assert single == next(p for p in unjoined.programs if p.name == "single_block").constants
    # both attention branches are in the double-block programs, which take the joined q/k slices through them
    assert next(p for p in manifest.programs if p.name == "double_block").attention_kernels == ["bf16_branch",
                                                                                                 "cudnn_fp8"]


def test_joined_package_equals_the_unjoined_one_and_merges_through_the_joined_buffer(joined_package, fp8_package,
                                                                                     demo_loras):
    from reference import rel_error

    lora = [(str(demo_loras["tiny-style-all"]), 0.8)]
    served, unjoined = _load(joined_package), _load(fp8_package)
    attn = served.transformer._weights_owner.transformer_blocks[0].attn
    joined = attn.joined_qkv.parametrizations.weight.original0
    # each member's FP8 rows are rows of the joined buffer (one storage: what a merge writes, the program reads)
    for position, name in enumerate(("to_q", "to_k", "to_v")):
        qdata = getattr(attn, name).base.parametrizations.weight.original0
        assert qdata.untyped_storage().data_ptr() == joined.untyped_storage().data_ptr()
        assert qdata.data_ptr() == joined.data_ptr() + position * qdata.numel()
    before = joined.view(torch.uint8).clone()
    # below the threshold: bf16 attention in both packages, the same numbers bit for bit in every mode
    got, fp8_calls = _outputs(served, lora, 16, 8)
    expected, _ = _outputs(unjoined, lora, 16, 8)
    assert fp8_calls == 0
    for label, a, b in zip(("no LoRA", "slots", "merged", "restored"), got, expected):
        assert torch.equal(a, b), label
    assert not torch.equal(got[2], got[0]) and torch.equal(got[3], got[0])  # the merge moved the output, then left
    assert torch.equal(joined.view(torch.uint8), before)  # the unmerge restored the joined rows bit for bit
    # from it: FP8 attention in every block (2 double + 2 single, four modes), an FP8-sized difference
    got, fp8_calls = _outputs(served, lora, 64, 16)
    expected, _ = _outputs(unjoined, lora, 64, 16)
    assert fp8_calls == 4 * 4
    for label, a, b in zip(("no LoRA", "slots", "merged", "restored"), got, expected):
        assert 1e-3 < rel_error(a, b) < 5e-2, label
    effect = rel_error(got[1], got[0])
    assert effect > 0.1 and rel_error(got[2], got[1]) < 0.25 * effect and torch.equal(got[3], got[0])
    assert torch.equal(joined.view(torch.uint8), before)


def test_the_lever_is_refused_where_q_k_v_do_not_read_one_fp8_input(tmp_path, monkeypatch):
    from reference import fp8_tiny_transformer

    from aotpack.builder.build import apply_overrides
    from aotpack.models.joined_qkv import install_joined_qkv
    from aotpack.recipes.recipe import load_recipe

    transformer, _ = fp8_tiny_transformer(monkeypatch, rank=0)
    with pytest.raises(RecipeError, match=r"transformer_blocks.0 .*fused_norm_quant"):  # blocks not marked
        install_joined_qkv(transformer)
    assert not hasattr(transformer.transformer_blocks[0].attn, "joined_qkv")  # nothing changed
    recipe = tmp_path / "r.toml"
    recipe.write_text('base = "h200"\nname = "j"\njoined_qkv = true\nfused_norm_quant = false\n')
    with pytest.raises(RecipeError, match="needs fused_norm_quant"):
        load_recipe(recipe)
    # the context-parallel and whole layouts run diffusers' block forward: their builds turn the lever off
    base = load_recipe("h200").replace(joined_qkv=True)
    assert not apply_overrides(base, parallel="ulysses").joined_qkv
    assert not apply_overrides(base, layout="whole").joined_qkv
    assert apply_overrides(base, max_rank=32).joined_qkv
