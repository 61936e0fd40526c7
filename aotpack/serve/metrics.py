"""Prometheus metrics of one server (its own CollectorRegistry, so several servers can share a process)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

MS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class _WorkerCollector:
    """Read from the worker's model at scrape time: adapter-cache hits/misses, the merges the merge policy made,
    and how the active LoRA set runs (none / slots / merged)."""

    def __init__(self, worker):
        self.worker = worker

    def collect(self):
        cache = self.worker.cache
        for name, value in (("hits", cache.hits if cache else 0), ("misses", cache.misses if cache else 0)):
            family = CounterMetricFamily(f"aotpack_adapter_cache_{name}", f"adapter cache {name}")
            family.add_metric([], value)
            yield family
        served = self.worker.served
        modes = served.transformer.lora_modes if served is not None else None
        merges = CounterMetricFamily("aotpack_lora_merges", "LoRA sets the merge policy folded into the weights")
        merges.add_metric([], modes.auto.merges if modes is not None else 0)
        yield merges
        declined = CounterMetricFamily("aotpack_lora_merges_declined", "LoRA sets the merge policy left in slots "
                                       "because a merge into FP8 weights would weaken them")
        declined.add_metric([], modes.auto.declined if modes is not None else 0)
        yield declined
        mode = GaugeMetricFamily("aotpack_lora_mode", "how the active LoRA set runs (1 on the current mode)",
                                 labels=["mode"])
        for name in ("none", "slots", "merged"):
            mode.add_metric([name], float(modes is not None and modes.mode == name))
        yield mode


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_seconds = Histogram("aotpack_request_seconds", "request latency, arrival to answer",
                                         ["status"], buckets=SECONDS_BUCKETS, registry=r)
        self.queue_depth = Gauge("aotpack_queue_depth", "requests waiting for the model", registry=r)
        self.switches = Counter("aotpack_lora_switches", "adapter-set switches", registry=r)
        self.switch_ms = Histogram("aotpack_lora_switch_ms", "adapter-set switch time (ms)",
                                   buckets=MS_BUCKETS, registry=r)
        self.step_ms = Histogram("aotpack_step_ms", "denoising step time (ms, whole batch)",
                                 buckets=MS_BUCKETS, registry=r)
        self.batch_size = Histogram("aotpack_batch_images", "images per model batch",
                                    buckets=(1, 2, 3, 4, 6, 8, 16), registry=r)
        self.prefetch = Counter("aotpack_prefetch", "adapters needed at a switch: staged ahead (hit) or parsed "
                                "at the switch (miss)", ["result"], registry=r)
        self.cancelled = Counter("aotpack_cancelled", "queued requests withdrawn (client left or timed out)",
                                 ["reason"], registry=r)
        self.gpu_memory = Gauge("aotpack_gpu_memory_bytes", "GPU memory allocated by torch", registry=r)

    def bind(self, scheduler, worker) -> None:
        self.queue_depth.set_function(lambda: scheduler.depth)
        self.gpu_memory.set_function(worker.gpu_memory_bytes)
        self.registry.register(_WorkerCollector(worker))

    def render(self) -> bytes:
        return generate_latest(self.registry)
