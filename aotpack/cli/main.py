"""`aotpack` command line: a thin shell over the library (torch is imported only inside commands)."""

from __future__ import annotations

import json
import logging
import sys

import click

from ..machine.cublaslt import use_no_cublaslt_workspace
from ..recipes.recipe import ATTENTION_BACKENDS
from ..runtime.requests import GUIDANCE_RANGE
from .options import FiniteFloat, merge_policy_option, merge_share_option
from .output import DEBUG, configure_logging, quiet_libraries

logger = logging.getLogger("aotpack.cli")
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130  # 2 is click's own code for usage errors
_DEBUG_HINT = "set AOTPACK_DEBUG=1 for the traceback"


def report_error(err: Exception) -> None:
    """One message on stderr: a typed error's problem and fix, or an unexpected error's type and text."""
    from ..errors import AotpackError

    if isinstance(err, AotpackError):
        click.echo(f"error: {err.problem}", err=True)
        if err.fix:
            click.echo(f"  fix: {err.fix}", err=True)
    else:
        click.echo(f"error: unexpected {type(err).__name__}: {err} ({_DEBUG_HINT})", err=True)


class AotpackGroup(click.Group):
    """Exit codes for every command, also under click's CliRunner: 1 for runtime errors (typed or not),
    2 for usage errors (click's), 130 for Ctrl-C; no traceback unless AOTPACK_DEBUG=1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, SystemExit):
            raise  # click's own: usage errors (2), --help, explicit exits
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except Exception as err:
            if DEBUG:
                raise
            report_error(err)
            ctx.exit(EXIT_ERROR)


@click.group(cls=AotpackGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="aotpack")
@click.option("--quiet", "-q", "verbosity", flag_value="quiet", help="Only warnings and errors on stderr.")
@click.option("--verbose", "-v", "verbosity", flag_value="verbose", help="Debug messages too.")
def cli(verbosity):
    """Ahead-of-time compiled Flux.1 transformers with hot-swappable LoRA slots."""
    configure_logging(verbosity or "normal")


def _deprecated_alias(old: str, new: str):
    def warn(ctx, param, value):
        if value is not None:
            logger.warning("%s is deprecated; use %s", old, new)
        return value
    return warn


@cli.command()
@click.option("--model", required=True,
              help="'tiny' (the embedded test model), a diffusers-format directory, or a Hub id "
                   "(owner/name[@revision]).")
@click.option("--target", default="cpu", show_default=True, help="Recipe name (see `aotpack targets`) or .toml path.")
@click.option("--revision", default=None, help="Hub revision of --model.")
@click.option("--max-rank", type=int, default=None, help="Largest LoRA rank (summed over stacked adapters); 0 builds without LoRA slots.")
@click.option("--slots", "slots", multiple=True, help="fnmatch pattern of linear layers to slot (repeatable).")
@click.option("--layout", type=click.Choice(["regional", "whole"]), default=None, help="Program layout.")
@click.option("--parallel", type=click.Choice(["none", "ulysses"]), default=None,
              help="ulysses: split blocks around attention so the package runs on 1..N GPUs (run --gpus N).")
@click.option("--attention", type=click.Choice(ATTENTION_BACKENDS), default=None,
              help="Attention backend instead of the recipe's (e.g. cudnn: bf16 at every length on h100/h200).")
@click.option("--out", type=click.Path(), default=None, help="Package directory to write.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing package at --out (never a folder that is not an aotpack package).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Programs compiled at once, the build's own process included (default: one per program, up to "
                   "the cores on CPU targets, half of them plus one on GPU ones).")
@click.option("--jobs", "workers_alias", type=click.IntRange(min=1), default=None, hidden=True,
              callback=_deprecated_alias("build --jobs", "--workers"))
def build(model, target, revision, max_rank, slots, layout, parallel, attention, out, overwrite, workers,
          workers_alias):
    """Export and AOT-compile a Flux transformer with LoRA slots into a package."""
    quiet_libraries()
    from ..builder.build import build_package
    from ..builder.output import sigterm_as_interrupt

    with sigterm_as_interrupt():  # `timeout`, `kill`: the staging folder goes, as on Ctrl-C (exit 130)
        path = build_package(model, target, out=out, overwrite=overwrite, revision=revision, max_rank=max_rank,
                             slots=slots or None, layout=layout, parallel=parallel,
                             attention=attention, compile_workers=workers or workers_alias, progress=True)
    click.echo(str(path))


@cli.command()
@click.argument("package")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON on stdout.")
@click.option("--no-verify", is_flag=True, help="Skip checking every file against its sha256 (says so on stderr).")
def inspect(package, as_json, no_verify):
    """Show a package's manifest (after verifying its files, unless --no-verify)."""
    from ..store.inspect import format_manifest, inspect_package

    manifest, verified = inspect_package(package, verify=not no_verify)
    if as_json:  # stdout stays pure JSON; a skipped verification is still said (on stderr)
        click.echo(json.dumps(manifest.to_json(), indent=2))
        if no_verify:
            click.echo(verified, err=True)
    else:
        click.echo(format_manifest(manifest) + "\n\n" + verified)


