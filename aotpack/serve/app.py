"""The HTTP API (FastAPI): a thin shell over `Service`. OpenAI Images shape plus aotpack's fields."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from typing import Literal

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ..errors import AotpackError
from .errors import QueueFullError, RequestTimeoutError, error_body, http_status

POLL_S = 0.05  # how often a waiting request checks that its client is still there
GENERATIONS = "/v1/images/generations"
# strict: "steps": true or "2" is refused (422), not converted; ints still fill float fields
STRICT = ConfigDict(extra="forbid", strict=True)


class LoraRef(BaseModel):
    model_config = STRICT
    name: str
    scale: float = 1.0


class GenerationRequest(BaseModel):
    model_config = STRICT
    prompt: str
    n: int = Field(1, ge=1)
    size: str = "1024x1024"
    response_format: Literal["b64_json", "png"] = "b64_json"
    loras: list[LoraRef] = []
    steps: int = 28
    guidance: float = 3.5
    seed: int = 0
    max_sequence_length: int = 512
    model: str | None = None  # OpenAI clients send these; one server serves one model
    user: str | None = None


class AdapterRegistration(BaseModel):
    model_config = STRICT
    name: str
    source: str


def error_response(err: Exception, redact=None) -> JSONResponse:
    status, _ = http_status(err)
    headers = {"Retry-After": str(err.retry_after)} if isinstance(err, QueueFullError) else None
    return JSONResponse(error_body(err, redact), status_code=status, headers=headers)


def body_problems(err: RequestValidationError) -> str:
    """Each problem of a refused body with its field and the value sent (pydantic's own words otherwise)."""
    problems = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"][1:]) or "body"
        if e["type"] == "json_invalid":
            problems.append(f"the body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])} at character "
                            f"{e['loc'][-1]})")
        elif e["type"] == "missing":
            problems.append(f"{field} is missing")
        else:
            problems.append(f"{field} = {repr(e.get('input'))[:80]}: {e['msg']}")
    return "; ".join(problems)


def validation_error_response(err: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": {"type": "invalid_request", "message": body_problems(err),
                                   "fix": "send a JSON object with the fields and types of POST "
                                          f"{GENERATIONS} or /v1/adapters in docs/serving.md"}}, status_code=422)


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def json_answer(result: dict) -> dict:
    """The OpenAI-shaped answer with aotpack's fields: the size made, the validator's notes, timings, adapters."""
    data = [{"b64_json": base64.b64encode(png_bytes(image)).decode()} for image in result["images"]]
    return {"created": int(time.time()), "data": data, "size": result["size"], "notes": result["notes"],
            "timings": result["timings"], "adapters": result["adapters"]}


async def wait_for_job(service, job, request: Request):
    """The job's result; cancels it (and returns None) when the client disconnects while it waits."""
    future = asyncio.wrap_future(job.future)
    while True:
        done, _ = await asyncio.wait({future}, timeout=POLL_S)
        if done:
            return future.result()
        if await request.is_disconnected():
            if job.cancel():
                service.metrics.cancelled.labels("disconnect").inc()
            return None
        if time.monotonic() > job.deadline:
            if job.cancel():
                service.metrics.cancelled.labels("timeout").inc()
            raise RequestTimeoutError(f"no answer within the {job.timeout_s:g} s request timeout",
                                      "retry later, or start the server with a longer --request-timeout")


class CountGenerations:
    """Every answer to POST /v1/images/generations into `aotpack_request_seconds`, the refused bodies' 422s
    included (they never reach the route). Plain ASGI: Starlette's `BaseHTTPMiddleware` hides a client's
    disconnect from `request.is_disconnected()`, which withdraws queued requests."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != GENERATIONS:
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_counting(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            self.metrics.request_seconds.labels(str(status)).observe(time.perf_counter() - started)


def add_request_error_handlers(app: FastAPI) -> None:
    """A refused body, an unknown path, a wrong method, an unparsable body: aotpack's error shape, not FastAPI's
    `{"detail": ...}` (the plain server and the Ray ingress alike)."""

    @app.exception_handler(RequestValidationError)
    async def bad_body(request, err):
        return validation_error_response(err)

    @app.exception_handler(HTTPException)
    async def http_error(request, err):
        kinds = {404: ("not_found", "see the endpoints in docs/serving.md"),
                 405: ("method_not_allowed", "see the endpoints and their methods in docs/serving.md")}
        kind, fix = kinds.get(err.status_code, ("invalid_request", "send a UTF-8 JSON object (docs/serving.md)"))
        return JSONResponse({"error": {"type": kind, "message": f"{request.method} {request.url.path}: {err.detail}",
                                       "fix": fix}}, status_code=err.status_code, headers=err.headers)


def create_app(service) -> FastAPI:
    app = FastAPI(title="aotpack", description="Flux + LoRA image generation from an AOT-compiled package")
    app.state.service = service

    @app.exception_handler(AotpackError)
    async def typed_error(request, err):  # JSON with the type, the problem and the fix
        return error_response(err, service.registry.redact)

    @app.exception_handler(Exception)
    async def any_error(request, err):  # anything else: logged, a JSON 500, and the server lives on
        return error_response(err, service.registry.redact)

    add_request_error_handlers(app)

    app.add_middleware(CountGenerations, metrics=service.metrics)

    @app.post(GENERATIONS)
    async def generations(body: GenerationRequest, request: Request):
        try:
            job = service.submit(body.model_dump())
            result = await wait_for_job(service, job, request)
            if result is None:
                return Response(status_code=499)  # client closed the request (nginx's convention); nobody reads it
            # PNG encoding off the event loop: a 4-image 1024² answer held /healthz ~0.7 s on the loop (CPU)
            if body.response_format == "png":
                return Response(await asyncio.to_thread(png_bytes, result["images"][0]), media_type="image/png")
            return await asyncio.to_thread(json_answer, result)
        except Exception as err:
            return error_response(err, service.registry.redact)

    @app.get("/v1/adapters")
    async def list_adapters():
        return {"data": service.describe_adapters()}

    @app.post("/v1/adapters", status_code=201)
    async def register_adapter(body: AdapterRegistration, authorization: str | None = Header(None)):
        service.check_token(authorization)
        service.check_ready()
        entry = await asyncio.to_thread(service.register, body.name, body.source)
        return {**entry, "source": body.source}  # the client's own words; the listing shows the served form

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        service.check_ready()
        return {"status": "ready", "target": service.manifest.target, "max_batch": service.max_batch,
                "adapters": len(service.registry)}

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
