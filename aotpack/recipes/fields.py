"""Typed reads from a parsed TOML file: every error names the field, the value and the file."""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path

from ..errors import RecipeError

_REQUIRED = object()
_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table",
               bool: "true or false"}


def _near_miss(node, parents: list[str], part: str) -> str:
    """What the file holds where `part` was looked for: a misspelled key or section (`[shape]` for `[shapes]`), or a
    value where a table should be."""
    where = ".".join(parents)
    if not isinstance(node, dict):
        return f" ({where} = {node!r} is not a table)"
    close = difflib.get_close_matches(part, [key for key in node if key != part], n=1, cutoff=0.6)
    if not close:
        return ""
    found = ".".join([*parents, close[0]])
    what = "section" if isinstance(node[close[0]], dict) else "key"
    return f" (the file has the {what} {found!r}: a misspelling of {'.'.join([*parents, part])!r}?)"


class TomlFields:
    def __init__(self, data: dict, source: str):
        self.data = data
        self.source = source
        self.known: set[str] = set()  # every field path read so far (see refuse_unknown)

    @classmethod
    def read(cls, path: Path) -> "TomlFields":
        try:
            return cls(tomllib.loads(Path(path).read_text()), str(path))
        except tomllib.TOMLDecodeError as err:
            raise RecipeError(f"{path} is not valid TOML ({err})", f"fix the syntax of {path}") from err
        except UnicodeDecodeError as err:
            raise RecipeError(f"{path} is not a TOML recipe: it is not UTF-8 text (byte {err.start} is "
                              f"{err.object[err.start:err.start + 1]!r})",
                              "pass a recipe .toml file saved as UTF-8 (e.g. base = \"h200\" and the fields you "
                              "change)") from err
        except OSError as err:
            raise RecipeError(f"cannot read the recipe {path} ({err.strerror or err})",
                              f"check that {path} is a readable file") from err

    def error(self, field: str, problem: str) -> RecipeError:
        return RecipeError(f"{self.source}: {field} {problem}", f"edit {field} in {self.source}")

    def value(self, field: str, kind: type, default=_REQUIRED):
        """`field` ("shapes.batch" for a nested table) checked to be of `kind` (an int is a fine float)."""
        self.known.add(field)
        node, parts = self.data, field.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                if default is _REQUIRED:
                    raise self.error(field, "is missing" + _near_miss(node, parts[:depth], part))
                return default
            node = node[part]
        if kind is float and isinstance(node, int) and not isinstance(node, bool):
            node = float(node)
        if not isinstance(node, kind) or (isinstance(node, bool) and kind is not bool):
            raise self.error(field, f"= {node!r} should be {_KIND_NAMES.get(kind, kind.__name__)}")
        return node

    def choice(self, field: str, allowed, default=_REQUIRED) -> str:
        value = self.value(field, str, default)
        if value not in allowed:
            raise self.error(field, f"= {value!r} is not one of {', '.join(allowed)}")
        return value

    def positive(self, field: str, kind: type = int):
        value = self.value(field, kind)
        if value <= 0:
            raise self.error(field, f"= {value!r} should be > 0")
        return value

    def int_range(self, field: str) -> tuple[int, int]:
        """`[min, max]` with positive integers, min <= max."""
        value = self.value(field, list)
        ints = len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if not ints or not 1 <= value[0] <= value[1]:
            raise self.error(field, f"= {value!r} should be [min, max] with integers 1 <= min <= max")
        return value[0], value[1]

    def strings(self, field: str, default=_REQUIRED, allow_empty: bool = False) -> tuple[str, ...]:
        """A list of strings; `allow_empty` takes `[]` (a recipe turning off its base's list)."""
        value = self.value(field, list, default)
        if value is default:  # absent: the default as it is (it may be empty)
            return tuple(value)
        if (not value and not allow_empty) or not all(isinstance(v, str) for v in value):
            raise self.error(field, f"= {value!r} should be a {'' if allow_empty else 'non-empty '}list of strings")
        return tuple(value)

    def refuse_unknown(self) -> None:
        """Refuse any field no reader asked for (a typo such as `max_rnak` would otherwise be ignored and the
        default used). A table read whole (e.g. `[inductor]`) may hold any keys."""
        unknown = []

        def walk(node: dict, prefix: str) -> None:
            for key, value in node.items():
                path = f"{prefix}{key}"
                if path in self.known:
                    continue
                if isinstance(value, dict) and any(k.startswith(path + ".") for k in self.known):
                    walk(value, path + ".")
                else:
                    unknown.append(path)

        walk(self.data, "")
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(self.known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"{self.source}: unknown field {unknown[0]!r}{hint}"
                              + (f" (and {unknown[1:]})" if unknown[1:] else ""),
                              f"remove or rename it in {self.source}; known fields: {', '.join(sorted(self.known))}")