@cli.command()
def targets():
    """List the build targets (recipes)."""
    from ..recipes.recipe import known_targets, load_recipe

    for name in known_targets():
        recipe = load_recipe(name)
        click.echo(f"{name:10s} {recipe.gpu_arch or '-':6s} {recipe.description}")


# `run`'s options that describe one request: with --requests, each jobs line gives its own
PER_REQUEST_OPTIONS = ("loras", "fit", "merge", "steps", "height", "width", "guidance", "max_sequence_length", "seed",
                       "out", "save_latents")


@cli.command()
@click.argument("package")
@click.option("--model", default=None,
              help="Model whose weights to bind (as for build); default: the model recorded in the package.")
@click.option("--revision", default=None, help="Hub revision of --model.")
@click.option("--prompt", default=None, help="Prompt of a single request.")
@click.option("--requests", "requests_file", type=click.Path(), default=None,
              help="JSONL file of requests (one JSON object per line; diffusers' argument names accepted).")
@click.option("--jobs", "jobs_file", type=click.Path(), default=None, hidden=True,
              callback=_deprecated_alias("run --jobs", "--requests"))
@click.option("--report", "report_file", type=click.Path(), default=None,
              help="JSON file for the per-request summary (ok/failed with the reason; each LoRA's "
                   "sha256 and Hub commit).")
@click.option("--lora", "loras", multiple=True, help="FILE[:SCALE] (repeatable: adapters are stacked).")
@click.option("--fit", type=click.Choice(["svd"]), default=None, help="Compress stacks above max_rank by SVD.")
@click.option("--merge/--no-merge", default=None,
              help="Fold the LoRAs into the weights now (faster steps, ~0.1 s switch) or keep them in slots "
                   "(default: as --merge-policy decides).")
@merge_policy_option
@merge_share_option
@click.option("--steps", type=int, default=28, show_default=True)
@click.option("--height", type=int, default=1024, show_default=True)
@click.option("--width", type=int, default=1024, show_default=True)
@click.option("--guidance", type=FiniteFloat(*GUIDANCE_RANGE), default=3.5, show_default=True)
@click.option("--max-sequence-length", type=int, default=512, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="torch.Generator('cpu').manual_seed(SEED).")
@click.option("--out", type=click.Path(), default=None, help="Image file to write (PNG).")
@click.option("--save-latents", type=click.Path(), default=None, help="safetensors file for the latents.")
@click.option("--gpus", type=click.IntRange(min=1), default=1, show_default=True,
              help="Ranks for one image (context parallel; the package must be built with --parallel ulysses).")
@click.option("--cuda-graphs/--no-cuda-graphs", default=None,
              help="Replay each step from a CUDA graph captured per shape (default: on where it applies: a CUDA "
                   "package of regional programs, on one GPU or every rank of --gpus N).")
