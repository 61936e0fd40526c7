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

from ..errors import AotpackError
from .errors import QueueFullError, RequestTimeoutError, error_body, http_status

POLL_S = 0.05  # how often a waiting request checks that its client is still there


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    scale: float = 1.0


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
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
    model_config = ConfigDict(extra="forbid")
    name: str
    source: str


def error_response(err: Exception) -> JSONResponse:
    status, _ = http_status(err)
    headers = {"Retry-After": str(err.retry_after)} if isinstance(err, QueueFullError) else None
    return JSONResponse(error_body(err), status_code=status, headers=headers)


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


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


def create_app(service) -> FastAPI:
    app = FastAPI(title="aotpack", description="Flux + LoRA image generation from an AOT-compiled package")
    app.state.service = service

    @app.exception_handler(AotpackError)
    async def typed_error(request, err):  # JSON with the type, the problem and the fix
        return error_response(err)

    @app.exception_handler(Exception)
    async def any_error(request, err):  # anything else: logged, a JSON 500, and the server lives on
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request, err):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in err.errors())
        return JSONResponse({"error": {"type": "invalid_request", "message": problems,
                                       "fix": "see POST /v1/images/generations in docs/serving.md"}}, status_code=422)

    @app.post("/v1/images/generations")
    async def generations(body: GenerationRequest, request: Request):
        started = time.perf_counter()
        status = 200
        try:
            job = service.submit(body.model_dump())
            result = await wait_for_job(service, job, request)
            if result is None:
                status = 499  # client closed the request (nginx's convention); nobody reads this
                return Response(status_code=status)
            if body.response_format == "png" and body.n == 1:
                return Response(png_bytes(result["images"][0]), media_type="image/png")
            data = [{"b64_json": base64.b64encode(png_bytes(image)).decode()} for image in result["images"]]
            return {"created": int(time.time()), "data": data, "timings": result["timings"],
                    "adapters": result["adapters"]}
        except Exception as err:
            status = http_status(err)[0]
            return error_response(err)
        finally:
            service.metrics.request_seconds.labels(str(status)).observe(time.perf_counter() - started)

    @app.get("/v1/adapters")
    async def list_adapters():
        return {"data": service.describe_adapters()}

    @app.post("/v1/adapters", status_code=201)
    async def register_adapter(body: AdapterRegistration, authorization: str | None = Header(None)):
        service.check_token(authorization)
        service.check_ready()
        entry = await asyncio.to_thread(service.register, body.name, body.source)
        return entry

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
