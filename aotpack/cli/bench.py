"""`aotpack bench PART [args]`: the benchmark modules behind one command (their own --help lists the options).

    aotpack bench compare    --package DIR --model random:flux-dev --out OUT   # eager vs recipe vs aotpack
    aotpack bench cold-start --package DIR --model random:flux-dev --out OUT   # fresh process to first image
    aotpack bench variants   --variant none=DIR --variant r64=DIR --out OUT    # slot overhead, layouts
    aotpack bench serve      --package DIR --model random:flux-dev --out OUT   # load, switch, generate
    aotpack bench report     OUT                                               # results.md + results.png
"""

from __future__ import annotations

import importlib

import click

PARTS = {"compare": "compare", "cold-start": "cold_start", "variants": "variants", "serve": "serve_demo",
         "report": "report"}


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("part", type=click.Choice(sorted(PARTS)))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(part, args):
    """Benchmarks on random real-size weights: PART is compare, cold-start, variants, serve or report."""
    importlib.import_module(f"aotpack.bench.{PARTS[part]}").main(list(args))
