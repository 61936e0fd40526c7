"""A serving process: registry + scheduler + worker + metrics around one package, and request validation.

`Service.submit(fields)` turns a generation request (the HTTP body as a dict) into a queued `Job`
whose future resolves to {"images", "timings", "adapters"}; HTTP and Ray are thin shells over it.
"""

from __future__ import annotations

import dataclasses
import hmac
import math
import time

from ..runtime.requests import PackageLimits, check_int, check_scale
from ..store.manifest import read_manifest
from ..store.publish import locate_package
from .errors import InvalidRequestError, NotReadyError, UnauthorizedError
from .generate import Params
from .metrics import Metrics
from .registry import AdapterRegistry
from .scheduler import Job, Scheduler
from .worker import Worker

PATCH = 16  # Flux: VAE factor 8 x 2x2 packing; height and width must be multiples of it


@dataclasses.dataclass
class ServeOptions:
    max_queue: int = 64
    max_wait_s: float = 30.0
    policy: str = "affinity"
    request_timeout_s: float = 600.0
    prefetch: bool = True
    token: str | None = None
    cache_budget_bytes: int | None = None
    warm_up: bool = True
    merge_policy: str = "auto"  # load_package's: when a LoRA set in slots is merged unasked
    merge_share: float = 1.0  # load_package's: how much of a set a merge folds (runtime/merge_share.py)


def parse_size(size: str) -> tuple[int, int]:
    """OpenAI's "WxH" -> (height, width)."""
    try:
        width, height = (int(x) for x in str(size).lower().split("x"))
    except ValueError:
        raise InvalidRequestError(f"size {size!r} is not WIDTHxHEIGHT", 'e.g. "size": "1024x1024"') from None
    return height, width


class Service:
    def __init__(self, package, model: str = "tiny", *, revision: str | None = None,
                 registry: AdapterRegistry | None = None, options: ServeOptions | None = None, loader=None):
        from ..runtime.pipeline import load_package

        self.options = options or ServeOptions()
        self.package_dir = locate_package(package)
        self.manifest = read_manifest(self.package_dir)
        self.limits = PackageLimits.from_manifest(self.manifest)
        self.registry = registry or AdapterRegistry()
        self.scheduler = Scheduler(max_queue=self.options.max_queue, max_batch=self.max_batch,
                                   max_wait_s=self.options.max_wait_s, policy=self.options.policy)
        self.metrics = Metrics()
        load = loader or (lambda: load_package(self.package_dir, model, revision=revision,
                                               cache_budget_bytes=self.options.cache_budget_bytes,
                                               merge_policy=self.options.merge_policy,
                                               merge_share=self.options.merge_share))
        self.worker = Worker(load, self.registry, self.scheduler, self.metrics, prefetch=self.options.prefetch,
                             warm_params=self.warm_params() if self.options.warm_up else None)
        self.metrics.bind(self.scheduler, self.worker)

    @property
    def max_batch(self) -> int:
        return int(self.manifest.shapes["batch"][1])

    def warm_params(self) -> Params:
        side = PATCH * math.ceil(math.sqrt(self.manifest.shapes["image_tokens"][0]))
        return Params(height=side, width=side, steps=1, guidance=3.5,
                      max_sequence_length=int(self.manifest.shapes["text_tokens"][0]))

    def start(self) -> "Service":
        self.worker.start()
        return self

    def stop(self) -> None:
        self.worker.stop()

    # -- state
    def check_ready(self) -> None:
        if self.worker.load_error is not None:
            raise NotReadyError(f"the package failed to load: {self.worker.load_error}",
                                "see the server log; fix the package or model and restart")
        if not self.worker.ready.is_set():
            raise NotReadyError("the package is still loading", "retry when GET /readyz answers 200")

    def check_token(self, authorization: str | None) -> None:
        token = self.options.token
        if not token:
            raise UnauthorizedError("registering adapters is disabled: the server was started without a token",
                                    "start it with --token T (or AOTPACK_TOKEN) and send 'Authorization: Bearer T'")
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise UnauthorizedError("missing or wrong token", "send 'Authorization: Bearer <the server's token>'")

    # -- requests
    def params(self, fields: dict) -> Params:
        """The sampling parameters, checked by the same validator as `aotpack run` (so a size that is not a
        multiple of 16 is rounded down as FluxPipeline does; out-of-range values are refused with 422)."""
        from ..runtime.jobs import Request
        from ..runtime.requests import validate_request

        height, width = parse_size(fields.get("size", "1024x1024"))
        request = validate_request(Request(
            prompt=fields.get("prompt"), seed=fields.get("seed", 0), steps=fields.get("steps", 28), height=height,
            width=width, guidance=fields.get("guidance", 3.5),
            max_sequence_length=fields.get("max_sequence_length", 512)), self.limits)
        return Params(request.height, request.width, request.steps, request.guidance, request.max_sequence_length)

    def adapter_set(self, loras) -> tuple:
        entries = []
        for entry in loras or []:
            name = entry["name"]
            scale = check_scale(entry.get("scale", 1.0), name=name)
            self.registry.get(name)  # 404 for an unknown name, 422 for a path or URL
            entries.append((name, scale))
        return tuple(entries)

    def submit(self, fields: dict) -> Job:
        """Validate `fields` (the request body) and queue it; raises typed errors (404/422/429/503)."""
        arrived = time.perf_counter()
        if self.worker.load_error is not None:
            self.check_ready()
        params = self.params(fields)
        adapter_set = self.adapter_set(fields.get("loras"))
        n = check_int(fields.get("n", 1), "n", 1, self.max_batch)
        seed = check_int(fields.get("seed", 0), "seed", 0, 2**63 - 1 - n)
        items = [(fields["prompt"], seed + i) for i in range(n)]  # image i: `aotpack run --seed seed+i`
        job = Job(adapter_set=adapter_set, key=(adapter_set, params), items=n,
                  payload={"items": items, "params": params, "arrived": arrived},
                  timeout_s=self.options.request_timeout_s)
        return self.scheduler.submit(job)

    # -- adapters
    def register(self, name: str, source: str) -> dict:
        """Register an adapter from an allowed source after parsing and checking it against the package
        (422 when it cannot go into the slots); it is then in the adapter cache, ready to switch to."""
        from ..adapters.stack import check_adapter
        from .errors import AdapterNotAllowedError

        if name in self.registry:
            raise AdapterNotAllowedError(f"adapter {name!r} is already registered",
                                         "pick another name (registered adapters are not replaced)")
        entry = self.registry.resolve(name, source)
        with self.worker.cache_lock:
            adapter = self.worker.cache.get(entry.source)
        check_adapter(adapter, self.manifest.slot_table(), self.manifest.max_rank)
        self.registry.put(entry)
        return self.describe(entry)

    def describe(self, entry) -> dict:
        from .registry import header_rank

        cache = self.worker.cache
        cached = cache is not None and entry.source in cache
        return {"name": entry.name, "source": entry.describe(), "rank": header_rank(entry.source),
                "bytes": entry.file_bytes(), "cached": cached}

    def describe_adapters(self) -> list[dict]:
        return [self.describe(entry) for entry in self.registry.entries()]
