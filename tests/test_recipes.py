"""The recipe loader: every shipped recipe parses to what issue 4 asks; bad files say field and file."""

from __future__ import annotations

from pathlib import Path

import pytest

from aotpack.errors import AotpackError, RecipeError, UnknownTargetError
from aotpack.recipes.recipe import known_targets, load_recipe

RECIPES_DIR = Path(__file__).resolve().parent.parent / "aotpack" / "recipes"
MODULATION_LINE = ('unquantized_linears = ["*.norm1.linear", "*.norm1_context.linear", '
                   '"single_transformer_blocks.*.norm.linear"]')


def test_every_recipe_file_parses_under_its_own_name():
    names = sorted(path.stem for path in RECIPES_DIR.glob("*.toml"))
    assert names == known_targets()
    assert {"h100", "h200", "a100", "l40s", "rtx4090", "cpu"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.name == name
        assert recipe.example_image_tokens in range(recipe.image_tokens[0], recipe.image_tokens[1] + 1)


@pytest.mark.parametrize("name", ["h100", "h200"])
def test_hopper_recipes_use_fp8_rowwise_and_cudnn_attention_fp8_from_4096_tokens(name):
    recipe = load_recipe(name)
    assert (recipe.device, recipe.gpu_arch) == ("cuda", "sm_90")
    assert (recipe.quantization, recipe.attention) == ("fp8_rowwise", "cudnn_fp8")
    assert recipe.fp8_attention_min_tokens == 4096  # 1024^2 (4096 + 512 tokens) and up; bf16 below (512^2)
    assert recipe.dtype == recipe.lora_dtype == "bfloat16"  # the LoRA path stays in bf16
    assert recipe.fused_gelu_quant  # one Triton kernel for GELU + FP8 quantization (measured on the H200)
    # q/k written in FP8 by their norm kernel, LoRA down-projections from the FP8 GELU output (H100, 2026-12-06i)
    assert recipe.fp8_qk_in_norm_rope and recipe.lora_down_from_fp8
    assert recipe.joined_qkv  # each double-block stream's q/k/v as one FP8 GEMM (H100, 2026-12-07a)
    # the AdaLN modulation stays bf16 (LoRA fidelity 0.105 -> 0.094 on the H200, +3.2 GB of weights)
    assert recipe.unquantized_linears == ("*.norm1.linear", "*.norm1_context.linear",
                                          "single_transformer_blocks.*.norm.linear")
    assert recipe.to_json()["unquantized_linears"] == list(recipe.unquantized_linears)


def test_h100_and_h200_recipes_differ_only_in_name_description_and_the_h100_measured_levers():
    # one Hopper recipe: h100.toml takes h200.toml's fields as its base; a lever set in one file alone ships two
    # defaults, so only what was measured on H100s alone differs (coordinate descent, 2026-12-06m; the tails, measured
    # on an H200 on 2026-12-07j, are in both)
    h100, h200 = (load_recipe(name).to_json() for name in ("h100", "h200"))
    differing = {key for key in h100.keys() | h200.keys() if h100.get(key) != h200.get(key)}
    assert differing == {"name", "description", "inductor_configs"}
    assert (h100["inductor_configs"], h200["inductor_configs"]) == ({"coordinate_descent_tuning": True}, {})
    assert h100["lora_tails"] and h200["lora_tails"] and not h200["lora_tails_mlp_in"]


@pytest.mark.parametrize("name", ["l40s", "rtx4090"])
def test_ada_recipes_use_fp8(name):
    recipe = load_recipe(name)
    assert (recipe.device, recipe.gpu_arch, recipe.quantization) == ("cuda", "sm_89", "fp8_rowwise")
    assert recipe.unquantized_linears == ()  # every block linear FP8: unmeasured there, and memory is tighter


def test_rtx4090_follows_the_24gb_recipe():
    recipe = load_recipe("rtx4090")
    assert recipe.text_encoder_policy == "t5_nf4" and recipe.layout == "regional"


def test_a100_is_bf16_without_fp8():
    recipe = load_recipe("a100")
    assert (recipe.gpu_arch, recipe.dtype, recipe.quantization) == ("sm_80", "bfloat16", "none")


def test_cpu_is_float32():
    recipe = load_recipe("cpu")
    assert (recipe.device, recipe.gpu_arch, recipe.dtype, recipe.quantization) == ("cpu", "", "float32", "none")


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(UnknownTargetError) as caught:
        load_recipe("h800")
    message = str(caught.value)
    assert "'h800'" in message
    for name in known_targets():
        assert name in message


def write_variant(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of the h200 recipe (the Hopper fields; h100.toml takes them as its base) with the exact line `old`
    replaced by `new`."""
    text = (RECIPES_DIR / "h200.toml").read_text()
    assert text.count(f"\n{old}\n") == 1, old
    path = tmp_path / "variant.toml"
    path.write_text(text.replace(f"\n{old}\n", f"\n{new}\n"))
    return path


@pytest.mark.parametrize("old, new, expected", [
    ('quantization = "fp8_rowwise"', 'quantization = "fp4"', ["quantization", "'fp4'", "fp8_rowwise"]),
    ('attention = "cudnn_fp8"', 'attention = "xformers"', ["attention", "'xformers'", "cudnn"]),
    ("max_rank = 64", 'max_rank = "big"', ["max_rank", "'big'", "integer"]),
    ("max_rank = 64", "max_rank = 0", ["max_rank", "> 0"]),
    ('dtype = "bfloat16"', 'dtype = "fp16"', ["dtype", "'fp16'", "float16"]),
    ('dtype = "bfloat16"', "", ["dtype", "missing"]),
    ('gpu_arch = "sm_90"', 'gpu_arch = "hopper"', ["gpu_arch", "'hopper'", "sm_90"]),
    ("batch = [1, 4]", "batch = [4, 1]", ["shapes.batch", "[4, 1]", "min <= max"]),
    ("image_tokens = [256, 16384]", 'image_tokens = "lots"', ["shapes.image_tokens", "'lots'"]),
    ("tolerance = 3e-2", "tolerance = -1.0", ["validation.tolerance", "> 0"]),
    ("tolerance = 3e-2", "tolerance = nan", ["validation.tolerance", "nan", "not a finite number"]),
    ("tolerance = 3e-2", "tolerance = inf", ["validation.tolerance", "inf", "not a finite number"]),
    ("end_to_end_tolerance = 0.15", "end_to_end_tolerance = -nan", ["validation.end_to_end_tolerance", "nan",
                                                                   "not a finite number"]),
    ("end_to_end_tolerance = 0.15", "end_to_end_tolerance = inf", ["validation.end_to_end_tolerance", "inf"]),
    ("end_to_end_tolerance = 0.15", "end_to_end_tolerance = -0.5", ["validation.end_to_end_tolerance", "-0.5",
                                                                   "negative"]),
    ("group_lora_down = true", 'group_lora_down = "yes"', ["group_lora_down", "'yes'", "true or false"]),
    ('layout = "regional"', 'layout = "regional"\ngroup_lora_up = 1', ["group_lora_up", "1", "true or false"]),
    ('layout = "regional"', 'layout = "regional"\ngelu_via_sigmoid = true', ["gelu_via_sigmoid", "True", "string"]),
    ('layout = "regional"', 'layout = "regional"\ngelu_via_sigmoid = "ff"', ["gelu_via_sigmoid", "'ff'", "feed_forward"]),
    ('layout = "regional"', 'layout = "regional"\nmerge_by_address = 1', ["merge_by_address", "1", "true or false"]),
    (MODULATION_LINE, 'unquantized_linears = "*.norm1.linear"', ["unquantized_linears", "'*.norm1.linear'", "a list"]),
    ('quantization = "fp8_rowwise"', 'quantization = "none"', ["unquantized_linears", 'quantization = "none"']),
])
def test_a_bad_value_names_the_field_the_value_and_the_file(tmp_path, old, new, expected):
    path = write_variant(tmp_path, old, new)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert str(path) in caught.value.problem and str(path) in caught.value.fix
    for text in expected:
        assert text in message


@pytest.mark.parametrize("old, new, field", [
    ("image_tokens = 4096", "image_tokens = 100000", "image_tokens"),
    ("text_tokens = 512", "text_tokens = 4", "text_tokens"),
    ("batch = 1", "batch = 8", "batch"),
])
def test_example_sizes_outside_the_dynamic_range_are_rejected(tmp_path, old, new, field):
    path = write_variant(tmp_path, old, new)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert f"example.{field}" in str(caught.value) and f"shapes.{field}" in str(caught.value)
    assert str(path) in str(caught.value)


def test_invalid_toml_names_the_file(tmp_path):
    path = write_variant(tmp_path, "max_rank = 64", "max_rank = = 64")
    with pytest.raises(RecipeError, match="not valid TOML") as caught:
        load_recipe(path)
    assert str(path) in str(caught.value)


def test_a_recipe_file_that_is_not_text_names_the_file(tmp_path):
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(RecipeError, match="not a TOML recipe") as caught:
        load_recipe(path)
    assert str(path) in caught.value.problem and "UTF-8" in caught.value.problem


def test_a_max_rank_above_the_slotted_layers_rank_is_refused_before_slots_are_made(tmp_path, monkeypatch):
    """--max-rank 100000000 took a tiny build past 10 GB of memory: a rank above the widest side of any slotted
    linear is refused, naming the value and the limit, before any slot tensor."""
    import torch
    from click.testing import CliRunner

    from aotpack.builder import build as build_module
    from aotpack.cli import cli
    from aotpack.models.slots import select_slot_names
    from aotpack.models.tiny import make_transformer

    model = make_transformer()
    names = select_slot_names(model, ("*",))
    limit = max(max(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear))
    build_module.check_max_rank(model, names, 64)  # the benches' r64 LoRA on 32-wide layers still fits
    build_module.check_max_rank(model, names, limit)
    with pytest.raises(AotpackError, match=f"max_rank = {limit + 1} is above {limit}") as caught:
        build_module.check_max_rank(model, names, limit + 1)
    assert f"--max-rank {limit}" in caught.value.fix
    build_module.check_max_rank(model, [], 10**8)  # no slots (max_rank 0 builds): nothing to bound
    monkeypatch.setattr(build_module, "prepare_transformer", lambda *a, **k: pytest.fail("slots were prepared"))
    result = CliRunner().invoke(cli, ["build", "--model", "tiny", "--max-rank", "100000000",
                                      "--out", str(tmp_path / "x5b")])
    assert result.exit_code == 1 and f"max_rank = 100000000 is above {limit}" in result.output
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []


def test_a_shipped_recipe_must_carry_its_file_name(tmp_path, monkeypatch):
    import aotpack.recipes.recipe as recipe_module

    path = write_variant(tmp_path, 'name = "h200"', 'name = "h100"')
    monkeypatch.setattr(recipe_module, "_recipe_files", lambda: {"h200": path})
    with pytest.raises(RecipeError, match="differs from the file name"):
        load_recipe("h200")


def test_the_merge_by_address_is_on_by_default_and_can_be_left_out(tmp_path):
    assert all(load_recipe(name).merge_by_address for name in known_targets())
    recipe = load_recipe(write_variant(tmp_path, 'layout = "regional"', 'layout = "regional"\nmerge_by_address = false'))
    assert recipe.merge_by_address is False and recipe.to_json()["merge_by_address"] is False


def test_fp8_attention_is_the_hopper_default_from_a_token_count(tmp_path):
    fp8 = {name for name in known_targets() if load_recipe(name).attention == "cudnn_fp8"}
    assert fp8 == {"h100", "h200"}  # measured there; the Ada recipes keep bf16 attention
    everywhere = load_recipe(write_variant(tmp_path, "fp8_attention_min_tokens = 4096", ""))
    assert (everywhere.attention, everywhere.fp8_attention_min_tokens, everywhere.parallel) == ("cudnn_fp8", 0, "none")
    path = write_variant(tmp_path, 'attention = "cudnn_fp8"\nfp8_attention_min_tokens = 4096', 'attention = "cudnn"')
    # the q/k kernel's FP8 output (on in h100/h200) is for FP8 attention: a bf16 copy must drop it too, and is told so
    with pytest.raises(RecipeError, match="fp8_qk_in_norm_rope = true needs .* attention = \"cudnn_fp8\""):
        load_recipe(path)
    path.write_text(path.read_text().replace("\nfp8_qk_in_norm_rope = true\n", "\n"))
    bf16 = load_recipe(path)
    assert (bf16.attention, bf16.fp8_attention_min_tokens, bf16.fp8_qk_in_norm_rope) == ("cudnn", 0, False)


def test_fp8_attention_with_ulysses_names_both_values_and_the_file(tmp_path):
    path = write_variant(tmp_path, 'attention = "cudnn_fp8"', 'attention = "cudnn_fp8"\nparallel = "ulysses"')
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert str(path) in caught.value.problem and str(path) in caught.value.fix
    for text in ("attention", "'cudnn_fp8'", "parallel", "'ulysses'"):
        assert text in caught.value.problem
    assert "attention = 'cudnn'" in caught.value.fix  # what works with ulysses
    # the build's --parallel override goes through Recipe.replace: refused there too
    with pytest.raises(RecipeError, match="'ulysses'"):
        load_recipe("h100").replace(parallel="ulysses")
    bf16 = load_recipe("h100").replace(attention="cudnn", fp8_attention_min_tokens=0)
    # other attention values may (batched_modulation off, as the build's override turns it off: one GPU only)
    assert bf16.replace(parallel="ulysses", batched_modulation=False).parallel == "ulysses"
    # another backend has no FP8 threshold: replace drops it, so a Python override builds what --attention builds
    assert load_recipe("h100").replace(attention="cudnn").fp8_attention_min_tokens == 0
    assert load_recipe("h100").replace(max_rank=16).fp8_attention_min_tokens == 4096


def test_validation_takes_a_second_shape_only_where_the_ranges_leave_room(tmp_path):
    from aotpack.builder.validate import validation_cases

    dynamic = load_recipe("h200")
    assert validation_cases(dynamic) == [(1, 4096, 512), (2, 256, 9)]
    static = write_variant(tmp_path, "batch = [1, 4]", "batch = [1, 1]")
    text = static.read_text().replace("image_tokens = [256, 16384]", "image_tokens = [4096, 4096]")
    static.write_text(text.replace("text_tokens = [8, 512]", "text_tokens = [512, 512]"))
    assert validation_cases(load_recipe(static)) == [(1, 4096, 512)]


def test_an_unquantized_linears_pattern_that_matches_nothing_is_refused_by_name():
    """A typo in `unquantized_linears` would leave every linear quantized without a word: the build refuses it."""
    from aotpack.models.quant import _quantized_linear_names
    from aotpack.models.tiny import make_transformer

    model = make_transformer()
    every = _quantized_linear_names(model)
    kept = _quantized_linear_names(model, ("*.norm1.linear",))
    assert len(every) - len(kept) == len(model.transformer_blocks) and not any(n.endswith("norm1.linear") for n in kept)
    with pytest.raises(RecipeError) as caught:
        _quantized_linear_names(model, ("*.norm1.linear", "*.norm_1.linear"))
    assert "'*.norm_1.linear'" in caught.value.problem and "transformer_blocks.0." in caught.value.problem
    assert "unquantized_linears" in caught.value.fix
