"""Context parallel (Ulysses) packages on the CPU: gloo, 2 real rank processes, the tiny model.

The split package (blocks cut around attention) must give the unsplit block's numbers in eager,
the same output on 1 and 2 ranks as the normal package (with and without LoRA, across switches),
keep every rank on the same LoRA set when one rank refuses a set, and end the whole run with a
clear error when a rank fails.
"""

from __future__ import annotations

import time

import pytest
import torch

from aotpack.errors import AotpackError
from aotpack.models.examples import relative_error, transformer_inputs

TOLERANCE = 1e-5  # fp32 relative L2


def _inputs(dtype=torch.float32):
    from aotpack.models.checkpoint import load_transformer_config, parse_model_ref

    config = load_transformer_config(parse_model_ref("tiny"))
    # 31 text tokens: the two ranks get uneven shards (16 + 15)
    return transformer_inputs(config, batch=1, image_tokens=64, text_tokens=31, dtype=dtype, device="cpu",
                              generator=torch.Generator().manual_seed(1))


def _forward(served, inputs):
    with torch.no_grad():
        return served.transformer(**inputs, return_dict=False)[0]


# -- rank functions (module level: spawned ranks import them) --------------------------------------
def _rank_outputs(ctx, package, inputs, lora_sets_by_rank):
    from aotpack.runtime.parallel import load_rank

    served = load_rank(ctx, package, "tiny")
    outputs = []
    for loras in lora_sets_by_rank[ctx.rank]:
        try:
            served.set_loras(loras)
            outputs.append(("ok", _forward(served, inputs)))
        except AotpackError as err:  # a refused set: this rank must still hold the previous one
            outputs.append(("refused", err.problem, _forward(served, inputs)))
    return outputs


def _rank_fp8_outputs(ctx, package, inputs, lora_sets_by_rank):
    """`_rank_outputs` for a CPU FP8 package: torchao's hardware check lifted in this rank's process too."""
    import torchao.quantization.quant_api as quant_api

    quant_api._check_hardware_support = lambda granularity: None
    return _rank_outputs(ctx, package, inputs, lora_sets_by_rank)


def _rank_fails(ctx, package, inputs):
    from aotpack.runtime.parallel import load_rank

    served = load_rank(ctx, package, "tiny")
    if ctx.rank == 1:
        raise RuntimeError("injected failure on rank 1")
    return _forward(served, inputs)  # rank 0 waits in the first all-to-all until it is ended


def _seeded_qkv(total_tokens):
    return torch.randn(8, 3, 2, total_tokens, 16, generator=torch.Generator().manual_seed(0))  # [H, 3, B, S, D]


def _rank_tokens(rank, text_sizes, image_sizes):
    """Rank `rank`'s rows of the one-GPU sequence [all text; all image]: its text, then its image."""
    text_at, image_at = sum(text_sizes[:rank]), sum(text_sizes) + sum(image_sizes[:rank])
    return list(range(text_at, text_at + text_sizes[rank])) + list(range(image_at, image_at + image_sizes[rank]))


def _rank_attend(ctx, text_sizes, image_sizes, chunk_options):
    """This rank's attention output for each `overlap_chunks` value, on its shard of a seeded q/k/v."""
    full = _seeded_qkv(sum(text_sizes) + sum(image_sizes))
    mine = full[:, :, :, _rank_tokens(ctx.rank, text_sizes, image_sizes)].contiguous()
    seq_sizes = [t + i for t, i in zip(text_sizes, image_sizes)]
    outputs, overlapped = {}, []
    original = ctx.comm._attend_overlapped
    ctx.comm._attend_overlapped = lambda *args: overlapped.append(args[-1]) or original(*args)
    for chunks in chunk_options:
        ctx.comm.overlap_chunks = chunks
        outputs[chunks] = ctx.comm.attend(mine, seq_sizes, text_sizes)
    ctx.comm.overlap_chunks, ctx.comm.token_order = 1, "rank"  # keys in rank order: the same up to summation order
    outputs["rank order"] = ctx.comm.attend(mine, seq_sizes, text_sizes)
    # drop the spy: left on, it ties the communicator (and its process group) into a reference cycle that
    # is only freed at interpreter exit, where gloo's teardown aborted about 1 rank process in 6
    del ctx.comm._attend_overlapped
    return outputs, overlapped


