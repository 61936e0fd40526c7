"""A recipe that names another as its `base`: the base's fields, with this file's on top.

`base = "h200"` (a shipped target) or `base = "./my-h200.toml"` (a file, relative to this one). Tables merge key by
key (`[validation]`, `[inductor]`), any other value replaces the base's whole (a list too). A field cannot be
removed, only set: every field has a value meaning "off" (false, 0, `[]` for `unquantized_linears`). A file that
changes fields without a `description` of its own gets the base's followed by the fields it sets.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import RecipeError
from .fields import TomlFields

# deeper than any sensible chain (h200 <- my-h200 <- my-h200-cdt): a longer one is almost surely a mistake
MAX_CHAIN = 8


def merged_tables(base: dict, top: dict) -> dict:
    """`base` with `top`'s values over it; a table present in both merges key by key."""
    merged = dict(base)
    for key, value in top.items():
        merged[key] = merged_tables(merged[key], value) if isinstance(value, dict) and isinstance(
            merged.get(key), dict) else value
    return merged


def _base_file(value, path: Path, shipped: dict[str, Path]) -> Path:
    fix = f"set base to one of {', '.join(sorted(shipped))}, or to a .toml path relative to {path.parent}"
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{path}: base = {value!r} should be a target name or a recipe file", fix)
    if value in shipped:
        return shipped[value]
    candidate = path.parent / value
    if candidate.suffix == ".toml" and candidate.is_file():
        return candidate
    raise RecipeError(f"{path}: base = {value!r} is neither a target nor a recipe file"
                      + (f" ({candidate} does not exist)" if candidate.suffix == ".toml" else ""), fix)


def resolve_bases(path: Path, data: dict, shipped: dict[str, Path]) -> tuple[dict, str]:
    """`data` (parsed from `path`) with its chain of bases merged under it, and the source to name in errors:
    `path`, then its bases (`my.toml (on h200.toml on h100.toml)`) where it has any."""
    if "base" not in data:
        return data, str(path)
    if "name" not in data:  # inheriting the base's name would publish the package in the base's folder
        raise RecipeError(f"{path}: a recipe with a base must set its own name (it would take {data['base']!r}'s, "
                          "which names the package's folder and its place in a package repo)",
                          f"add name = \"{path.stem}\" to {path}")
    chain = [path.resolve()]
    layers = [data]
    current, current_path = data, path
    while "base" in current:
        base_path = _base_file(current["base"], current_path, shipped)
        if base_path.resolve() in chain:
            loop = " -> ".join(p.name for p in [*chain, base_path.resolve()])
            raise RecipeError(f"{path}: its bases loop ({loop})", f"remove the base that leads back, in {current_path}")
        if len(chain) > MAX_CHAIN:
            raise RecipeError(f"{path}: more than {MAX_CHAIN} bases in a chain",
                              "base the recipe on a shipped target or a file that has no base")
        chain.append(base_path.resolve())
        current, current_path = TomlFields.read(base_path).data, base_path
        layers.append(current)
    merged: dict = {}
    for layer in reversed(layers[1:]):
        merged = merged_tables(merged, {key: value for key, value in layer.items() if key != "base"})
    changes = _field_paths({key: value for key, value in data.items() if key not in ("base", "name", "description")})
    if changes and "description" not in data:  # the base's own would describe the base, not what this file changed
        data = {**data, "description": f"{merged.get('description', chain[1].stem)} (base {chain[1].stem}; this file "
                                       f"sets {', '.join(changes)})"}
    merged = merged_tables(merged, {key: value for key, value in data.items() if key != "base"})
    return merged, f"{path} (on {' on '.join(p.name for p in chain[1:])})"


def _field_paths(table: dict, prefix: str = "") -> list[str]:
    """The fields a table sets, tables spelled out (`validation.tolerance`)."""
    paths = []
    for key, value in table.items():
        paths += _field_paths(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return paths
