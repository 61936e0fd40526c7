"""`aotpack` command line: a thin shell over the library (torch is imported only inside commands)."""

from __future__ import annotations

import json
import sys

import click

from .output import DEBUG, quiet_libraries


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="aotpack")
def cli():
    """Ahead-of-time compiled Flux.1 transformers with hot-swappable LoRA slots."""


@cli.command()
@click.option("--model", default="tiny", show_default=True,
              help="'tiny', a diffusers-format directory, or a Hub id (owner/name[@revision]).")
@click.option("--target", default="cpu", show_default=True, help="Recipe name (see `aotpack targets`) or .toml path.")
@click.option("--revision", default=None, help="Hub revision of --model.")
@click.option("--max-rank", type=int, default=None, help="Largest LoRA rank (summed over stacked adapters); 0 builds without LoRA slots.")
@click.option("--slots", "slots", multiple=True, help="fnmatch pattern of linear layers to slot (repeatable).")
@click.option("--layout", type=click.Choice(["regional", "whole"]), default=None, help="Program layout.")
@click.option("--out", type=click.Path(), default=None, help="Package directory to write.")
@click.option("--jobs", type=int, default=None,
              help="Programs compiled in parallel processes (default: 1 on CPU targets, up to 4 on GPU ones).")
def build(model, target, revision, max_rank, slots, layout, out, jobs):
    """Export and AOT-compile a Flux transformer with LoRA slots into a package."""
    quiet_libraries()
    from ..builder.build import build_package

    path = build_package(model, target, out=out, revision=revision, max_rank=max_rank, slots=slots or None,
                         layout=layout, compile_workers=jobs, progress=True)
    click.echo(str(path))


@cli.command()
@click.argument("package")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON on stdout.")
def inspect(package, as_json):
    """Show a package's manifest."""
    from ..store.inspect import format_manifest
    from ..store.manifest import read_manifest
    from ..store.publish import locate_package

    manifest = read_manifest(locate_package(package))
    click.echo(json.dumps(manifest.to_json(), indent=2) if as_json else format_manifest(manifest))


@cli.command()
def targets():
    """List the build targets (recipes)."""
    from ..recipes.recipe import known_targets, load_recipe

    for name in known_targets():
        recipe = load_recipe(name)
        click.echo(f"{name:10s} {recipe.gpu_arch or '-':6s} {recipe.description}")


@cli.command()
@click.argument("package")
@click.option("--model", default="tiny", show_default=True, help="Model whose weights to bind (as for build).")
@click.option("--revision", default=None, help="Hub revision of --model.")
@click.option("--prompt", default=None, help="Prompt of a single request.")
@click.option("--jobs", "jobs_file", type=click.Path(), default=None, help="JSONL file of requests.")
@click.option("--lora", "loras", multiple=True, help="FILE[:SCALE] (repeatable: adapters are stacked).")
@click.option("--fit", type=click.Choice(["svd"]), default=None, help="Compress stacks above max_rank by SVD.")
@click.option("--steps", type=int, default=28, show_default=True)
@click.option("--height", type=int, default=1024, show_default=True)
@click.option("--width", type=int, default=1024, show_default=True)
@click.option("--guidance", type=float, default=3.5, show_default=True)
@click.option("--max-sequence-length", type=int, default=512, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="torch.Generator('cpu').manual_seed(SEED).")
@click.option("--out", type=click.Path(), default=None, help="Image file to write (PNG).")
@click.option("--save-latents", type=click.Path(), default=None, help="safetensors file for the latents.")
def run(package, model, revision, prompt, jobs_file, loras, fit, steps, height, width, guidance,
        max_sequence_length, seed, out, save_latents):
    """Generate images with a package, switching LoRAs per request without recompiling."""
    quiet_libraries()
    from ..errors import AotpackError
    from ..runtime.jobs import Request, parse_lora_option, read_jobs, run_request
    from ..runtime.pipeline import load_package

    if (prompt is None) == (jobs_file is None):
        raise AotpackError("pass exactly one of --prompt and --jobs", "e.g. --prompt 'a cat' or --jobs jobs.jsonl")
    if jobs_file:
        requests = read_jobs(jobs_file)
    else:
        requests = [Request(prompt=prompt, loras=[parse_lora_option(x) for x in loras], seed=seed, steps=steps,
                            height=height, width=width, guidance=guidance,
                            max_sequence_length=max_sequence_length, out=out, save_latents=save_latents, fit=fit)]
    import time

    started = time.perf_counter()
    served = load_package(package, model, revision=revision, progress=True)
    click.echo(f"package loaded in {time.perf_counter() - started:.2f} s", err=True)
    for index, request in enumerate(requests, start=1):
        result = run_request(served, request, index)
        source = "from file" if result.adapters_parsed else "cached"
        lora_text = ", ".join(f"{p}:{s:g}" for p, s in request.loras) or "none"
        click.echo(f"request {index}: {request.steps} steps {request.width}x{request.height} in "
                   f"{result.seconds:.2f} s; LoRA switch {result.switch_seconds * 1000:.1f} ms ({source}; "
                   f"loras: {lora_text})" + "".join(f"; {n}" for n in result.notes), err=True)
        for path in (result.image_path, result.latents_path):
            if path:
                click.echo(path)


@cli.command()
@click.option("--out", type=click.Path(), default="artifacts/demo", show_default=True)
@click.option("--rebuild", is_flag=True, help="Rebuild the tiny package even if it exists.")
def demo(out, rebuild):
    """Offline demo: build the tiny model's package, then generate with LoRAs hot-swapped."""
    quiet_libraries()
    from ..demo import run_demo

    for line in run_demo(out, rebuild=rebuild):
        click.echo(line)


# -- commands defined in their own modules (each module holds one concern; add one line per command)
from .bench import bench  # noqa: E402
from .doctor import doctor  # noqa: E402
from .publish import pull, push  # noqa: E402

cli.add_command(bench)
cli.add_command(doctor)
cli.add_command(push)
cli.add_command(pull)


def main() -> None:
    from ..errors import AotpackError

    try:
        cli.main(standalone_mode=False)
    except AotpackError as err:
        if DEBUG:
            raise
        click.echo(f"error: {err.problem}", err=True)
        if err.fix:
            click.echo(f"  fix: {err.fix}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