# -- tests ---------------------------------------------------------------------------------------------
def test_overlapped_all_to_all_gives_the_same_attention_as_one_transfer():
    """Heads in chunks, each chunk's all-to-all asynchronous and overlapping another chunk's attention
    (`Ulysses.overlap_chunks`): rank 0's tokens get exactly the one-GPU attention, for 1, 2 and 4
    chunks of its 4 heads, and 3 (does not divide 4: one transfer) too. Uneven shards: 2 + 1 text and
    3 + 3 image tokens; attention runs over [all text; all image], the one-GPU order, so the result
    is bit-identical to one GPU's (with FP8 programs any last-bit change is amplified downstream)."""
    from aotpack.models.split_regions import attention
    from aotpack.runtime.parallel import launch

    text_sizes, image_sizes = [2, 1], [3, 3]
    results, overlapped = launch(_rank_attend, 2, text_sizes, image_sizes, [1, 2, 4, 3])
    assert overlapped == [2, 4]  # the chunked path ran for the chunk counts that divide 4 heads
    expected = attention(_seeded_qkv(9))[:, _rank_tokens(0, text_sizes, image_sizes)]
    rank_order = results.pop("rank order")
    for chunks, output in results.items():
        assert output.shape == expected.shape == (2, 5, 8 * 16)
        assert torch.equal(output, expected), (chunks, relative_error(output, expected))
    assert relative_error(rank_order, expected) <= TOLERANCE


def test_split_blocks_match_diffusers_blocks_in_eager():
    from aotpack.models.checkpoint import load_transformer, parse_model_ref
    from aotpack.models.regions import PROLOGUE, make_region, prologue_arguments
    from aotpack.models.split_regions import split_block_eager

    transformer = load_transformer(parse_model_ref("tiny"), torch.float32, "cpu")
    with torch.no_grad():
        hidden, encoder, temb, cos, sin = make_region(transformer, PROLOGUE)(*prologue_arguments(_inputs()), None)
        for block, double in ((transformer.transformer_blocks[0], True),
                              (transformer.single_transformer_blocks[0], False)):
            expected = block(hidden_states=hidden, encoder_hidden_states=encoder, temb=temb,
                             image_rotary_emb=(cos, sin))
            actual = split_block_eager(block, double, hidden, encoder, temb, cos, sin)
            for a, e in zip(actual, expected):
                assert relative_error(a, e) <= 1e-6


def test_split_package_records_its_programs(split_package):
    from aotpack.store.manifest import read_manifest

    manifest = read_manifest(split_package)
    assert manifest.recipe["parallel"] == "ulysses"
    slotted = [p.kind for p in manifest.programs if p.name == p.kind]  # no-slot variants aside
    assert slotted == ["prologue", "double_pre", "double_post", "single_pre", "single_post", "epilogue"]
    assert {s for p in manifest.programs for s in p.slots} >= {"attn.to_q", "attn.to_out.0", "proj_out"}
    assert manifest.validation["max_rel_error"] <= 1e-4  # validated end to end on the runtime's split path


def test_world_size_must_divide_the_heads(split_package, tiny_package):
    from aotpack.runtime.parallel import check_world_size
    from aotpack.store.manifest import read_manifest

    manifest = read_manifest(split_package)
    check_world_size(manifest, 2)  # tiny: 2 heads
    with pytest.raises(AotpackError) as refused:
        check_world_size(manifest, 3)
    assert "2 attention heads" in refused.value.problem and "1, 2" in refused.value.fix
    with pytest.raises(AotpackError, match="not built for context parallelism"):
        check_world_size(read_manifest(tiny_package), 2)


