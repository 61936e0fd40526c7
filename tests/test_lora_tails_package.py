"""Recipe levers `lora_tails` and `lora_tails_mlp_in`: a real CPU package whose single blocks and double blocks also
carry tailed programs (models/tail_groups.py).

The package is the FP8 test package's recipe (tests/conftest.py: `fp8_build`) plus the levers, so its slotted and
no-slot programs read what that package's read; the tailed programs read the tailed weights and one group input a
tail group (a single block's q/k/v/MLP-in, each double-block stream's MLP-in), written by the runtime at each switch
(runtime/tail_bank.py). Against diffusers + PEFT in bf16 the tails
reproduce a LoRA as closely as slots do (output error and LoRA fidelity), at scale 1 and at 100 (each row's headroom
then large), and a set the tails cannot hold (rank above 64) runs in slots, bit for bit the FP8 package's output.
"""

from __future__ import annotations

import pytest
import torch

from reference import load_fp8_package, peft_outputs, rel_error, run_float, served_beside_fp8, tiny_forward_inputs

from aotpack.errors import RecipeError
from aotpack.models.lora_tails import TAIL_COLUMNS, TAIL_RANK
from aotpack.store.manifest import read_manifest

READERS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
MLP_IN = {"lora_tails": "ff.net.0.proj", "lora_tails_context": "ff_context.net.0.proj"}  # a double block's groups


@pytest.fixture(scope="module")
def tails_build(tmp_path_factory):
    """The package, and the LoRA down-projection matmuls the build's grouping pass removed from each program."""
    from reference import build_fp8_package

    from aotpack.builder import build as builder

    grouped, group = {}, builder.group_lora_down_projections

    def recorded(program, name="program"):
        grouped[name] = removed = group(program, name)
        return removed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builder, "group_lora_down_projections", recorded)
        path = build_fp8_package(tmp_path_factory.mktemp("tails"), "group_lora_down = true\nbatched_modulation = true\n"
                                                                   "lora_tails = true\nlora_tails_mlp_in = true").path
    return path, grouped


@pytest.fixture(scope="module")
def tails_package(tails_build):
    return tails_build[0]


def test_the_tailed_programs_group_their_other_slots_down_projections_as_the_slotted_ones(tails_build):
    # a double block's tailed program keeps its q/k/v slots: one down-projection GEMM a stream, as in the slotted
    # program (2026-12-07i measured it without the pass: ungrouped, 0.57 ms more a 512² step on an H100)
    _, grouped = tails_build
    assert grouped["double_block.tails"] == grouped["double_block"] > 0
    assert grouped["single_block"] > 0 and grouped["single_block.tails"] == 0  # its one slot left: proj_out


def test_the_tailed_programs_read_the_tailed_weights(tails_package, fp8_package):
    manifest, plain = read_manifest(tails_package), read_manifest(fp8_package)
    # format 7: older runtimes, which would bind the readers' base weights contiguous, refuse the package
    assert manifest.recipe["lora_tails"] is True and manifest.recipe["lora_tails_mlp_in"] is True
    assert manifest.format_version == 7
    # the build validated both sets: the random LoRA ran the tailed programs, then the slotted ones
    assert set(manifest.validation["cases"][0]) >= {"rel_error_random_lora", "rel_error_random_lora_slots"}
    programs = {p.name: p for p in manifest.programs}
    plain_programs = {p.name: p for p in plain.programs}
    groups = {"single_block": {"lora_tails": READERS}, "double_block": {h: (r,) for h, r in MLP_IN.items()}}
    for kind, holders in groups.items():
        tailed = programs[f"{kind}.tails"]
        assert tailed.kind == kind and tailed.rank == manifest.max_rank
        readers = [r for names in holders.values() for r in names]
        weights = {f"body.{h}.weights.{i}" for h, names in holders.items() for i in range(len(names))}
        assert weights <= set(tailed.constants)
        # instead of the readers' FP8 data (their row scales stay: the tailed GEMM scales by them)
        assert not {f"body.{r}.base.parametrizations.weight.original0" for r in readers} & set(tailed.constants)
        assert {f"body.{r}.base.parametrizations.weight.original1" for r in readers} <= set(tailed.constants)
        # the other programs are the FP8 package's, the tailed weights none of their constants
        for name in (kind, f"{kind}.noslot"):
            assert programs[name].constants == plain_programs[name].constants


