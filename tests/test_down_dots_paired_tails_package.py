"""Recipe levers `lora_down_fp8_dots` (+ `lora_down_fp8_text`) and `lora_tails_paired` (2026-12-08, off: unmeasured on
a GPU) in one real CPU package.

- `lora_down_fp8_dots`: the LoRA down-projections after the MLP GELUs read A as FP8 high and low rows, two more
  program inputs a slot, which the runtime writes from the bank's A after every switch (runtime/a_halves_bank.py);
  with `lora_down_fp8_text` the double blocks' text feed-forwards' too;
- `lora_tails_paired`: a single block's four tailed readers in two pairs, each pair's GEMMs reading one
  `[tail_a | q / H | tail_b]` buffer, the first reader's tailed weight `[tail | W]` (models/lora_tails.py).

The package is the FP8 test package's recipe (tests/conftest.py: `fp8_build`) with `lora_down_from_fp8`, `lora_tails`
and the two levers (as h100/h200 would carry them). Served, against diffusers + PEFT in bf16, each demo LoRA's effect
is as close as the FP8 package's (within the FP8 rounding of the GELU output that `lora_down_from_fp8` adds), in the
tailed and the slotted programs; the halves hold the live set after each switch, bit for bit what the build splits,
and the programs read them; a merge writes the paired readers' base columns and its unmerge restores them.
"""

from __future__ import annotations

import pytest
import torch
from reference import load_fp8_package, peft_outputs, rel_error, run_float, served_beside_fp8, tiny_forward_inputs

from aotpack.models.lora_down_fp8 import fp8_hi_lo_rows
from aotpack.models.slots import a_halves_input_names, lora_input_names
from aotpack.store.manifest import read_manifest


@pytest.fixture(scope="module")
def levers_package(tmp_path_factory):
    from reference import build_fp8_package

    levers = ("group_lora_down = true\nbatched_modulation = true\nlora_tails = true\nlora_tails_paired = true\n"
              "lora_down_from_fp8 = true\nlora_down_fp8_dots = true\nlora_down_fp8_text = true")
    return build_fp8_package(tmp_path_factory.mktemp("levers"), levers).path


def _halves_slots(transformer) -> list[str]:
    return sorted(name.removesuffix(".lora_A_fp8") for name in transformer.bank.tensors if name.endswith(".lora_A_fp8"))


def _assert_halves_hold_the_bank(transformer) -> None:
    for slot in _halves_slots(transformer):
        a8, a_scale = (transformer.bank.tensors[n] for n in a_halves_input_names(slot))
        split = fp8_hi_lo_rows(transformer.bank.tensors[lora_input_names(slot)[0]])
        assert torch.equal(a8.view(torch.uint8), split[0].view(torch.uint8)) and torch.equal(a_scale, split[1]), slot


def test_the_programs_read_a_halves_of_the_slots_after_the_gelus(levers_package):
    manifest = read_manifest(levers_package)
    assert manifest.recipe["lora_down_fp8_dots"] is True and manifest.recipe["lora_down_from_fp8"] is True
    assert manifest.format_version == 8  # older runtimes refuse it: they would not write the halves
    assert "single_block.tails" in {p.name for p in manifest.programs}
    served = load_fp8_package(levers_package)
    transformer = served.transformer
    owner = transformer._weights_owner
    # each double block's MLP-out, the text stream's too (lora_down_fp8_text), and each single block's proj_out
    expected = [f"transformer_blocks.{i}.{ff}.net.2" for i in range(len(owner.transformer_blocks))
                for ff in ("ff", "ff_context")]
    expected += [f"single_transformer_blocks.{i}.proj_out" for i in range(len(owner.single_transformer_blocks))]
    assert _halves_slots(transformer) == sorted(expected) and len(transformer.a_halves) == len(expected)
    assert transformer.a_halves.refresh in transformer.bank.after_write


