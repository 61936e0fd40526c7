"""Every `aotpack ...` command shown in README.md and docs/ names a command that exists and only options that
command takes: a renamed or dropped flag fails here, not in a user's shell."""

from __future__ import annotations

import contextlib
import functools
import io
import re
import shlex
from pathlib import Path

import click
import pytest

from aotpack.cli import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
INLINE = re.compile(r"(?<!`)`(aotpack [^`\n]+)`(?!`)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def shown_commands(text: str) -> list[str]:
    """The `aotpack` command lines of a Markdown text: in fenced blocks (continuations joined, comments dropped,
    `a; b` and `a && b` split) and in inline code spans."""
    found = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line)
            for part in re.split(r";|&&|\|\|", line):
                part = part.strip().removeprefix("$ ")
                if part.startswith("aotpack "):
                    found.append(part)
    found += INLINE.findall(text)
    return found


@functools.cache
def bench_part_options(part: str) -> frozenset[str]:
    """A bench part's own argparse options, read from its --help."""
    module = __import__(f"aotpack.bench.{_bench_modules()[part]}", fromlist=["main"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.main(["--help"])
    return frozenset(FLAG.findall(out.getvalue()))


def _bench_modules() -> dict[str, str]:
    from aotpack.cli.bench import PARTS

    return {part: module for part, (module, _) in PARTS.items()}


def options_of(words: list[str]) -> tuple[str, frozenset[str]]:
    """(the command's name as shown, its options) for the words after `aotpack`."""
    command, name = cli, []
    for word in words:
        if not isinstance(command, click.Group) or word not in command.commands:
            break
        command, name = command.commands[word], [*name, word]
    if command is cli:
        raise AssertionError(f"'aotpack {words[0] if words else ''}' is not a command (aotpack --help lists them)")
    if name[0] == "bench" and len(name) == 2:
        return " ".join(name), bench_part_options(name[1]) | {"--help"}
    options = {opt for param in command.params for opt in [*param.opts, *param.secondary_opts]}
    return " ".join(name), frozenset(options | {"--help"})


def test_docs_show_commands_at_all():
    assert sum(len(shown_commands(path.read_text())) for path in DOCS) >= 30  # the reader below reads them


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_command_in_the_docs_exists_with_the_options_it_shows(path):
    problems = []
    for line in shown_commands(path.read_text()):
        try:
            words = shlex.split(line)[1:]
        except ValueError:
            words = line.split()[1:]
        try:
            name, options = options_of(words)
        except AssertionError as err:
            problems.append(f"{line!r}: {err}")
            continue
        problems += [f"{line!r}: aotpack {name} has no {flag}" for flag in FLAG.findall(line) if flag not in options]
    assert not problems, "\n".join(problems)


def test_the_reader_finds_a_wrong_flag():
    text = "```bash\naotpack run PKG --prompt x \\\n    --no-such-flag\n```\nand `aotpack build --modle m`\n"
    lines = shown_commands(text)
    assert len(lines) == 2
    assert "--no-such-flag" not in options_of(shlex.split(lines[0])[1:])[1]
    assert "--modle" not in options_of(shlex.split(lines[1])[1:])[1]