def test_tails_reproduce_a_lora_as_slots_do_and_fall_back_to_slots(tails_package, fp8_package, demo_loras):
    run = served_beside_fp8(tails_package, fp8_package)
    served, slots, transformer, eager, inputs = run.served, run.plain, run.transformer, run.eager, run.inputs
    ref_base, base, slots_base = run.ref_base, run.base, run.plain_base
    assert transformer.last_variant == "no_slots" and torch.equal(base, slots_base)
    for name, path, reference in peft_outputs(eager, inputs, demo_loras):
        served.set_loras([(path, 1.0)])
        tails = run_float(transformer, inputs)
        assert transformer.last_variant == "tails", name
        slots.set_loras([(path, 1.0)])
        in_slots = run_float(slots.transformer, inputs)
        assert slots.transformer.last_variant == "slots"
        # the LoRA's effect: as close to PEFT's as slots' (LoRA fidelity), and the output's error too
        effect = reference - ref_base
        fidelity = rel_error(tails - base, effect)
        slots_fidelity = rel_error(in_slots - slots_base, effect)
        assert fidelity <= 1.02 * slots_fidelity + 0.01, (name, fidelity, slots_fidelity)
        assert rel_error(tails, reference) <= 1.05 * rel_error(in_slots, reference) + 1e-3, name
        assert rel_error(tails, in_slots) > 0  # a program of its own ran (not the slots' bits)
    # a strong set (scale 100: most rows' tails need headroom) runs in tails too, as close to PEFT as slots
    strong = [(demo_loras["tiny-style-attn"], 100.0)]
    eager.set_adapters(["a0"], [100.0])  # a0: tiny-style-attn, loaded first above
    effect = run_float(eager, inputs) - ref_base
    served.set_loras(strong)
    tails = run_float(transformer, inputs)
    assert transformer.last_variant == "tails"
    slots.set_loras(strong)
    in_slots = run_float(slots.transformer, inputs)
    assert rel_error(tails - base, effect) <= 1.02 * rel_error(in_slots - slots_base, effect) + 0.01
    # a set of rank above the tails' keeps the slotted programs, bit for bit the FP8 package's (the rank is set by
    # hand: this package's max_rank, 16, admits no such set)
    transformer.bank.used_rank[transformer.tails.readers[0].name] = TAIL_RANK + 1
    transformer.tails.refresh()
    assert not transformer.tails.ready
    assert torch.equal(run_float(transformer, inputs), in_slots) and transformer.last_variant == "slots"


def _shared_views(owner) -> list[tuple]:
    """(block, tail group attribute, position, reader, block kind) of every tailed reader of `owner`."""
    views = [(block, "lora_tails", i, reader, "single") for block in owner.single_transformer_blocks
             for i, reader in enumerate(READERS)]
    return views + [(block, holder, 0, reader, "double") for block in owner.transformer_blocks
                    for holder, reader in MLP_IN.items()]


def _base_rows(block, holder, position, reader, kind) -> torch.Tensor:
    """The tailed weight's first columns: the reader's base weight."""
    return getattr(block, holder).weights[position][:, :block.get_submodule(reader).in_features]


def test_merge_runs_no_slot_programs_and_a_switch_back_runs_the_tails_again(tails_package, demo_loras):
    served = load_fp8_package(tails_package)
    transformer = served.transformer
    inputs = tiny_forward_inputs(transformer)
    lora = [(demo_loras["tiny-style-all"], 0.8)]
    served.set_loras(lora)
    tails = run_float(transformer, inputs)
    assert transformer.last_variant == "tails"
    # the build's repeatability probe runs every program of the chain twice, the tailed ones included
    calls = [instance.calls for instance in transformer._tail_programs["single_block"]]
    assert transformer.unrepeatable_programs(**inputs) == {}
    assert [instance.calls for instance in transformer._tail_programs["single_block"]] == [c + 2 for c in calls]
    owner = transformer._weights_owner
    views = _shared_views(owner)
    base_rows = [_base_rows(*view).clone() for view in views]
    served.set_loras(lora, merge=True)
    run_float(transformer, inputs)
    assert transformer.merged and transformer.last_variant == "no_slots"
    # one storage: the merge wrote the base weights' rows, which are the tailed weights' first columns
    merged_rows = [_base_rows(*view) for view in views]
    for kind in ("single", "double"):  # the merge wrote rows of both block kinds' groups
        assert any(not torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                   for view, a, b in zip(views, merged_rows, base_rows) if view[4] == kind)
    served.set_loras([(demo_loras["tiny-style-mlp"], 1.0)])  # unmerges, then writes the new set's tails
    run_float(transformer, inputs)
    assert not transformer.merged and transformer.last_variant == "tails"
    served.set_loras(lora)
    assert torch.equal(run_float(transformer, inputs), tails) and transformer.last_variant == "tails"
    # the unmerge restored the shared rows bit for bit, and the tails never wrote them
    after = [_base_rows(*view) for view in views]
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(after, base_rows))
    for block, holder, i, reader, _ in views:
        qdata = block.get_submodule(reader).base.weight.qdata
        tailed = getattr(block, holder).weights[i]
        # the base weight is a view of the tailed weight's first columns (no second copy of the weights)
        assert qdata.data_ptr() == tailed.data_ptr() and qdata.stride() == tailed.stride()
        assert qdata.shape == (tailed.shape[0], tailed.shape[1] - TAIL_COLUMNS)


