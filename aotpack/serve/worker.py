"""The single model worker (the compiled model runs one batch at a time) and its adapter prefetcher.

While a batch runs, the prefetcher asks the scheduler which adapter set comes next and parses those
adapters into the adapter cache on the device (on a side CUDA stream), so the switch at the batch
boundary is only copies into the slots. A failing batch fails its requests, never the worker.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import torch

from .generate import Params, generate

log = logging.getLogger("aotpack.serve")


class Worker:
    def __init__(self, load, registry, scheduler, metrics, *, prefetch: bool = True, warm_params: Params | None = None):
        self._load, self.registry, self.scheduler, self.metrics = load, registry, scheduler, metrics
        self.prefetch_enabled, self.warm_params = prefetch, warm_params
        self.served = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.active_set: tuple = ()
        self.running_set: tuple | None = None  # adapter set of the batch on the model now
        self.cache_lock = threading.Lock()  # AdapterCache is not thread-safe
        self._prefetched: set = set()  # cache keys staged by the prefetcher, not yet used by a switch
        self._stop = threading.Event()
        self._kick = threading.Event()
        self.stats = {"batches": 0, "images": 0, "switches": 0, "prefetch_hits": 0, "prefetch_misses": 0,
                      "prefetched": 0, "failed_batches": 0}
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
        """Stop after the batch on the model; True when both threads ended within `timeout` each."""
        self._stop.set()
        self._kick.set()
        self.scheduler.wake()
        for thread in self._threads:
            thread.join(timeout)
        return not any(thread.is_alive() for thread in self._threads)

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
        self.running_set = adapter_set
        self._kick.set()
        try:
            switch = self._switch(adapter_set)
            switched = time.perf_counter()
            payloads = [job.payload for job in batch]
            items = [item for p in payloads for item in p["items"]]
            out = generate(self.served, payloads[0]["params"], items)
        except BaseException as err:  # the requests fail, the worker goes on
            self.stats["failed_batches"] += 1
            if not isinstance(err, Exception):
                raise
            for job in batch:
                job.future.set_exception(err)
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
            job.future.set_result({"images": out.images[position:position + count], "timings": timings,
                                   "adapters": [{"name": n, "scale": s} for n, s in adapter_set]})
            position += count

    def _switch(self, adapter_set: tuple) -> dict:
        """Make `adapter_set` active. Returns what the switch did: its time inside `set_loras` (None when the
        set was active already), adapters parsed at the switch (prefetch misses) and staged ahead (hits)."""
        info = {"switch_copy_ms": None, "parsed_at_switch": 0, "prefetched": 0}
        if adapter_set == self.active_set:
            return info
        sources = [(self.registry.get(name).source, scale) for name, scale in adapter_set]
        with self.cache_lock:
            for source, _ in sources:
                key = source.cache_key()
                if source not in self.served.cache:
                    info["parsed_at_switch"] += 1
                elif key in self._prefetched:
                    self._prefetched.discard(key)
                    info["prefetched"] += 1
            result = self.served.set_loras(sources)
        self.active_set = adapter_set
        self.stats["switches"] += 1
        self.stats["prefetch_hits"] += info["prefetched"]
        self.stats["prefetch_misses"] += info["parsed_at_switch"]
        self.metrics.prefetch.labels("hit").inc(info["prefetched"])
        self.metrics.prefetch.labels("miss").inc(info["parsed_at_switch"])
        self.metrics.switches.inc()
        self.metrics.switch_ms.observe(result.seconds * 1000)
        info["switch_copy_ms"] = result.seconds * 1000
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
            upcoming = self.scheduler.peek_adapter_set(running)
            if not upcoming or upcoming == running:
                continue
            for name, _ in upcoming:
                try:
                    self.stage(self.registry.get(name).source, stream)
                except Exception:  # a bad adapter fails its own request at the switch, with the error
                    log.debug("prefetch of %s failed", name, exc_info=True)

    def stage(self, source, stream=None) -> None:
        with self.cache_lock:
            if source in self.served.cache:
                return
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                self.served.cache.get(source)
            if stream is not None:
                stream.synchronize()  # the factors are on the device before a switch copies them
            self._prefetched.add(source.cache_key())
            self.stats["prefetched"] += 1
