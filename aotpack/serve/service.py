"""A serving process: registry + scheduler + worker + metrics around one package, and request validation.

`Service.submit(fields)` turns a generation request (the HTTP body as a dict) into a queued `Job`
whose future resolves to {"images", "timings", "adapters"}; HTTP and Ray are thin shells over it.
"""

from __future__ import annotations

import dataclasses
import hmac
import math
import re
import threading
import time

from ..errors import AotpackError
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


SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")  # plain digits: int() would also take "6_4" or " 64"


def parse_size(size: str) -> tuple[int, int]:
    """OpenAI's "WxH" -> (height, width)."""
    match = SIZE.match(size.lower()) if isinstance(size, str) else None
    if match is None:
        raise InvalidRequestError(f"size {size!r} is not WIDTHxHEIGHT", 'e.g. "size": "1024x1024"')
    return int(match[2]), int(match[1])


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
                             warm_params=self.warm_params() if self.options.warm_up else None,
                             close_on_stop=loader is None)  # a given loader's pipeline may be shared: not ours
        self.metrics.bind(self.scheduler, self.worker)
        self._registering = threading.Lock()  # a name's check and its insert are one step

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
        err = self.worker.load_error
        if err is not None:
            reason = err.problem if isinstance(err, AotpackError) else f"{type(err).__name__}: {err}"
            raise NotReadyError(f"the package failed to load: {reason}",
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
    def params(self, fields: dict) -> tuple[Params, list[str]]:
        """The sampling parameters and the validator's notes, checked by the same validator as `aotpack run`
        (so a size that is not a multiple of 16 is rounded down as FluxPipeline does, and noted; out-of-range
        values are refused with 422)."""
        from ..runtime.jobs import Request
        from ..runtime.requests import validate_request

        height, width = parse_size(fields.get("size", "1024x1024"))
        request = validate_request(Request(
            prompt=fields.get("prompt"), seed=fields.get("seed", 0), steps=fields.get("steps", 28), height=height,
            width=width, guidance=fields.get("guidance", 3.5),
            max_sequence_length=fields.get("max_sequence_length", 512)), self.limits)
        params = Params(request.height, request.width, request.steps, request.guidance, request.max_sequence_length)
        return params, list(request.notes)

    def adapter_set(self, loras) -> tuple:
        entries = []
        for entry in loras or []:
            name = entry["name"]
            scale = check_scale(entry.get("scale", 1.0), name=name)
            self.registry.get(name)  # 404 for an unknown name, 422 for a path or URL
            entries.append((name, scale))
        return tuple(entries)

    def submit(self, fields: dict) -> Job:
        """Validate `fields` (the request body) and queue it; raises typed errors (404/422/429/503). The job's
        payload carries the validator's notes (e.g. a size rounded to multiples of 16) for the answer."""
        arrived = time.perf_counter()
        self.check_ready()  # 503 while loading (docs/serving.md), never a request queued behind a load that fails
        params, notes = self.params(fields)
        adapter_set = self.adapter_set(fields.get("loras"))
        n = check_int(fields.get("n", 1), "n", 1, self.max_batch)
        if fields.get("response_format") == "png" and n > 1:
            raise InvalidRequestError(f'response_format "png" with n = {n}: a PNG answer holds one image',
                                      'ask for "response_format": "b64_json" (the default) or n = 1')
        seed = check_int(fields.get("seed", 0), "seed", 0, 2**63 - n)  # the last image's seed, seed + n - 1 < 2**63
        items = [(fields["prompt"], seed + i) for i in range(n)]  # image i: `aotpack run --seed seed+i`
        job = Job(adapter_set=adapter_set, key=(adapter_set, params), items=n,
                  payload={"items": items, "params": params, "arrived": arrived, "notes": notes},
                  timeout_s=self.options.request_timeout_s)
        return self.scheduler.submit(job)

    # -- adapters
    def register(self, name: str, source: str) -> dict:
        """Register an adapter from an allowed source after parsing and checking it against the package
        (422 when it cannot go into the slots); it is then in the adapter cache, ready to switch to."""
        from ..adapters.stack import check_adapter
        from .errors import AdapterNotAllowedError

        with self._registering:  # two registrations of one name: the second is refused, never a replacement
            if name in self.registry:
                raise AdapterNotAllowedError(f"adapter {name!r} is already registered",
                                             "pick another name (registered adapters are not replaced)")
            entry = self.registry.resolve(name, source)
            adapter = self.worker.parsed(entry.source)  # parsed outside the cache lock: switches never wait
            check_adapter(adapter, self.manifest.slot_table(), self.manifest.max_rank)
            self.registry.put(entry)
        return self.describe(entry)

    def describe(self, entry, *, wait: bool = True) -> dict:
        """`entry` as the adapter endpoints answer it; `wait=False` (the listing, on the event loop): a sha256 still
        being hashed after a parse is null rather than waited for."""
        from .registry import header_rank

        cache = self.worker.cache
        cached = cache is not None and entry.source in cache
        # {} until the file is parsed here: a listing reads no file
        parsed = self.worker.provenance(entry.source, wait=wait)
        return {"name": entry.name, "source": entry.describe(), "rank": header_rank(entry.source),
                "bytes": entry.file_bytes(), "cached": cached, "sha256": parsed.get("sha256"),
                "revision": entry.source.revision, "commit_hash": parsed.get("commit_hash")}

    def describe_adapters(self) -> list[dict]:
        """Every registered adapter; one that cannot be described (its file changed since) says why, and the
        listing still answers."""
        described = []
        for entry in self.registry.entries():
            try:
                described.append(self.describe(entry, wait=False))
            except AotpackError as err:
                described.append({"name": entry.name, "source": entry.describe(),
                                  "error": self.registry.redact(err.problem)})
        return described
