"""Recipes on a base (`base = "h200"`): the base's fields under the file's own, errors naming the chain."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from aotpack.errors import RecipeError
from aotpack.recipes.bases import merged_tables
from aotpack.recipes.recipe import load_recipe


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def changed_fields(recipe, base) -> dict:
    return {field: getattr(recipe, field) for field, value in dataclasses.asdict(base).items()
            if getattr(recipe, field) != value}


def test_a_recipe_on_a_shipped_target_changes_only_what_it_sets(tmp_path):
    path = write(tmp_path, "my-h200.toml", '''
base = "h200"
name = "my-h200"
attention = "cudnn"               # bf16 attention at every length: the FP8 fields go off with it
fp8_attention_min_tokens = 0
fp8_qk_in_norm_rope = false
unquantized_linears = []          # every block linear in FP8 (a smaller card)
[validation]
tolerance = 5e-2
[inductor]
coordinate_descent_tuning = true
''')
    recipe, h200 = load_recipe(path), load_recipe("h200")
    assert changed_fields(recipe, h200) == {
        "name": "my-h200", "attention": "cudnn", "fp8_attention_min_tokens": 0, "fp8_qk_in_norm_rope": False,
        "unquantized_linears": (), "tolerance": 5e-2, "inductor_configs": {"coordinate_descent_tuning": True},
        # without a description of its own, h200's would claim FP8 attention: it says what this file sets instead
        "description": f"{h200.description} (base h200; this file sets attention, fp8_attention_min_tokens, "
                       "fp8_qk_in_norm_rope, unquantized_linears, validation.tolerance, "
                       "inductor.coordinate_descent_tuning)"}
    # a table merges key by key: the end-to-end tolerance not set here is h200's
    assert recipe.end_to_end_tolerance == h200.end_to_end_tolerance == 0.15


def test_h100_is_h200_under_its_own_name_with_its_own_tuning():
    h100 = (Path(__file__).resolve().parent.parent / "aotpack" / "recipes" / "h100.toml").read_text()
    assert 'base = "h200"' in h100
    assert set(changed_fields(load_recipe("h100"), load_recipe("h200"))) == {"name", "description",
                                                                              "inductor_configs"}
    assert load_recipe("h100").lora_tails and load_recipe("h200").lora_tails  # h100 takes them from its base


def test_a_chain_of_files_resolves_relative_to_each_file_and_errors_name_it(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path, "middle.toml", 'base = "h200"\nname = "middle"\nmax_rank = 32\n')
    top = write(tmp_path / "sub", "top.toml", 'base = "../middle.toml"\nname = "top"\ngroup_lora_down = false\n')
    recipe = load_recipe(top)
    assert (recipe.name, recipe.max_rank, recipe.group_lora_down, recipe.batched_modulation) == ("top", 32, False, True)
    # a combination the base's fields refuse: the error names the top file and its bases
    top.write_text(top.read_text() + "fused_gelu_quant = false\n")
    with pytest.raises(RecipeError, match="fused_norm_quant = true needs fused_gelu_quant = true") as caught:
        load_recipe(top)
    assert f"{top} (on middle.toml on h200.toml)" in caught.value.problem


def test_a_typo_in_a_recipe_on_a_base_is_refused(tmp_path):
    path = write(tmp_path, "typo.toml", 'base = "h200"\nname = "typo"\nmax_rnak = 16\n')
    with pytest.raises(RecipeError, match="unknown field 'max_rnak'.*did you mean 'max_rank'") as caught:
        load_recipe(path)
    assert str(path) in caught.value.problem


def test_a_recipe_on_a_base_must_name_itself(tmp_path):
    path = write(tmp_path, "mine.toml", 'base = "h200"\nmax_rank = 32\n')
    with pytest.raises(RecipeError, match="must set its own name") as caught:
        load_recipe(path)
    assert 'name = "mine"' in caught.value.fix and str(path) in caught.value.fix


@pytest.mark.parametrize("base, expected", [
    ('"h800"', ["'h800'", "neither a target nor a recipe file", "h100", "h200"]),
    ('"missing.toml"', ["'missing.toml'", "does not exist"]),
    ("3", ["base = 3", "a target name or a recipe file"]),
])
def test_an_unknown_base_names_the_value_and_the_targets(tmp_path, base, expected):
    path = write(tmp_path, "mine.toml", f"base = {base}\nname = \"mine\"\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert str(path) in message and "h200" in caught.value.fix
    for text in expected:
        assert text in message


def test_bases_that_loop_are_refused_naming_the_loop(tmp_path):
    first = write(tmp_path, "first.toml", 'base = "second.toml"\nname = "first"\n')
    write(tmp_path, "second.toml", 'base = "first.toml"\nname = "second"\n')
    with pytest.raises(RecipeError, match=r"bases loop \(first.toml -> second.toml -> first.toml\)"):
        load_recipe(first)
    write(tmp_path, "itself.toml", 'base = "itself.toml"\nname = "itself"\n')
    with pytest.raises(RecipeError, match="loop"):
        load_recipe(tmp_path / "itself.toml")


def test_a_broken_base_file_is_named(tmp_path):
    write(tmp_path, "broken.toml", "name = = 1\n")
    path = write(tmp_path, "mine.toml", 'base = "broken.toml"\nname = "mine"\n')
    with pytest.raises(RecipeError, match="not valid TOML") as caught:
        load_recipe(path)
    assert str(tmp_path / "broken.toml") in caught.value.problem


def test_tables_merge_key_by_key_and_other_values_replace():
    base = {"a": 1, "list": [1, 2], "t": {"x": 1, "y": 2, "deep": {"k": 1}}}
    top = {"list": [3], "t": {"y": 5, "deep": {"j": 2}}, "new": True}
    assert merged_tables(base, top) == {"a": 1, "list": [3], "t": {"x": 1, "y": 5, "deep": {"k": 1, "j": 2}},
                                        "new": True}
    assert base["t"] == {"x": 1, "y": 2, "deep": {"k": 1}}  # the base's tables are left as they were


def test_the_example_in_docs_recipes_loads_as_it_says(tmp_path):
    import re

    docs = (Path(__file__).resolve().parent.parent / "docs" / "recipes.md").read_text()
    example = write(tmp_path, "my-h200.toml", re.search(r"```toml\n(.*?)```", docs, re.S).group(1))
    recipe = load_recipe(example)
    assert (recipe.name, recipe.attention, recipe.unquantized_linears) == ("my-h200", "cudnn", ())
    assert recipe.tolerance == 5e-2
    assert recipe.end_to_end_tolerance == load_recipe("h200").end_to_end_tolerance


def test_a_chain_longer_than_the_limit_is_refused(tmp_path):
    from aotpack.recipes.bases import MAX_CHAIN

    write(tmp_path, "r0.toml", 'base = "h200"\nname = "r0"\n')
    for i in range(1, MAX_CHAIN + 2):
        write(tmp_path, f"r{i}.toml", f'base = "r{i - 1}.toml"\nname = "r{i}"\n')
    assert load_recipe(tmp_path / f"r{MAX_CHAIN - 1}.toml").name == f"r{MAX_CHAIN - 1}"  # MAX_CHAIN bases: fine
    with pytest.raises(RecipeError, match=f"more than {MAX_CHAIN} bases"):
        load_recipe(tmp_path / f"r{MAX_CHAIN + 1}.toml")
