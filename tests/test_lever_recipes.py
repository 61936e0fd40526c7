"""The GPU lever bench's recipes (scripts/gpu/lever_recipes.py): each loads, and each changes what it says it does.

They used to be `sed` edits of h200.toml, which silently built the default again where a line had changed."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

import pytest

from aotpack.recipes.recipe import load_recipe

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu" / "lever_recipes.py"


def lever_module():
    spec = importlib.util.spec_from_file_location("lever_recipes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LEVERS = lever_module().LEVERS


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipes")
    assert lever_module().main(str(folder), ["default", *LEVERS]) == 0  # every one loads
    return folder


def test_the_default_is_h200(written):
    assert load_recipe(written / "default.toml").to_json() == load_recipe("h200").to_json()


@pytest.mark.parametrize("label", sorted(set(LEVERS) - {"rebuilt"}))
def test_every_lever_changes_each_field_it_sets(written, label):
    lever, h200 = load_recipe(written / f"{label}.toml").to_json(), load_recipe("h200").to_json()
    changed = {key for key in h200 if lever[key] != h200[key]} - {"name"}
    assert changed, f"{label} builds h200 again"
    for key, value in tomllib.loads(LEVERS[label]).items():
        if not isinstance(value, dict):  # a table's keys map to other names (validation.tolerance -> tolerance)
            assert key in changed, f"{label} sets {key} to h200's own value"


def test_an_unknown_lever_stops_before_any_build(tmp_path, capsys):
    assert lever_module().main(str(tmp_path), ["grouped"]) == 2
    assert "unknown lever 'grouped'" in capsys.readouterr().err
