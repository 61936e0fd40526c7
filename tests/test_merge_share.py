"""A partial merge (`merge_share` < 1): only some blocks' LoRA layers are folded into the weights, those blocks run
their no-slot programs, and the rest of the set stays in slots; unmerging restores every weight bit for bit."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from reference import rel_error
from test_merge import PEFT_TOLERANCE, _assert_weights_are, _base_then_slots, _eager_peft, _inputs, _run, _snapshot

from aotpack.bench.fidelity import lora_effect_error
from aotpack.errors import UnsupportedCallError
from aotpack.runtime.merge import MERGED, SLOTS
from aotpack.runtime.merge_policy import MergePolicy
from aotpack.runtime.merge_share import blocks_to_merge, check_share


@pytest.fixture
def half_share(served_tiny):
    """`served_tiny` whose merges fold half of a set's block weights (restored after the test)."""
    auto = served_tiny.transformer.lora_modes.auto
    policy = auto.policy
    auto.policy = dataclasses.replace(policy, share=0.5)
    try:
        yield served_tiny
    finally:
        served_tiny.set_loras([])
        auto.policy = policy


def _calls(compiled) -> dict[tuple[str, str, int], int]:
    programs = {"slots": compiled._programs, "noslot": compiled._no_slot_programs}
    return {(variant, kind, i): instance.calls for variant, by_kind in programs.items()
            for kind, instances in by_kind.items() for i, instance in enumerate(instances)}


def test_partial_merge_folds_half_the_blocks_keeps_the_rest_in_slots_and_restores_bit_for_bit(half_share,
                                                                                                demo_loras):
    served, compiled = half_share, half_share.transformer
    path, scale = demo_loras["tiny-style-all"], 0.8  # every linear: blocks, embedders, modulation, output
    inputs = _inputs(served)
    originals, base, slots = _base_then_slots(served, [(path, scale)], inputs)
    set_layers = {name for name, rank in compiled.bank.used_rank.items() if rank}

    served.set_loras([(path, scale)], merge=True)
    blocks = dict(compiled.mergeable_blocks())
    folded = compiled.merged_blocks
    assert compiled.lora_modes.mode == MERGED and not compiled.merged
    assert 0 < len(folded) < len(blocks) and {kind for kind, _ in folded} == {"double_block", "single_block"}
    folded_layers = {name for key in folded for name in blocks[key]}
    # the folded blocks' layers hold W + scale * B A in place; every other layer is untouched and in the bank
    changed = {name for name, tensors in _snapshot(compiled).items() if not torch.equal(tensors[0], originals[name][0])}
    assert changed == folded_layers & set_layers
    assert {name for name, rank in compiled.bank.used_rank.items() if rank} == set_layers - folded_layers

    before = _calls(compiled)
    partial = _run(compiled, inputs)
    ran = {key for key, calls in _calls(compiled).items() if calls > before[key]}
    assert compiled.last_variant.startswith("slots+merged:")
    for kind, index in blocks:  # each block ran once, as its own variant
        variant = "noslot" if (kind, index) in folded else "slots"
        assert (variant, kind, index) in ran and ({"slots", "noslot"} - {variant}).pop() not in {
            v for v, k, i in ran if (k, i) == (kind, index)}

    ref_base, ref_fused = _eager_peft(path, scale, inputs, fuse=True)
    assert rel_error(partial, ref_fused) <= PEFT_TOLERANCE and rel_error(partial, slots) <= PEFT_TOLERANCE
    assert lora_effect_error(partial, base, ref_fused, ref_base) <= 0.10
    assert rel_error(partial, base) > 1e-2

    served.set_loras([])
    assert not compiled.merged_blocks and compiled.bank.is_empty and compiled.last_variant is not None
    _assert_weights_are(compiled, originals)
    assert torch.equal(_run(compiled, inputs), base)


