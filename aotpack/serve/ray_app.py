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
import base64
import os
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve

from ..errors import AotpackError
from .app import GenerationRequest, error_response, png_bytes
from .errors import QueueFullError, ServeError, error_body, http_status

BASE_SET = "base"  # the adapter-set id of requests without LoRAs


def adapter_set_id(loras) -> str:
    """A stable id for an adapter set (order and scales included): the multiplexed model id."""
    return "+".join(f"{entry['name']}:{float(entry.get('scale', 1.0)):g}" for entry in loras or []) or BASE_SET


class NotOnRayError(ServeError):
    status, kind = 501, "not_available"


@serve.deployment
class Replica:
    def __init__(self, config: dict):
        from ..machine.cublaslt import use_no_cublaslt_workspace
        from .server import build_service
        from .service import ServeOptions

        use_no_cublaslt_workspace()  # the replica's process is aotpack's: before its first GPU matmul

        self.service = build_service(config["package"], config.get("model", "tiny"),
                                     revision=config.get("revision"), adapter_dirs=config.get("adapters", ()),
                                     adapters=config.get("adapter", ()),
                                     options=ServeOptions(**config.get("options", {}))).start()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.sets_loaded: list[str] = []

    @serve.multiplexed(max_num_models_per_replica=int(os.environ.get("AOTPACK_RAY_SETS_PER_REPLICA", "8")))
    async def load_set(self, set_id: str) -> str:
        """Stage the set's adapters in this replica's cache (parsed, on the device) once per set."""
        await asyncio.to_thread(self._stage, set_id)
        self.sets_loaded.append(set_id)
        return set_id

    def _stage(self, set_id: str) -> None:
        worker = self.service.worker
        worker.ready.wait()
        if set_id == BASE_SET or worker.served is None:
            return
        for part in set_id.split("+"):
            source = self.service.registry.get(part.rpartition(":")[0]).source
            worker.stage(source, None)

    async def generate(self, fields: dict) -> dict:
        """{"status", "json" | "png", "headers"}: the ingress turns it into the HTTP answer."""
        try:
            await self.load_set(serve.get_multiplexed_model_id())
            job = self.service.submit(fields)
            try:
                result = await asyncio.wrap_future(job.future)
            except asyncio.CancelledError:  # the client left: never run a withdrawn request
                if job.cancel():
                    self.service.metrics.cancelled.labels("disconnect").inc()
                raise
        except AotpackError as err:
            headers = {"Retry-After": str(err.retry_after)} if isinstance(err, QueueFullError) else {}
            return {"status": http_status(err)[0], "json": error_body(err), "headers": headers}
        headers = {"x-aotpack-replica": self.replica}
        if fields.get("response_format") == "png" and int(fields.get("n", 1)) == 1:
            return {"status": 200, "png": png_bytes(result["images"][0]), "headers": headers}
        data = [{"b64_json": base64.b64encode(png_bytes(image)).decode()} for image in result["images"]]
        return {"status": 200, "headers": headers, "json": {
            "created": int(time.time()), "data": data, "timings": result["timings"],
            "adapters": result["adapters"], "replica": self.replica}}

    async def adapters(self) -> list[dict]:
        return self.service.describe_adapters()

    async def ready(self) -> dict:
        try:
            self.service.check_ready()
        except AotpackError as err:
            return {"status": http_status(err)[0], "json": error_body(err)}
        return {"status": 200, "json": {"status": "ready", "replica": self.replica, "sets": self.sets_loaded}}

    async def metrics(self) -> bytes:
        return self.service.metrics.render()


app = FastAPI(title="aotpack on Ray Serve")


@app.exception_handler(RequestValidationError)
async def _bad_body(request, err):
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in err.errors())
    return JSONResponse({"error": {"type": "invalid_request", "message": problems,
                                   "fix": "see POST /v1/images/generations in docs/serving.md"}}, status_code=422)


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
    replicas = int(args.get("replicas", 1))
    max_replicas = args.get("max_replicas")
    max_queue = int(options.get("max_queue", 64))
    config = {"package": str(args["package"]), "model": args.get("model", "tiny"), "revision": args.get("revision"),
              "adapters": as_list(args.get("adapters")), "adapter": as_list(args.get("adapter")), "options": options}
    num_gpus = float(args.get("num_gpus", 1 if manifest.device == "cuda" else 0))
    scaling = ({"num_replicas": replicas} if not max_replicas else {"autoscaling_config": {
        "min_replicas": replicas, "max_replicas": int(max_replicas),
        # ongoing requests per replica = its queue (+ the batch running); scale out before it backs up
        "target_ongoing_requests": max(2, int(manifest.shapes["batch"][1]) * 2)}})
    replica = Replica.options(ray_actor_options={"num_gpus": num_gpus, "num_cpus": float(args.get("num_cpus", 1))},
                              max_ongoing_requests=max_queue, **scaling).bind(config)
    return Ingress.options(ray_actor_options={"num_cpus": 0},
                           max_ongoing_requests=max_queue * max(replicas, int(max_replicas or 0))).bind(replica)


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
