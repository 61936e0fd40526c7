"""Timing helpers: CUDA events after warm-up, median of repeats (host clock on the CPU)."""

from __future__ import annotations

import statistics
import time

import torch


def bench_device() -> tuple[str, torch.dtype]:
    """Where benchmarks run, and the dtype of the eager contenders there (bf16 on a GPU, fp32 on the CPU)."""
    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, *, warmup: int = 2, repeats: int = 10) -> dict:
    """Median/min/max milliseconds of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    cuda = torch.device(device).type == "cuda"
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - started) * 1000)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples),
            "repeats": repeats}


class Stopwatch:
    """Wall-clock seconds of a block, synchronizing the device at both ends."""

    def __init__(self, device="cpu"):
        self.device = device
        self.seconds = 0.0

    def __enter__(self):
        synchronize(self.device)
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._started
        return False


def peak_memory_gb(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def graph_replay_ms(fn, device, *, warmup: int = 3, repeats: int = 10) -> dict:
    """`time_ms` of one CUDA-graph replay of `fn` (captured after warm-up on a side stream).

    `fn` must keep its inputs at stable addresses; what it writes lands in the graph's private pool.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay, device, warmup=2, repeats=repeats)


def top_kernels(fn, device, *, steps: int = 2, limit: int = 15) -> list[dict]:
    """The GPU kernels that took the most device time over `steps` calls of `fn` (per call)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        synchronize(device)
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if device_us:
            rows.append({"kernel": event.key[:120], "ms_per_call": device_us / 1000 / steps,
                         "launches_per_call": event.count / steps})
    rows.sort(key=lambda r: -r["ms_per_call"])
    total = sum(r["ms_per_call"] for r in rows)
    return [{**r, "share": r["ms_per_call"] / total} for r in rows[:limit]]
