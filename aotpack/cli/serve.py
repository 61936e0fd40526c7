"""`aotpack serve`: the HTTP image service (FastAPI + uvicorn), or its Ray Serve scale-out (--ray)."""

from __future__ import annotations

import click

from .options import FiniteFloat, merge_policy_option, merge_share_option


@click.command()
@click.argument("package")
@click.option("--model", default="tiny", show_default=True, help="Model whose weights to bind (as for run).")
@click.option("--revision", default=None, help="Hub revision of --model.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--adapters", "adapter_dirs", multiple=True, type=click.Path(file_okay=False),
              help="Directory: registers each *.safetensors file and LoRA folder in it under its stem (repeatable).")
@click.option("--adapter", "adapters", multiple=True,
              help="NAME=SOURCE: a local file or hf://owner/repo@rev/file.safetensors (repeatable).")
@click.option("--token", envvar="AOTPACK_TOKEN", default=None,
              help="Bearer token that POST /v1/adapters requires [env AOTPACK_TOKEN]; none: registering is off.")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="Waiting requests before 429.")
@click.option("--max-wait", type=FiniteFloat(min=0), default=30.0, show_default=True,
              help="Seconds after which a waiting request is served before LoRA affinity.")
@click.option("--policy", type=click.Choice(["affinity", "fifo"]), default="affinity", show_default=True)
@click.option("--request-timeout", type=FiniteFloat(min=0, min_open=True), default=600.0, show_default=True,
              help="Seconds per request.")
@click.option("--shutdown-timeout", type=FiniteFloat(min=0), default=30.0, show_default=True,
              help="On SIGTERM, seconds to finish requests in flight before closing their connections.")
@click.option("--no-prefetch", is_flag=True, help="Parse the next batch's adapters only at the switch.")
@click.option("--cache-gb", type=FiniteFloat(min=0, min_open=True), default=None,
              help="Adapter cache budget on the device (default 4 GiB).")
@merge_policy_option
@merge_share_option
@click.option("--ray", "use_ray", is_flag=True, help="Serve through Ray Serve (extra aotpack[ray]).")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --ray: replicas (one GPU each).")
@click.option("--max-replicas", type=click.IntRange(min=1), default=None,
              help="With --ray: autoscale by queue length from --replicas up to this many.")
def serve(package, model, revision, host, port, adapter_dirs, adapters, token, max_queue, max_wait, policy,
          request_timeout, shutdown_timeout, no_prefetch, cache_gb, merge_policy, merge_share, use_ray, replicas,
          max_replicas):
    """Serve a package over HTTP: POST /v1/images/generations (OpenAI Images shape + loras), /v1/adapters,
    /healthz, /readyz, /metrics."""
    from .output import quiet_libraries

    quiet_libraries()
    import importlib.util

    from ..errors import AotpackError

    extra = "ray" if use_ray else "serve"
    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") + (("ray",) if use_ray else ())
               if importlib.util.find_spec(m) is None]
    if missing:
        raise AotpackError(f"aotpack serve{' --ray' if use_ray else ''} needs {missing}, which are not installed",
                           f"pip install 'aotpack[{extra}]'")
    from ..serve.service import ServeOptions

    options = ServeOptions(max_queue=max_queue, max_wait_s=max_wait, policy=policy,
                           request_timeout_s=request_timeout, prefetch=not no_prefetch, token=token,
                           cache_budget_bytes=int(cache_gb * 2**30) if cache_gb else None, merge_policy=merge_policy,
                           merge_share=merge_share)
    if use_ray:
        from ..serve.ray_app import run_ray

        run_ray(package, model, revision=revision, adapter_dirs=adapter_dirs, adapters=adapters, options=options,
                host=host, port=port, replicas=replicas, max_replicas=max_replicas)
        return
    from ..serve.server import build_service, run

    service = build_service(package, model, revision=revision, adapter_dirs=adapter_dirs, adapters=adapters,
                            options=options)
    click.echo(f"serving {service.package_dir} ({len(service.registry)} adapters) on http://{host}:{port}",
               err=True)
    run(service, host, port, shutdown_timeout_s=shutdown_timeout)
