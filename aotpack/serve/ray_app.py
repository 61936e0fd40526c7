"""Scale-out on Ray Serve (extra `aotpack[ray]`): replicas of the single-GPU service, the same HTTP API.

    aotpack serve PKG --model M --adapters DIR --ray --replicas 4 [--max-replicas 8]
    serve run aotpack.serve.ray_app:build_app package=PKG model=M adapters=DIR replicas=4

- `Replica` (one GPU each): a `Service` (queue, LoRA-affinity scheduler, prefetch) around one
  loaded package. Its `@serve.multiplexed` loader is keyed by the adapter-set id, so Ray's router
  sends a request to a replica that already holds that set (no parse, often no switch).
- `Ingress`: the FastAPI app; it names the request's adapter set and forwards it with
  `multiplexed_model_id`. Autoscaling (`--max-replicas`) follows ongoing requests per replica,
  i.e. queue length.
Registering adapters at run time (POST /v1/adapters) is off here: replicas are independent, so
adapters come from the deployment's --adapters/--adapter (the same on every replica).
"""


# no `from __future__ import annotations`: Ray's @serve.ingress needs real annotations for FastAPI
import asyncio
import collections
import dataclasses
import logging
import os
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from ..errors import AotpackError
from .app import GenerationRequest, add_request_error_handlers, error_response, json_answer, png_bytes
from .errors import QueueFullError, RequestTimeoutError, ServeError, error_body, http_status

BASE_SET = "base"  # the adapter-set id of requests without LoRAs
SETS_PER_REPLICA = int(os.environ.get("AOTPACK_RAY_SETS_PER_REPLICA", "8"))
log = logging.getLogger("aotpack.serve")


def adapter_set_id(loras) -> str:
    """A stable id for an adapter set (order and exact scales included): the multiplexed model id."""
    return "+".join(f"{entry['name']}:{float(entry.get('scale', 1.0))!r}" for entry in loras or []) or BASE_SET


def serve_options(options: dict):
    """`ServeOptions` from the deployment's `options`; an unknown key is refused before any replica starts."""
    from .service import ServeOptions

    known = {field.name for field in dataclasses.fields(ServeOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise AotpackError(f"options {unknown} are not serve options", f"use only {sorted(known)}")
    return ServeOptions(**options)


class NotOnRayError(ServeError):
    status, kind = 501, "not_available"


@serve.deployment
class Replica:
    def __init__(self, config: dict):
        from ..machine.cublaslt import use_no_cublaslt_workspace
        from .server import build_service

        use_no_cublaslt_workspace()  # the replica's process is aotpack's: before its first GPU matmul

        self.service = build_service(config["package"], config.get("model", "tiny"),
                                     revision=config.get("revision"), adapter_dirs=config.get("adapters", ()),
                                     adapters=config.get("adapter", ()),
                                     options=serve_options(config.get("options", {}))).start()
        self.replica = serve.get_replica_context().replica_id.unique_id
        # the sets this replica holds, as Ray's multiplexing evicts them (least recently loaded first)
        self.sets_loaded: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._stream = None  # a side CUDA stream for staging, as the worker's prefetcher uses

    @serve.multiplexed(max_num_models_per_replica=SETS_PER_REPLICA)
    async def load_set(self, set_id: str) -> str:
        """Stage the set's adapters in this replica's cache (parsed, on the device) once per set."""
        await asyncio.to_thread(self._stage, set_id)
        self.sets_loaded[set_id] = None
        self.sets_loaded.move_to_end(set_id)
        while len(self.sets_loaded) > SETS_PER_REPLICA:
            self.sets_loaded.popitem(last=False)
        return set_id

    def _stage(self, set_id: str) -> None:
        import torch

        worker = self.service.worker
        worker.ready.wait()
        if set_id == BASE_SET or worker.served is None:
            return
        if self._stream is None and worker.served.device.type == "cuda":
            self._stream = torch.cuda.Stream(worker.served.device)  # off the model's stream
        for part in set_id.split("+"):
            source = self.service.registry.get(part.rpartition(":")[0]).source
            worker.stage(source, self._stream)

    async def generate(self, fields: dict) -> dict:
        """{"status", "json" | "png", "headers"}: the ingress turns it into the HTTP answer. Every answer is
        counted in `aotpack_request_seconds`, and any failure comes back as the JSON error body."""
        started, status = time.perf_counter(), 500
        try:
            reply = await self._generate(fields)
            status = reply["status"]
            return reply
        finally:
            self.service.metrics.request_seconds.labels(str(status)).observe(time.perf_counter() - started)

    async def _generate(self, fields: dict) -> dict:
        try:
            await self.load_set(serve.get_multiplexed_model_id())
            job = self.service.submit(fields)
            future = asyncio.wrap_future(job.future)
            try:
                result = await asyncio.wait_for(future, timeout=max(0.0, job.deadline - time.monotonic()))
            except asyncio.TimeoutError:
                if job.cancel():
                    self.service.metrics.cancelled.labels("timeout").inc()
                raise RequestTimeoutError(f"no answer within the {job.timeout_s:g} s request timeout",
                                          "retry later, or deploy with a longer request_timeout_s") from None
            except asyncio.CancelledError:  # the client left: never run a withdrawn request
                if job.cancel():
                    self.service.metrics.cancelled.labels("disconnect").inc()
                raise
        except Exception as err:  # typed errors say their fix; anything else is a JSON 500, logged
            if not isinstance(err, AotpackError):
                log.exception("a generation request failed")
            headers = {"Retry-After": str(err.retry_after)} if isinstance(err, QueueFullError) else {}
            return {"status": http_status(err)[0], "json": error_body(err, self.service.registry.redact),
                    "headers": headers}
        headers = {"x-aotpack-replica": self.replica}
        if fields.get("response_format") == "png":
            return {"status": 200, "png": await asyncio.to_thread(png_bytes, result["images"][0]), "headers": headers}
        answer = await asyncio.to_thread(json_answer, result)
        return {"status": 200, "headers": headers, "json": dict(answer, replica=self.replica)}

    async def adapters(self) -> list[dict]:
        return self.service.describe_adapters()

    async def ready(self) -> dict:
        try:
            self.service.check_ready()
        except AotpackError as err:
            return {"status": http_status(err)[0], "json": error_body(err, self.service.registry.redact)}
        return {"status": 200, "json": {"status": "ready", "replica": self.replica, "sets": list(self.sets_loaded)}}

    async def metrics(self) -> bytes:
        return self.service.metrics.render()


app = FastAPI(title="aotpack on Ray Serve")


add_request_error_handlers(app)


def _answer(reply: dict) -> Response:
    if "png" in reply:
        return Response(reply["png"], media_type="image/png", headers=reply.get("headers"))
    return JSONResponse(reply["json"], status_code=reply["status"], headers=reply.get("headers"))


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, replica):
        self.replica = replica

    @app.post("/v1/images/generations")
    async def generations(self, body: GenerationRequest, request: Request):
        fields = body.model_dump()
        set_id = adapter_set_id(fields["loras"])
        return _answer(await self.replica.options(multiplexed_model_id=set_id).generate.remote(fields))

    @app.get("/v1/adapters")
    async def list_adapters(self):
        return {"data": await self.replica.adapters.remote()}

    @app.post("/v1/adapters")
    async def register_adapter(self):
        return error_response(NotOnRayError(
            "registering adapters at run time is not available on Ray Serve (replicas are independent)",
            "pass --adapters DIR / --adapter NAME=SOURCE to the deployment (every replica registers them)"))

    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self):
        return _answer(await self.replica.ready.remote())

    @app.get("/metrics")
    async def metrics(self):
        return Response(await self.replica.metrics.remote(), media_type="text/plain; version=0.0.4")