def test_two_ranks_equal_one_rank_and_the_normal_package_across_switches(split_package, tiny_package, demo_loras,
                                                                          tmp_path):
    import aotpack
    from aotpack.runtime.parallel import launch

    names = sorted(demo_loras)
    first, second = str(demo_loras[names[0]]), str(demo_loras[names[1]])
    switches = [[], [(first, 1.0)], [(first, 0.7), (second, 0.5)], [], [(second, 1.2)]]
    missing = str(tmp_path / "missing.safetensors")
    # rank 1 refuses the 4th set (its file is missing there): both ranks must keep the 3rd set
    by_rank = {0: switches[:3] + [[(first, 0.3)]] + switches[3:], 1: switches[:3] + [[(missing, 1.0)]] + switches[3:]}
    inputs = _inputs()
    results = launch(_rank_outputs, 2, str(split_package), inputs, by_rank)

    single_split = aotpack.load(split_package, model="tiny")
    normal = aotpack.load(tiny_package, model="tiny")
    expected_sets = switches[:3] + [switches[2]] + switches[3:]
    for index, (result, loras) in enumerate(zip(results, expected_sets)):
        if index == 3:
            assert result[0] == "refused" and "rank 1 refused" in result[1]
        else:
            assert result[0] == "ok"
        single_split.set_loras(loras)
        normal.set_loras(loras)
        one_rank, reference = _forward(single_split, inputs), _forward(normal, inputs)
        # bit-identical: the same programs, attention over the same token order (ulysses.py)
        assert torch.equal(result[-1], one_rank), (index, loras, relative_error(result[-1], one_rank))
        assert relative_error(result[-1], reference) <= TOLERANCE, (index, loras)
        assert relative_error(one_rank, reference) <= TOLERANCE, (index, loras)
    # the LoRA sets really changed the output (the comparison above is not trivially of zeros)
    assert relative_error(results[1][-1], results[0][-1]) > 1e-3


@pytest.mark.parametrize("merge_policy", ["auto", "always"])  # on the CPU "auto" keeps slots; "always" merges
def test_generate_on_two_ranks_writes_what_one_process_writes(split_package, demo_loras, tmp_path, merge_policy):
    from safetensors.torch import load_file

    import aotpack
    from aotpack.runtime.jobs import Request, run_request
    from aotpack.runtime.parallel import generate

    lora = str(demo_loras[min(demo_loras)])
    requests = [Request(prompt="a red cube", loras=[(lora, 0.8)], seed=3, steps=2, height=64, width=64,
                        max_sequence_length=32, save_latents=str(tmp_path / "cp1.safetensors")),
                Request(prompt="a blue cube", seed=4, steps=2, height=64, width=64, max_sequence_length=32,
                        save_latents=str(tmp_path / "cp2.safetensors"), out=str(tmp_path / "cp2.png"))]
    outcomes = generate(split_package, "tiny", requests, gpus=2, device="cpu", merge_policy=merge_policy)
    assert [o.ok for o in outcomes] == [True, True], [o.error for o in outcomes]
    assert (tmp_path / "cp2.png").stat().st_size > 0
    lora_mode = "merged" if merge_policy == "always" else "slots"
    assert [o.result.lora_mode for o in outcomes] == [lora_mode, "none"]  # rank 0's; the ranks agree (merge.py)

    served = aotpack.load(split_package, model="tiny", merge_policy=merge_policy)
    for index, request in enumerate(requests):
        single = Request(**{**request.__dict__, "save_latents": str(tmp_path / f"one{index}.safetensors"), "out": None})
        assert run_request(served, single).lora_mode == outcomes[index].result.lora_mode
        two, one = (load_file(p)["latents"] for p in (request.save_latents, single.save_latents))
        assert relative_error(two, one) <= TOLERANCE