def run(package, model, revision, prompt, requests_file, jobs_file, report_file, loras, fit, merge, merge_policy,
        merge_share, steps, height, width, guidance, max_sequence_length, seed, out, save_latents, gpus, cuda_graphs):
    """Generate images with a package, switching LoRAs per request without recompiling.

    Every request is checked before the first runs; a failing request is reported and the others still
    run; the exit code is 1 when any failed.
    """
    quiet_libraries()
    import time

    from ..runtime.jobs import (
        Request,
        check_local_loras,
        check_outputs_apart,
        check_report_path,
        parse_lora_option,
        read_jobs,
        run_jobs,
        warn_if_nothing_is_written,
        write_report,
    )
    from ..runtime.pipeline import load_package
    from ..runtime.requests import PackageLimits, validate_request
    from ..store.manifest import read_manifest, recorded_model
    from ..store.publish import locate_package

    requests_file = requests_file or jobs_file
    if (prompt is None) == (requests_file is None):
        raise click.UsageError("pass exactly one of --prompt and --requests FILE")
    if requests_file:  # each jobs line carries its own: these flags would be ignored without a word
        context = click.get_current_context()
        given = [param.opts[0] for param in context.command.params if param.name in PER_REQUEST_OPTIONS
                 and context.get_parameter_source(param.name) != click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"{', '.join(given)} apply to --prompt only; with --requests each line gives "
                                   "its own (\"loras\", \"out\", \"steps\", ...)")
    if report_file:
        check_report_path(report_file)
    package_dir = locate_package(package)
    manifest = read_manifest(package_dir)
    limits = PackageLimits.from_manifest(manifest)
    if requests_file:
        requests = read_jobs(requests_file, limits)
    else:
        request = Request(prompt=prompt, loras=[parse_lora_option(x) for x in loras], seed=seed, steps=steps,
                          height=height, width=width, guidance=guidance, max_sequence_length=max_sequence_length,
                          out=out, save_latents=save_latents, fit=fit, merge=merge)
        requests = [validate_request(request, limits)]
    check_outputs_apart(requests, package_dir, report=report_file, jobs_file=requests_file)
    check_local_loras(requests)
    warn_if_nothing_is_written(requests)
    if model is None:
        model, recorded_revision = recorded_model(manifest)
        revision = revision or recorded_revision
        logger.info("model: %s%s (recorded in the package manifest; --model overrides)", model,
                    f"@{revision}" if revision else "")
    else:
        logger.info("model: %s%s", model, f"@{revision}" if revision else "")

    def show(outcome):
        request, result = outcome.request, outcome.result
        lora_text = ", ".join(f"{p}:{s:g}" for p, s in request.loras) or "none"
        if result is None:
            click.echo(f"request {outcome.index}: FAILED: {outcome.error}"
                       + (f" (fix: {outcome.fix})" if outcome.fix else ""), err=True)
            return
        source = "from file" if result.adapters_parsed else "cached"
        click.echo(f"request {outcome.index}: {request.steps} steps {request.width}x{request.height} in "
                   f"{result.seconds:.2f} s; LoRA switch {result.switch_seconds * 1000:.1f} ms ({source}"
                   f"{', merged' if result.lora_mode == 'merged' else ''}; "
                   f"loras: {lora_text})" + "".join(f"; {n}" for n in result.notes), err=True)
        for path in (result.image_path, result.latents_path):
            if path:
                click.echo(path)

    bar = len(requests) > 1 and sys.stderr.isatty() and logger.isEnabledFor(logging.INFO)  # a terminal only
    started = time.perf_counter()
    if gpus > 1:  # context parallel: one process per GPU loads and runs; rank 0 writes the outputs
        from ..runtime.parallel import generate

        outcomes = generate(package_dir, model, requests, gpus=gpus, revision=revision, cuda_graphs=cuda_graphs,
                            merge_policy=merge_policy, merge_share=merge_share)
        logger.info("%d ranks loaded and ran in %.2f s", gpus, time.perf_counter() - started)
        for outcome in outcomes:
            show(outcome)
    else:
        served = load_package(package_dir, model, revision=revision, progress=True, cuda_graphs=cuda_graphs,
                              merge_policy=merge_policy, merge_share=merge_share)
        logger.info("package loaded in %.2f s", time.perf_counter() - started)
        outcomes = run_jobs(served, requests, on_outcome=show, progress=bar, debug=DEBUG)
    failed = [o for o in outcomes if not o.ok]
    if report_file:
        write_report(report_file, outcomes)
    if len(outcomes) > 1 or failed:
        click.echo(f"summary: {len(outcomes) - len(failed)} ok, {len(failed)} failed"
                   + "".join(f"\n  request {o.index}: {o.error}" for o in failed), err=True)
    if failed:
        sys.exit(EXIT_ERROR)  # each failure was reported with its reason above


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
from .serve import serve  # noqa: E402

cli.add_command(bench)
cli.add_command(doctor)
cli.add_command(push)
cli.add_command(pull)
cli.add_command(serve)


def main() -> None:
    use_no_cublaslt_workspace()  # before any GPU matmul of this process (machine/cublaslt.py)
    # Standalone click: usage errors exit 2; AotpackGroup turns runtime errors into exit 1 and Ctrl-C
    # into 130 (click's own Abort, e.g. Ctrl-C at a prompt, exits 1).
    cli.main(prog_name="aotpack")


if __name__ == "__main__":
    main()
