"""The merge policy: a LoRA set in slots (`merge=None`) is merged before a step once the token-steps it has
run plus those its pipeline call will run reach `after_token_steps`; `merge=False` keeps it in slots; a merge
that fails or would keep the originals in host memory leaves the set in slots."""

from __future__ import annotations

import logging

import pytest
import torch
from reference import REQUEST, rel_error

from aotpack.errors import UnsupportedCallError
from aotpack.runtime import merge as merge_module
from aotpack.runtime.merge import MERGED, SLOTS
from aotpack.runtime.merge_policy import AUTO_TOKEN_STEPS, MergePolicy

PEFT_TOLERANCE = 1e-4  # float32 on the CPU: merged weights vs slots, same math up to rounding


def _latents(served, seed=7):
    with torch.no_grad():
        return served(**REQUEST, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images


def _tokens_per_step() -> int:
    """REQUEST's transformer tokens per step: 64² latents pack to (64/16)² image tokens, plus the text."""
    return (REQUEST["height"] // 16) * (REQUEST["width"] // 16) + REQUEST["max_sequence_length"]


@pytest.fixture
def with_policy(served_tiny):
    modes = served_tiny.transformer.lora_modes

    def use(policy: MergePolicy):
        modes.auto.policy = policy
        modes.auto.merges = 0
        return modes

    yield use
    modes.auto.policy = MergePolicy()
    served_tiny.set_loras([])


def test_an_image_that_pays_merges_before_its_first_step(served_tiny, demo_loras, with_policy):
    lora = [(demo_loras["tiny-style-mlp"], 0.8)]
    steps = REQUEST["num_inference_steps"]
    modes = with_policy(MergePolicy(after_token_steps=steps * _tokens_per_step()))  # exactly one image's worth
    served_tiny.set_loras(lora, merge=True)
    merged_asked = _latents(served_tiny)
    served_tiny.set_loras(lora, merge=False)
    slots = _latents(served_tiny)
    assert modes.mode == SLOTS and modes.auto.merges == 0  # merge=False: left in slots
    served_tiny.set_loras([])

    served_tiny.set_loras(lora)  # merge=None: the policy decides
    assert modes.mode == SLOTS  # the switch itself stays a slot write
    auto = _latents(served_tiny)
    assert modes.mode == MERGED and served_tiny.transformer.merged and modes.auto.merges == 1
    assert torch.equal(auto, merged_asked)  # merged before step 1: the very image of merge=True
    assert rel_error(auto, slots) <= PEFT_TOLERANCE and rel_error(auto, slots) > 0


def test_short_images_of_one_set_merge_once_their_steps_add_up(served_tiny, demo_loras, with_policy):
    """Ski rental: 1-step images against a break-even of 2.5 steps merge before the third image's step."""
    tokens = _tokens_per_step()
    modes = with_policy(MergePolicy(after_token_steps=2.5 * tokens))
    one_step = {**REQUEST, "num_inference_steps": 1}
    for image in range(4):
        # each image asks for its set, as `run --requests` lines do: the very same set stays as it is
        served_tiny.set_loras([(demo_loras["tiny-style-mlp"], 1.0)])
        with torch.no_grad():
            served_tiny(**one_step, generator=torch.Generator("cpu").manual_seed(image), output_type="latent")
        assert modes.mode == (MERGED if image >= 2 else SLOTS), image
        assert modes.auto.merges == (1 if image >= 2 else 0), image  # merged once (no unmerge + merge again)
        if image < 2:  # the count goes on across the requests
            assert modes.auto.token_steps_run == (image + 1) * tokens
    served_tiny.set_loras([(demo_loras["tiny-style-mlp"], 0.5)])  # another scale: another set, unmerged, counted anew
    assert modes.mode == SLOTS and modes.auto.token_steps_run == 0


def test_a_set_pinned_in_slots_is_not_rewritten_per_request_unless_the_bank_changed(served_tiny, demo_loras,
                                                                                      with_policy):
    """`merge=False` repeated with the same set leaves the bank as it is (no rewrite per request); a write of the
    bank from outside (diffusers' LoRA calls write it too) makes the next repeat write the set again."""
    modes = with_policy(MergePolicy())
    lora = [(demo_loras["tiny-style-mlp"], 1.0)]
    served_tiny.set_loras(lora, merge=False)
    pinned = _latents(served_tiny)
    writes = modes.bank_writes
    served_tiny.set_loras(lora, merge=False)
    assert modes.bank_writes == writes and modes.mode == SLOTS  # repeated: nothing written
    served_tiny.transformer.bank.write({})  # from outside: the slots are empty now
    served_tiny.set_loras(lora, merge=False)
    assert modes.bank_writes == writes + 2 and modes.mode == SLOTS  # written again
    assert torch.equal(_latents(served_tiny), pinned)


def test_a_same_named_file_elsewhere_is_another_set(served_tiny, demo_loras, with_policy, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    modes = with_policy(MergePolicy.parse("always", "cpu"))
    served_tiny.set_loras([(demo_loras["tiny-style-mlp"], 1.0)])
    first = _latents(served_tiny)
    assert modes.mode == MERGED
    twin = tmp_path / "elsewhere" / demo_loras["tiny-style-mlp"].name  # same name, other weights
    twin.parent.mkdir()
    shutil.copy(demo_loras["tiny-style-mlp"], twin)
    save_file({k: v * 0.5 for k, v in load_file(twin).items()}, twin)
    served_tiny.set_loras([(twin, 1.0)])
    assert modes.mode == SLOTS  # the merged set left; the twin is in slots until its first step
    assert rel_error(_latents(served_tiny), first) > 1e-3


def test_unasked_merge_unmerges_bit_identical_at_the_next_switch(served_tiny, demo_loras, with_policy):
    from test_merge import _snapshot

    with_policy(MergePolicy.parse("always", "cpu"))
    served_tiny.set_loras([])
    originals = _snapshot(served_tiny.transformer)
    base = _latents(served_tiny)
    served_tiny.set_loras([(demo_loras["tiny-style-mlp"], 1.0)])
    _latents(served_tiny)
    assert served_tiny.transformer.merged
    served_tiny.set_loras([])
    assert not served_tiny.transformer.merged
    for name, tensors in _snapshot(served_tiny.transformer).items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, originals[name])), name
    assert torch.equal(_latents(served_tiny), base)


def test_a_failing_unasked_merge_leaves_the_set_in_slots(served_tiny, demo_loras, with_policy, monkeypatch, caplog):
    lora = [(demo_loras["tiny-style-mlp"], 0.8)]
    modes = with_policy(MergePolicy.parse("never", "cpu"))
    served_tiny.set_loras(lora)
    slots = _latents(served_tiny)
    with_policy(MergePolicy.parse("always", "cpu"))

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("no room for the fold (test)")

    monkeypatch.setattr(merge_module, "fold_all", out_of_memory)
    served_tiny.set_loras(lora)
    with caplog.at_level(logging.WARNING, logger="aotpack.runtime.merge"):
        image = _latents(served_tiny)
    assert "merging the LoRA set failed (OutOfMemoryError" in caplog.text
    assert modes.mode == SLOTS and not served_tiny.transformer.merged and modes.auto.merges == 0
    assert torch.equal(image, slots)  # the image ran, with the set in slots
    assert modes.auto.layers is None  # one attempt per set


def test_a_failing_merge_check_is_said_and_the_merge_goes_ahead(served_tiny, demo_loras, with_policy, monkeypatch,
                                                                 caplog):
    """The merge check is a safeguard, not the merge: if it cannot run, the policy says so and merges unchecked."""
    modes = with_policy(MergePolicy.parse("always", "cpu"))

    def broken(*args, **kwargs):
        raise RuntimeError("no estimate (test)")

    monkeypatch.setattr(merge_module, "estimate_merge", broken)
    served_tiny.set_loras([(demo_loras["tiny-style-mlp"], 1.0)])
    with caplog.at_level(logging.WARNING, logger="aotpack.runtime.merge"):
        _latents(served_tiny)
    assert "could not estimate what a merge keeps of the LoRA set (RuntimeError: no estimate (test))" in caplog.text
    assert modes.mode == MERGED and modes.auto.merges == 1 and modes.last_merge_estimate is None


def test_no_unasked_merge_where_the_originals_would_wait_in_host_memory(served_tiny, demo_loras, with_policy,
                                                                        monkeypatch):
    modes = with_policy(MergePolicy.parse("always", "cpu"))
    # a GPU short of memory sends the originals to the host (`_keep_device`); here: anywhere but the weights' device
    monkeypatch.setattr(type(modes), "_keep_device", lambda self, storages: torch.device("meta"))
    monkeypatch.setattr(merge_module, "estimate_merge", lambda *a, **k: pytest.fail("checked a declined merge"))
    served_tiny.set_loras([(demo_loras["tiny-style-mlp"], 1.0)])
    _latents(served_tiny)
    assert modes.mode == SLOTS and modes.auto.merges == 0 and modes.auto.layers is None


def test_policy_values():
    assert MergePolicy.parse("auto", "cpu") == MergePolicy(None)  # the CPU's costs were not measured
    assert MergePolicy.parse("auto", "cuda") == MergePolicy(AUTO_TOKEN_STEPS)
    assert MergePolicy.parse("always", "cuda").due(0, 1) and not MergePolicy.parse("never", "cuda").due(1e12, 1e12)
    with pytest.raises(UnsupportedCallError, match="'sometimes' is not one of auto, never, always"):
        MergePolicy.parse("sometimes", "cuda")


def test_load_refuses_a_bad_policy_before_reading_weights(tiny_package):
    import aotpack

    with pytest.raises(UnsupportedCallError, match="merge policy 'later'"):
        aotpack.load(tiny_package, model="tiny", merge_policy="later")


class _OtherRank:
    """A context-parallel comm stand-in whose other rank answers `others` in turn (all_agree is a MIN all-reduce)."""

    def __init__(self, *others: bool):
        self.others, self.asked = list(others), []

    def all_agree(self, ok: bool) -> bool:
        self.asked.append(ok)
        return ok and self.others.pop(0)


@pytest.mark.parametrize("others, merged", [((False,), False), ((True, False), False), ((True, True), True)],
                         ids=["other rank short of memory", "other rank's merge failed", "both merged"])
def test_context_parallel_ranks_merge_together_or_not_at_all(served_tiny, demo_loras, with_policy, monkeypatch,
                                                             others, merged):
    lora = [(demo_loras["tiny-style-mlp"], 0.8)]
    modes = with_policy(MergePolicy.parse("never", "cpu"))
    served_tiny.set_loras(lora)
    slots = _latents(served_tiny)
    with_policy(MergePolicy.parse("always", "cpu"))
    comm = _OtherRank(*others)
    monkeypatch.setattr(served_tiny.transformer, "context_parallel", comm, raising=False)
    served_tiny.set_loras(lora)
    image = _latents(served_tiny)
    assert modes.mode == (MERGED if merged else SLOTS) and modes.auto.merges == int(merged)
    assert comm.asked == [True, True][:len(others)]  # this rank could and did merge; it asked the others each time
    if not merged:
        assert torch.equal(image, slots)  # this rank back in slots (its own merge left), as the other rank is


def test_serve_metrics_show_the_policy_merges_and_the_mode(served_tiny, demo_loras, with_policy):
    """`/metrics` reads the worker's model at scrape time: merges made by the policy, and the current mode."""
    import types

    from aotpack.serve.metrics import Metrics

    def scrape(metrics, name):
        line = next(x for x in metrics.render().decode().splitlines() if x.startswith(name))
        return float(line.rsplit(" ", 1)[1])

    metrics = Metrics()
    worker = types.SimpleNamespace(served=served_tiny, cache=served_tiny.cache, gpu_memory_bytes=lambda: 0.0)
    metrics.bind(types.SimpleNamespace(depth=0), worker)
    with_policy(MergePolicy.parse("always", "cpu"))
    served_tiny.set_loras([(demo_loras["tiny-style-mlp"], 1.0)])
    assert scrape(metrics, 'aotpack_lora_mode{mode="slots"}') == 1.0
    assert scrape(metrics, "aotpack_lora_merges_total") == 0.0
    _latents(served_tiny)
    assert scrape(metrics, 'aotpack_lora_mode{mode="merged"}') == 1.0
    assert scrape(metrics, 'aotpack_lora_mode{mode="slots"}') == 0.0
    assert scrape(metrics, "aotpack_lora_merges_total") == 1.0