def test_a_failing_rank_ends_the_run_with_its_error(split_package):
    from aotpack.runtime.parallel import ParallelRunError, launch

    started = time.perf_counter()
    with pytest.raises(ParallelRunError) as failed:
        launch(_rank_fails, 2, str(split_package), _inputs(), timeout_s=60)
    assert "rank 1" in failed.value.problem and "injected failure on rank 1" in failed.value.problem
    assert time.perf_counter() - started < 90


def test_run_with_gpus_refuses_what_cannot_split(split_package, tiny_package):
    from click.testing import CliRunner

    from aotpack.cli.main import cli

    base = ["--model", "tiny", "--prompt", "a cat", "--steps", "1", "--height", "64", "--width", "64"]
    unsplit = CliRunner().invoke(cli, ["run", str(tiny_package), "--gpus", "2", *base])
    assert unsplit.exit_code != 0 and "not built for context parallelism" in unsplit.output
    odd = CliRunner().invoke(cli, ["run", str(split_package), "--gpus", "3", *base])
    assert odd.exit_code != 0 and "--gpus 1, 2" in odd.output
    # CUDA graphs are taken to every rank (on GPUs they capture the collectives too); on CPU ranks they are
    # refused on every rank, and the run ends with the fix
    graphs = CliRunner().invoke(cli, ["run", str(split_package), "--gpus", "2", "--cuda-graphs", *base])
    assert graphs.exit_code == 1, graphs.output
    assert "CUDA graphs need a CUDA device" in graphs.output and "drop --cuda-graphs" in graphs.output


def test_recipe_field_parallel():
    from pathlib import Path

    import aotpack.recipes
    from aotpack.errors import RecipeError
    from aotpack.recipes.fields import TomlFields
    from aotpack.recipes.recipe import parse_recipe

    data = TomlFields.read(Path(aotpack.recipes.__file__).parent / "cpu.toml").data
    assert parse_recipe(dict(data)).parallel == "none"
    assert parse_recipe({**data, "parallel": "ulysses"}).parallel == "ulysses"
    with pytest.raises(RecipeError, match="ulysses"):
        parse_recipe({**data, "parallel": "ring"})


def test_an_fp8_split_package_with_the_fp8_dot_down_projections_runs_on_two_ranks_as_on_one(tmp_path_factory,
                                                                                             demo_loras):
    """The h100/h200 recipes' FP8 mechanics split for context parallelism (`reference.fp8_cpu_recipe`, the lever
    `lora_down_fp8_dots` on): the post-attention programs read A's FP8 halves, which each rank's runtime writes at
    every switch, and 2 ranks give 1 rank's output bit for bit, with and without the MLP LoRA, across a switch."""
    from reference import build_fp8_package, load_fp8_package

    from aotpack.runtime.parallel import launch

    package = build_fp8_package(tmp_path_factory.mktemp("cp-fp8"), 'parallel = "ulysses"\nlora_down_from_fp8 = true\n'
                                                                    "lora_down_fp8_dots = true").path
    inputs = _inputs(torch.bfloat16)
    mlp, attn = str(demo_loras["tiny-style-mlp"]), str(demo_loras["tiny-style-attn"])
    switches = [[(mlp, 1.0)], [], [(attn, 1.0), (mlp, 0.5)]]
    results = launch(_rank_fp8_outputs, 2, str(package), inputs, {0: switches, 1: switches})
    one_rank = load_fp8_package(package)
    halves = sorted(n.removesuffix(".lora_A_fp8") for n in one_rank.transformer.bank.tensors if n.endswith("_fp8"))
    assert halves == ["single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.proj_out",
                      "transformer_blocks.0.ff.net.2", "transformer_blocks.1.ff.net.2"]
    for result, loras in zip(results, switches):
        assert result[0] == "ok"
        one_rank.set_loras(loras)
        assert torch.equal(result[-1], _forward(one_rank, inputs)), loras
    assert relative_error(results[0][-1].float(), results[1][-1].float()) > 1e-3  # the MLP LoRA moved the output