def test_the_lever_needs_the_quantized_norms(tmp_path):
    from pathlib import Path

    import aotpack.recipes
    from aotpack.recipes.recipe import TAILS_MAX_RANK, load_recipe

    cpu = (Path(aotpack.recipes.__file__).parent / "cpu.toml").read_text()
    path = tmp_path / "r.toml"
    path.write_text(cpu.replace('layout = "regional"', 'layout = "regional"\nlora_tails = true'))
    with pytest.raises(RecipeError, match="lora_tails = true needs fused_norm_quant"):
        load_recipe(str(path))
    for lever in ("lora_tails_mlp_in", "lora_tails_paired"):  # each extends or lays out the single blocks' tails
        path.write_text(cpu.replace('layout = "regional"', f'layout = "regional"\n{lever} = true'))
        with pytest.raises(RecipeError, match=f"{lever} = true needs lora_tails = true"):
            load_recipe(str(path))
    assert TAILS_MAX_RANK == TAIL_RANK  # the recipe's bound is the op's rank (recipes load without torch)
    # h200 carries the tails: a larger max_rank over it is refused by name, with the fix
    path.write_text('base = "h200"\nname = "big"\nmax_rank = 128\n')
    with pytest.raises(RecipeError, match=r"lora_tails = true needs max_rank 1-64 \(this recipe has 128\)") as caught:
        load_recipe(str(path))
    assert "set lora_tails = false" in str(caught.value)
    path.write_text('base = "h200"\nname = "big"\nmax_rank = 128\nlora_tails = false\n')
    assert load_recipe(str(path)).max_rank == 128


def test_the_double_blocks_get_tail_groups_only_with_lora_tails_mlp_in(monkeypatch):
    """What a package without `lora_tails_mlp_in` (`h100`'s) binds: the double blocks' MLP-in weights stay contiguous,
    as its double-block programs were compiled; the flag adds one group a stream, views of the tailed weights."""
    from reference import fp8_tiny_transformer

    from aotpack.models.tail_groups import install_lora_tails

    transformer, _ = fp8_tiny_transformer(monkeypatch, rank=4)  # slotted: the readers must be LoRA slots
    singles, doubles = transformer.single_transformer_blocks, transformer.transformer_blocks
    assert install_lora_tails(transformer) == len(singles)
    for block in doubles:
        assert not hasattr(block, "lora_tails") and not hasattr(block, "lora_tails_context")
        assert all(block.get_submodule(reader).base.weight.qdata.is_contiguous() for reader in MLP_IN.values())
    assert install_lora_tails(transformer) == 0  # a second call changes nothing
    assert install_lora_tails(transformer, mlp_in=True) == 2 * len(doubles)  # the single blocks' groups kept
    for block in doubles:
        for holder, reader in MLP_IN.items():
            qdata, tailed = block.get_submodule(reader).base.weight.qdata, getattr(block, holder).weights[0]
            assert getattr(block, holder).readers == (reader,)
            assert qdata.data_ptr() == tailed.data_ptr() and qdata.stride() == tailed.stride()


def test_slots_that_leave_a_tail_reader_out_turn_the_tails_off_with_a_warning(monkeypatch, caplog):
    """`build --target h200 --slots ...` (h200 carries the tails): a slot choice that leaves any tail group's reader
    unslotted builds without tails and says so, as --layout/--parallel/--max-rank do, instead of refusing after the
    model loaded with a fix (`lora_tails = false`) that no flag gives."""
    from reference import fp8_tiny_transformer

    from aotpack.builder.build import tails_for_slots
    from aotpack.models.slots import slot_modules
    from aotpack.recipes.recipe import load_recipe

    transformer, _ = fp8_tiny_transformer(monkeypatch, rank=4)  # every linear slotted: the names a build would slot
    h200 = load_recipe("h200")
    everything = list(slot_modules(transformer))
    assert tails_for_slots(h200, transformer, everything) is h200
    attention_only = [name for name in everything if ".attn." in name]
    with caplog.at_level("WARNING"):
        built = tails_for_slots(h200, transformer, attention_only)
    assert not built.lora_tails and not built.lora_tails_mlp_in and built.replace(lora_tails=True) == h200
    assert "lora_tails is off" in caplog.text and "single_transformer_blocks.0.proj_mlp" in caplog.text
    # the double blocks' MLP-in counts only where the recipe tails it
    no_double_mlp_in = [name for name in everything if not name.startswith("transformer_blocks.")
                        or ".ff.net.0.proj" not in name and ".ff_context.net.0.proj" not in name]
    assert tails_for_slots(h200, transformer, no_double_mlp_in) is h200
    assert not tails_for_slots(h200.replace(lora_tails_mlp_in=True), transformer, no_double_mlp_in).lora_tails
