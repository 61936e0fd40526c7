"""`aotpack doctor`: print the machine checks as a table (or JSON); exit 1 when any fails."""

from __future__ import annotations

import json
import sys

import click

_STATUS_LABEL = {"ok": "ok", "warn": "WARN", "fail": "FAIL"}


def format_table(results) -> str:
    width = max(len(result.name) for result in results)
    lines = []
    for result in results:
        lines.append(f"{_STATUS_LABEL[result.status]:4s}  {result.name:{width}s}  {result.detail}")
        if result.fix:
            lines.append(f"{'':4s}  {'':{width}s}  fix: {result.fix}")
    failures = sum(result.status == "fail" for result in results)
    warnings = sum(result.status == "warn" for result in results)
    lines.append(f"{failures} failed, {warnings} warnings" if failures or warnings else "all checks passed")
    return "\n".join(lines)


@click.command()
@click.option("--target", default=None,
              help="Also check what building this recipe needs (name, 'auto' or .toml path).")
@click.option("--out", type=click.Path(), default=None,
              help="Package directory to check as `aotpack build --out` checks it, and its free disk "
                   "(default: the free disk where `aotpack build` writes).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
def doctor(target, out, as_json):
    """Check this machine can build and serve packages: compiler, CUDA, GPU arch, versions, disk."""
    from .output import quiet_libraries

    quiet_libraries()
    from ..machine.doctor import failed, run_checks

    results = run_checks(target, out)
    if as_json:
        click.echo(json.dumps({"ok": not failed(results), "target": target,
                               "checks": [result.to_json() for result in results]}, indent=2))
    else:
        click.echo(format_table(results))
    if failed(results):
        sys.exit(1)  # not click's Exit: `aotpack.cli.main` runs click with standalone_mode=False
