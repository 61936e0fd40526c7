"""The single model worker (the compiled model runs one batch at a time) and its adapter prefetcher.

Once a batch's switch is done, the prefetcher asks the scheduler which adapter set comes next and
stages those adapters while the batch runs: it reads each file into pinned host memory, sends it to
the device in one copy and parses it there on a side CUDA stream, all outside the cache lock, then
inserts the result. The switch at the next batch boundary is then only device copies into the slots.

The prefetcher never starts work while a switch runs. On the H200 (2026-11-30) a prefetcher parsing a
687 MB file concurrently with a switch made the switch 580 ms instead of ~15 ms, and a prefetcher
parsing on the CPU beside the busy model thread took up to 9.6 s per file (so it missed its batch).
A failing batch fails its requests, never the worker.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from concurrent.futures import Future

import torch

from ..adapters.parse import parse_adapter, resolved
from ..runtime.jobs import adapter_records
from .generate import Params, generate

log = logging.getLogger("aotpack.serve")
PROVENANCE = ("sha256", "revision", "commit_hash")  # what identifies an adapter's bytes (Adapter.provenance())
PREFETCH_DEPTH = 2  # batches ahead whose adapters are staged (each rank-64 FLUX.1-dev file: 687 MB of cache)


class Worker:
    def __init__(self, load, registry, scheduler, metrics, *, prefetch: bool = True, warm_params: Params | None = None,
                 close_on_stop: bool = False):
        self._load, self.registry, self.scheduler, self.metrics = load, registry, scheduler, metrics
        self.close_on_stop = close_on_stop  # the pipeline `load` makes is this worker's own (no caller shares it)
        self.prefetch_enabled, self.warm_params = prefetch, warm_params
        self.served = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.active_set: tuple = ()
        self.running_set: tuple | None = None  # adapter set of the batch on the model now
        self.cache_lock = threading.Lock()  # check-then-insert as one step (the cache locks each call itself)
        self._no_switch = threading.Event()  # clear while a switch runs: the prefetcher waits
        self._no_switch.set()
        self._prefetched: set = set()  # cache keys staged by the prefetcher, not yet used by a switch
        self._failed: set = set()  # cache keys whose staging failed (the switch reports the error)
        self._provenance: dict = {}  # AdapterSource -> (its cache key when parsed here, Adapter.provenance())
        self._stop = threading.Event()
        self._kick = threading.Event()
        self.stats = {"batches": 0, "images": 0, "switches": 0, "prefetch_hits": 0, "prefetch_misses": 0,
                      "prefetched": 0, "prefetch_failed": 0, "failed_batches": 0}
        self.stage_log: collections.deque = collections.deque(maxlen=256)  # recent stagings, for benchmarks
        self._threads: list[threading.Thread] = []

    @property
    def cache(self):
        return self.served.cache if self.served is not None else None

    def gpu_memory_bytes(self) -> float:
        device = self.served.device if self.served is not None else None
        return float(torch.cuda.memory_allocated(device)) if device is not None and device.type == "cuda" else 0.0

    # -- lifecycle
    def start(self) -> None:
        self._threads = [threading.Thread(target=self._run, name="aotpack-worker", daemon=True)]
        if self.prefetch_enabled:
            self._threads.append(threading.Thread(target=self._prefetch_loop, name="aotpack-prefetch", daemon=True))
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop after the batch on the model; True when both threads ended within `timeout` each. With
        `close_on_stop` the package's weights are then freed (`AotpackPipeline.close`): a process that starts
        another service would otherwise keep them, as torch's AOTInductor holds them past the pipeline (docs/gpu.md,
        known issue 7). A thread still running after `timeout` is logged, and keeps the weights loaded under it."""
        self._stop.set()
        self._kick.set()
        self.scheduler.wake()
        for thread in self._threads:
            thread.join(timeout)
        running = [thread.name for thread in self._threads if thread.is_alive()]
        closing = self.close_on_stop and self.served is not None
        if running:  # a running thread would step freed weights: nothing is closed under it
            log.warning("%s still running %.0f s after stop%s", ", ".join(running), timeout,
                        ": the package stays loaded (its weights are not freed); the process should exit rather than "
                        "load another package" if closing else "")
        elif closing:
            self.served.close()
        return not running

    def _run(self) -> None:
        try:
            self.served = self._load()
            self.served.pipeline.set_progress_bar_config(disable=True)
            if self.warm_params is not None:  # the first request should not pay one-time kernel loading
                generate(self.served, self.warm_params, [("warm-up", 0)])
        except BaseException as err:  # reported by /readyz and every request
            log.exception("loading the package failed")
            self.load_error = err
            return
        finally:
            self.ready.set()
        while not self._stop.is_set():
            batch = self.scheduler.next_batch(self.active_set, timeout=0.5)
            if batch:
                self._run_batch(batch)

    # -- one batch
    def _run_batch(self, batch) -> None:
        started = time.perf_counter()
        adapter_set = batch[0].adapter_set
        try:
            switch = self._switch(adapter_set)
            switched = time.perf_counter()
            live = self.served.live_adapters()  # the provenance is read after the images (the sha256 hashes)
            self.running_set = adapter_set  # set after the switch: the prefetcher stays idle during it
            self._kick.set()  # stage the next set while this batch runs
            payloads = [job.payload for job in batch]
            items = [item for p in payloads for item in p["items"]]
            out = generate(self.served, payloads[0]["params"], items)
            adapters = self._answer_adapters(adapter_set, live)
        except BaseException as err:  # the requests fail, the worker goes on
            self.stats["failed_batches"] += 1
            if not isinstance(err, Exception):
                raise
            if len(batch) > 1:  # one request's fault must not fail the others batched with it: each alone
                log.warning("a batch of %d requests failed (%s: %s); running each alone", len(batch),
                            type(err).__name__, err)
                for job in batch:
                    self._run_batch([job])
                return
            batch[0].future.set_exception(err)
            return
        finally:
            self.running_set = None
            self.scheduler.record_batch_seconds(time.perf_counter() - started)
        self.stats["batches"] += 1
        self.stats["images"] += len(items)
        steps = payloads[0]["params"].steps
        self.metrics.step_ms.observe(out.steps_seconds * 1000 / steps)
        self.metrics.batch_size.observe(len(items))
        position = 0
        for job in batch:
            count = len(job.payload["items"])
            timings = {"queue": started - job.payload["arrived"], "switch": switched - started,
                       "steps": out.steps_seconds, "decode": out.decode_seconds, "batch_images": len(items),
                       "batch": self.stats["batches"], **switch}
            params = job.payload["params"]
            job.future.set_result({"images": out.images[position:position + count], "timings": timings,
                                   "adapters": adapters,
                                   "size": f"{params.width}x{params.height}",
                                   "notes": list(job.payload.get("notes", ()))})
            position += count

    def _switch(self, adapter_set: tuple) -> dict:
        """Make `adapter_set` active. Returns what the switch did: its time inside `set_loras` (None when the
        set was active already), adapters parsed at the switch (prefetch misses) and staged ahead (hits)."""
        info = {"switch_copy_ms": None, "parsed_at_switch": 0, "prefetched": 0, "lock_wait_ms": 0.0}
        if adapter_set == self.active_set and self.served.live_set_known:  # else someone else changed what runs
            return info
        sources = [(self.registry.get(name).source, scale) for name, scale in adapter_set]
        self._no_switch.clear()
        try:
            waited = time.perf_counter()
            with self.cache_lock:
                info["lock_wait_ms"] = (time.perf_counter() - waited) * 1000
                keys = [source.cache_key() for source, _ in sources]  # before any parse, as the cache takes them
                for (source, _), key in zip(sources, keys):
                    if source not in self.served.cache:
                        info["parsed_at_switch"] += 1
                    elif key in self._prefetched:
                        self._prefetched.discard(key)
                        info["prefetched"] += 1
                result = self.served.set_loras(sources)
                for (source, _), key, (adapter, _) in zip(sources, keys, self.served.live_adapters()):
                    self._record(source, key, adapter)
        finally:
            self._no_switch.set()
        self.active_set = adapter_set
        self.stats["switches"] += 1
        self.stats["prefetch_hits"] += info["prefetched"]
        self.stats["prefetch_misses"] += info["parsed_at_switch"]
        self.metrics.prefetch.labels("hit").inc(info["prefetched"])
        self.metrics.prefetch.labels("miss").inc(info["parsed_at_switch"])
        self.metrics.switches.inc()
        self.metrics.switch_ms.observe(result.seconds * 1000)
        info["switch_copy_ms"] = result.seconds * 1000
        info["switch_phases_ms"] = result.phases_ms
        return info

    # -- prefetch
    def _prefetch_loop(self) -> None:
        self.ready.wait()
        if self.served is None:
            return
        device = self.served.device
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        while not self._stop.is_set():
            self._kick.wait(0.05)
            self._kick.clear()
            running = self.running_set
            if running is None:
                continue
            # the next PREFETCH_DEPTH sets: a 687 MB file takes seconds to stage beside the busy model,
            # longer than a one-image batch, so staging only the very next set often came too late
            wanted = [name for upcoming in self.scheduler.peek_adapter_sets(running, PREFETCH_DEPTH)
                      if upcoming != running for name, _ in upcoming]
            for name in dict.fromkeys(wanted):
                source = self.registry.get(name).source
                if source.cache_key() in self._failed:
                    continue
                began = time.perf_counter()
                try:
                    if not self.stage(source, stream):
                        continue  # in the cache already
                    outcome = "staged"
                except Exception as err:  # a bad adapter fails its own request at the switch, with the error
                    self._failed.add(source.cache_key())  # not retried every 50 ms
                    self.stats["prefetch_failed"] += 1
                    outcome = f"failed: {type(err).__name__}: {err}"
                    log.warning("prefetch of adapter %s failed (%s); a switch to it parses it then", name, outcome,
                                exc_info=log.isEnabledFor(logging.DEBUG))
                self.stage_log.append({"adapter": name, "outcome": outcome,
                                       "ms": (time.perf_counter() - began) * 1000, "at": began})

    def stage(self, source, stream=None) -> bool:
        """Put `source`'s parsed adapter in the cache unless it is there; True when this call staged it.

        The file is read, sent to the device and parsed there without the cache lock (a switch never
        waits for a file) and never while a switch runs; on CUDA the read goes to pinned memory and the
        copy and the parse's kernels to the side `stream`, so they overlap the batch on the model.
        """
        cache = self.served.cache
        with self.cache_lock:
            if source in cache:
                return False
        key = cache.key_of(source)  # before the parse: a file rewritten meanwhile must not be cached under its new key
        adapter = self._parse_unlocked(source, stream)
        with self.cache_lock:
            if source in cache:
                return False
            cache.add(source, adapter, key=key)
            self._prefetched.add(key)
        self._record(source, key, adapter)
        self.stats["prefetched"] += 1
        return True

    def parsed(self, source):
        """`source`'s parsed adapter: from the cache, or parsed now as `stage` does (outside the cache lock, never
        while a switch runs) and inserted. For registrations, which must not stall switches on a large file."""
        cache = self.served.cache
        with self.cache_lock:
            if source in cache:
                return cache.get(source)
        key = cache.key_of(source)  # before the parse, as in `stage`
        adapter = self._parse_unlocked(source, None)
        self._record(source, key, adapter)
        with self.cache_lock:
            return cache.add(source, adapter, key=key)

    # -- provenance
    def _record(self, source, key: tuple, adapter) -> None:
        # not waiting for the file's background sha256 (most of a file switch's time if waited for here)
        provenance = adapter.provenance(wait=False)
        self._provenance[source] = (key, {k: provenance.get(k) for k in PROVENANCE})

    def provenance(self, source, *, wait: bool = True) -> dict:
        """`Adapter.provenance()` of `source`'s file as last parsed here ({} before its first parse, or once the
        file changed since: a rewritten local file has another cache key). `wait=False`: a sha256 still being
        hashed (~1 s a GB after the parse) is None instead of waited for."""
        key, provenance = self._provenance.get(source, (None, {}))
        if key != source.cache_key():
            return {}
        return {k: resolved(v) if wait or not isinstance(v, Future) or v.done() else None
                for k, v in provenance.items()}

    def _answer_adapters(self, adapter_set: tuple, live) -> list[dict]:
        """The answer's adapters: each registered name and scale, with the sha256, revision and commit_hash of the
        file parsed for it (`live`: `live_adapters()` at the switch)."""
        used = adapter_records(live)
        if len(used) != len(adapter_set):  # not the set asked for (never expected): names and scales only
            return [{"name": n, "scale": s} for n, s in adapter_set]
        return [{"name": n, "scale": s, **{k: u.get(k) for k in PROVENANCE}}
                for (n, s), u in zip(adapter_set, used)]

    def _parse_unlocked(self, source, stream):
        self._no_switch.wait()
        cache = self.served.cache
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            adapter = parse_adapter(source, device=cache.device, dtype=cache.dtype)
        if stream is not None:
            stream.synchronize()  # the factors are on the device before a switch can copy them
        return adapter