def test_a_switch_from_a_partial_merge_leaves_it_whole(half_share, demo_loras):
    served, compiled = half_share, half_share.transformer
    inputs = _inputs(served, seed=6)
    served.set_loras([])
    originals = _snapshot(compiled)
    served.set_loras([(demo_loras["tiny-style-attn"], 0.5)])
    attn_slots = _run(compiled, inputs)
    served.set_loras([(demo_loras["tiny-style-mlp"], 1.0)], merge=True)
    assert compiled.merged_blocks
    served.set_loras([(demo_loras["tiny-style-attn"], 0.5)])  # into slots: the partial merge leaves first
    assert compiled.lora_modes.mode == SLOTS and not compiled.merged_blocks and not compiled.merged
    _assert_weights_are(compiled, originals)
    assert torch.equal(_run(compiled, inputs), attn_slots) and compiled.last_variant == "slots"


def test_a_merge_that_fails_midway_leaves_no_half_of_a_partial_merge(half_share, demo_loras, monkeypatch):
    import aotpack.runtime.merge as merge

    served, compiled = half_share, half_share.transformer
    served.set_loras([])
    originals = _snapshot(compiled)

    def fail(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("out of memory (test)")

    monkeypatch.setattr(merge, "fold_all", fail)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        served.set_loras([(demo_loras["tiny-style-all"], 1.0)], merge=True)
    assert not compiled.merged_blocks and compiled.bank.is_empty and served.active == []
    _assert_weights_are(compiled, originals)


def test_blocks_to_merge_takes_the_share_spread_along_the_chain():
    blocks = [(("double_block", i), {f"d{i}.a", f"d{i}.b"}) for i in range(19)]
    blocks += [(("single_block", i), {f"s{i}.a"}) for i in range(38)]
    touched = {name: 100 for _, names in blocks for name in names}
    total = sum(touched.values())
    for share in (0.1, 0.25, 0.36, 0.5, 0.7, 0.9):
        chosen = blocks_to_merge(blocks, touched, share)
        folded = sum(touched[name] for key, names in blocks if key in chosen for name in names)
        assert abs(folded / total - share) <= 100 / total, share
        singles = sorted(i for kind, i in chosen if kind == "single_block")
        if share <= 0.5:  # spread: no two neighbouring single blocks both folded
            assert all(b - a >= 2 for a, b in zip(singles, singles[1:])), share
    assert blocks_to_merge(blocks, {"d0.a": 100}, 0.5) == {("double_block", 0)}  # only touched blocks count
    assert blocks_to_merge(blocks, {}, 0.5) == set()


@pytest.mark.parametrize("share", [0, -0.5, 1.5, float("nan"), float("inf"), True, "half", None])
def test_a_bad_merge_share_is_refused_with_the_fix(share):
    with pytest.raises(UnsupportedCallError) as raised:
        check_share(share)
    assert repr(share) in raised.value.problem and "merge_share=1" in raised.value.fix
    with pytest.raises(UnsupportedCallError):
        MergePolicy.parse("never", "cpu", share)
    assert MergePolicy.parse("never", "cpu", 0.25) == MergePolicy(None, 0.25)


def test_the_merge_policy_folds_the_same_share_before_a_step(half_share, demo_loras):
    """An unasked merge (`merge_policy="always"`) folds the share too: the image equals the asked partial merge's
    bit for bit, and the next switch restores the weights."""
    from test_merge_policy import _latents

    served, compiled = half_share, half_share.transformer
    modes = compiled.lora_modes
    modes.auto.policy = dataclasses.replace(MergePolicy.parse("always", "cpu"), share=0.5)
    lora = [(demo_loras["tiny-style-all"], 0.8)]
    served.set_loras([])
    originals, base = _snapshot(compiled), _latents(served)
    served.set_loras(lora, merge=True)
    asked = _latents(served)
    asked_blocks = compiled.merged_blocks
    served.set_loras([])
    served.set_loras(lora)  # merge=None: in slots until the policy's merge before the first step
    assert modes.mode == SLOTS and not compiled.merged_blocks
    auto = _latents(served)
    assert modes.mode == MERGED and compiled.merged_blocks == asked_blocks and not compiled.merged
    assert torch.equal(auto, asked)
    served.set_loras([])
    _assert_weights_are(compiled, originals)
    assert torch.equal(_latents(served), base)