def build_app(args: dict):
    """The Ray Serve application (`serve run aotpack.serve.ray_app:build_app key=value ...`).

    args: package, model, revision, adapters (dir or list), adapter (NAME=SOURCE or list), replicas,
    max_replicas (autoscaling by queue length), num_gpus (per replica; default 1 on a CUDA package),
    num_cpus, options (ServeOptions fields: max_queue, max_wait_s, policy, ...).
    """
    from ..store.manifest import read_manifest
    from ..store.publish import locate_package

    def as_list(value):
        return [value] if isinstance(value, str) else list(value or [])

    manifest = read_manifest(locate_package(args["package"]))
    options = dict(args.get("options") or {})
    max_queue = serve_options(options).max_queue
    replicas = int(args.get("replicas", 1))
    max_replicas = args.get("max_replicas")
    max_batch = int(manifest.shapes["batch"][1])
    config = {"package": str(args["package"]), "model": args.get("model", "tiny"), "revision": args.get("revision"),
              "adapters": as_list(args.get("adapters")), "adapter": as_list(args.get("adapter")), "options": options}
    num_gpus = float(args.get("num_gpus", 1 if manifest.device == "cuda" else 0))
    scaling = ({"num_replicas": replicas} if not max_replicas else {"autoscaling_config": {
        "min_replicas": replicas, "max_replicas": int(max_replicas),
        # ongoing requests per replica = its queue (+ the batch running); scale out before it backs up
        "target_ongoing_requests": max(2, max_batch * 2)}})
    # Room for the replica's own queue to fill (then its scheduler answers 429 with Retry-After) beside the batch
    # on the model: with exactly max_queue, Ray held the surplus in its own unbounded queue and 429 never came.
    replica = Replica.options(ray_actor_options={"num_gpus": num_gpus, "num_cpus": float(args.get("num_cpus", 1))},
                              max_ongoing_requests=max_queue + max_batch, **scaling).bind(config)
    return Ingress.options(ray_actor_options={"num_cpus": 0},
                           max_ongoing_requests=(max_queue + max_batch) * max(replicas, int(max_replicas or 0))
                           ).bind(replica)


def run_ray(package, model, *, revision=None, adapter_dirs=(), adapters=(), options=None, host="127.0.0.1",
            port=8000, replicas=1, max_replicas=None) -> None:
    """`aotpack serve --ray`: start (or join, with RAY_ADDRESS) a Ray cluster and run the application."""
    import dataclasses

    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app({"package": str(package), "model": model, "revision": revision,
                         "adapters": [str(d) for d in adapter_dirs], "adapter": list(adapters),
                         "replicas": replicas, "max_replicas": max_replicas,
                         "options": dataclasses.asdict(options) if options else {}}),
              name="aotpack", route_prefix="/", blocking=True)
