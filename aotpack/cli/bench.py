"""`aotpack bench PART [args]`: the benchmark modules behind one click group; `aotpack bench PART --help`
shows that part's own options (each part parses its arguments with argparse in aotpack/bench/).

    aotpack bench speed      --package DIR --model random:flux-dev --out OUT   # slots / no LoRA / merged vs recipe
    aotpack bench compare    --package DIR --model random:flux-dev --out OUT   # eager vs recipe vs aotpack
    aotpack bench cold-start --package DIR --model random:flux-dev --out OUT   # fresh process to first image
    aotpack bench variants   --variant none=DIR --variant r64=DIR --out OUT    # slot overhead, layouts
    aotpack bench serve      --package DIR --model random:flux-dev --out OUT   # load, switch, generate
    aotpack bench serve-load --package DIR --model random:flux-dev --out OUT   # HTTP service under load
    aotpack bench context-parallel --package DIR --gpus 2 --out OUT            # 1 vs N GPUs
    aotpack bench report     OUT                                               # results.md + results.png
    aotpack bench quality    --model M --package A=DIR --lora F --prompt P --out OUT  # your images vs diffusers
"""

from __future__ import annotations

import importlib

import click

# part -> (module in aotpack.bench, one-line help); the modules are imported only when a part runs.
PARTS = {
    "speed": ("speed", "One process: eager, the recipe, aotpack in slots / no LoRA / merged; kernel breakdown."),
    "compare": ("compare", "Eager diffusers vs its recipe vs the aotpack package: step time, memory, error."),
    "cold-start": ("cold_start", "A fresh process to the first image, phase by phase."),
    "variants": ("variants", "Slot overhead and layouts: step time of several packages."),
    "serve": ("serve_demo", "Load a package, switch LoRAs, generate: per-request times."),
    "serve-load": ("serve_load", "The HTTP service under concurrent load: latency, throughput."),
    "context-parallel": ("context_parallel", "One image on 1 and N GPUs of a --parallel ulysses package."),
    "report": ("report", "Render results.md and results.png from a benchmark output folder."),
    "quality": ("quality", "Your model, prompts and LoRAs: each package's images against eager diffusers + PEFT."),
}


@click.group()
def bench():
    """Benchmarks on random real-size weights (GPU numbers in benchmarks/results/), and `quality` on your own
    model and LoRAs; `PART --help` for options."""


def _part_command(part: str, module: str, summary: str) -> click.Command:
    @click.pass_context
    def command(ctx, args):
        args = list(args)
        if "-h" in args or "--help" in args:
            click.echo(ctx.get_usage() + "\n")  # click's header, then the part's own argparse options
            args = ["--help"]
        importlib.import_module(f"aotpack.bench.{module}").main(args)

    return click.Command(
        part, callback=command, help=summary + "\n\nOptions: see below (`--help`).", short_help=summary,
        add_help_option=False,
        context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
        params=[click.Argument(["args"], nargs=-1, type=click.UNPROCESSED)],
    )


for _part, (_module, _summary) in PARTS.items():
    bench.add_command(_part_command(_part, _module, _summary))