def test_a_lora_through_both_levers_is_as_close_to_peft_as_the_fp8_package(levers_package, fp8_package, demo_loras):
    run = served_beside_fp8(levers_package, fp8_package)
    served, plain, transformer, inputs = run.served, run.plain, run.transformer, run.inputs
    base = run.base
    assert torch.equal(base, run.plain_base)  # no LoRA: the no-slot programs, the same as the FP8 package's
    _assert_halves_hold_the_bank(transformer)  # all zero codes
    first = {}
    for name, path, reference in peft_outputs(run.eager, inputs, demo_loras):
        effect = reference - run.ref_base
        plain.set_loras([(path, 1.0)])
        plain_fidelity = rel_error(run_float(plain.transformer, inputs) - run.plain_base, effect)
        served.set_loras([(path, 1.0)])
        _assert_halves_hold_the_bank(transformer)  # the switch wrote them
        for use_tails, variant in ((True, "tails"), (False, "slots")):
            transformer.use_tails = use_tails
            output = run_float(transformer, inputs)
            assert transformer.last_variant == variant, name
            # the LoRA's effect as close to PEFT's as the FP8 package's: the GELU output's FP8 rounding in u on the
            # marked linears, and A's second FP8 rounding, cost a little (here the MLP LoRA's fidelity 0.298 / 0.302
            # in tails / slots against 0.293, the all-layer one's 0.060 / 0.060 against 0.060; the attention LoRA,
            # which no marked linear carries, 1.167 / 1.170 against 1.170: its effect is small beside FP8's error)
            fidelity = rel_error(output - base, effect)
            assert fidelity <= 1.1 * plain_fidelity + 0.01, (name, variant, fidelity, plain_fidelity)
            first[name, variant] = output
        transformer.use_tails = True
        # the paired tails as close as the same package's slots (a pair's tails swapped or misplaced would not be)
        assert (rel_error(first[name, "tails"] - base, effect)
                <= 1.02 * rel_error(first[name, "slots"] - base, effect) + 0.01), name
        assert rel_error(first[name, "tails"], first[name, "slots"]) > 0  # the tailed programs ran
    # a switch back writes the halves again: the same output bit for bit (the MLP LoRA: its layers read them)
    name, path = "tiny-style-mlp", demo_loras["tiny-style-mlp"]
    served.set_loras([(path, 1.0)])
    assert torch.equal(run_float(transformer, inputs), first[name, "tails"])
    # the programs read the halves (not A): halves of a zero A, written by hand, give another output
    saved = {n: t.clone() for n, t in transformer.bank.tensors.items() if n.endswith(("_fp8", "_fp8_scale"))}
    for slot in _halves_slots(transformer):
        for target, value in zip((transformer.bank.tensors[n] for n in a_halves_input_names(slot)),
                                 fp8_hi_lo_rows(torch.zeros_like(transformer.bank.tensors[f"{slot}.lora_A"]))):
            target.copy_(value)
    assert rel_error(run_float(transformer, inputs), first[name, "tails"]) > 1e-3
    for n, t in saved.items():
        transformer.bank.tensors[n].copy_(t)
    assert torch.equal(run_float(transformer, inputs), first[name, "tails"])


def test_paired_readers_share_their_base_columns_and_a_merge_round_trip_restores_them(levers_package, demo_loras):
    from aotpack.models.lora_tails import TAIL_COLUMNS
    from aotpack.models.tail_groups import READERS

    served = load_fp8_package(levers_package)
    transformer = served.transformer
    owner = transformer._weights_owner
    for block in owner.single_transformer_blocks:
        group = block.lora_tails
        assert group.paired and group.readers == READERS
        for position, reader in enumerate(READERS):
            qdata, tailed = block.get_submodule(reader).base.weight.qdata, group.weights[position]
            # q and v (the first of each pair): `[tail | W]`, the base a view after the tail; k and MLP-in `[W | tail]`
            offset = TAIL_COLUMNS if position % 2 == 0 else 0
            assert qdata.data_ptr() == tailed.data_ptr() + offset and qdata.stride() == tailed.stride(), reader
            assert qdata.shape == (tailed.shape[0], tailed.shape[1] - TAIL_COLUMNS)
    inputs = tiny_forward_inputs(transformer)
    lora = [(demo_loras["tiny-style-all"], 0.8)]
    served.set_loras(lora)
    tails = run_float(transformer, inputs)
    assert transformer.last_variant == "tails"
    bases = [block.get_submodule(r).base.weight.qdata.clone() for block in owner.single_transformer_blocks
             for r in READERS]
    served.set_loras(lora, merge=True)
    run_float(transformer, inputs)
    assert transformer.merged and transformer.last_variant == "no_slots"
    merged = [block.get_submodule(r).base.weight.qdata for block in owner.single_transformer_blocks for r in READERS]
    assert any(not torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(merged, bases))
    served.set_loras([(demo_loras["tiny-style-mlp"], 1.0)])  # unmerges, then writes the new set
    served.set_loras(lora)
    assert torch.equal(run_float(transformer, inputs), tails) and transformer.last_variant == "tails"
    after = [block.get_submodule(r).base.weight.qdata for block in owner.single_transformer_blocks for r in READERS]
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(after, bases))
