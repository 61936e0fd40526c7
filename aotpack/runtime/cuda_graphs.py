"""CUDA graphs of one transformer step: the whole chain of program calls replayed as one launch.

Why capture used to fail (`cudaErrorStreamCaptureInvalidated`): AOTInductor's model container
records a CUDA event after every run and, on the next run, queries or waits on it to find a free
model. An event query or wait inside a capture invalidates the capture. Runners opened
single-threaded (`program.py`) skip that bookkeeping, so the chain captures.

What stays valid across replays, and why:
- LoRA switches copy into the slot bank in place, so the addresses do not change (`slot_bank.py`).
- Merges write into the bound weight storage in place (`merge.py`).
- The slotted and no-slot programs are different chains, so each has its own graph.

A graph is captured per (variant, input shapes, dtypes). The first call of a new shape pays one
eager warm-up and one capture.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable

import torch

logger = logging.getLogger(__name__)


_WARMUP_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream every capture on `device` warms up on, one per process. cuBLAS keeps a workspace per
    (handle, stream) until the process ends (32 MiB on Hopper), so a fresh pool stream per capture left one more
    behind each time, up to one per pool stream (32: 1 GiB) in a server that loads packages or captures new shapes:
    on 2026-12-06 (H100) a plain pass left 33 MiB after `close()`, a graph pass 66 more, the next graph pass 33 more
    (`benchmarks/results/2026-12-06h-h100-close-release/`). With one stream, six captures left three workspaces and
    a second load none; a fresh stream per capture left eight
    (`benchmarks/results/2026-12-07c-h100-capture-streams/`)."""
    if device.index is None:  # "cuda" and "cuda:0" are one device: one stream
        device = torch.device(device.type, torch.cuda.current_device())
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream(device)
    return _WARMUP_STREAMS[device]


class _Captured:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[torch.Tensor], output: torch.Tensor):
        self.graph, self.inputs, self.output = graph, inputs, output


class StepGraphs:
    """Captured step graphs, least recently used dropped beyond `max_graphs` (each holds its activations)."""

    def __init__(self, device: torch.device, max_graphs: int = 8):
        self.device = device
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._pool = None  # one memory pool for all graphs: they never replay concurrently
        self.captures = 0  # how many graphs were captured (benchmarks report it)
        self.failed: str | None = None  # why a capture failed: from then on every step runs the plain chain

    @staticmethod
    def key(variant: str, inputs: list[torch.Tensor]) -> tuple:
        return (variant, *((tuple(t.shape), t.dtype) for t in inputs))

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, key: tuple, inputs: list[torch.Tensor], body: Callable[[list[torch.Tensor]], torch.Tensor],
            agree: Callable[[bool], bool] | None = None):
        """`body(inputs)` replayed from a graph captured for `key` (captured on first use).

        `agree(captured_here)` (context-parallel ranks) returns whether every rank captured: the ranks'
        collectives must stay matched, so one rank's failed capture sends every rank to the plain chain.
        Returns a fresh tensor: the graph's own output is overwritten by the next replay, and a
        pipeline with true CFG calls the transformer twice before it reads either output."""
        if self.failed:
            return body(inputs)
        captured = self._graphs.get(key)
        if captured is None:
            failure = None
            try:
                captured = self._capture(inputs, body)
            except Exception as err:  # noqa: BLE001 -- a speed-up that cannot apply must not fail the request
                failure = f"{type(err).__name__}: {err}"[:300]
            if agree is not None and not agree(failure is None):
                failure = failure or "another rank's capture failed"
            if failure:
                self.failed = failure
                logger.warning("CUDA graph capture failed (%s); steps run without graphs from now on "
                               "(turn them off with --no-cuda-graphs / cuda_graphs=False)", self.failed)
                self._graphs.clear()
                return body(inputs)
            self._graphs[key] = captured
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        for static, value in zip(captured.inputs, inputs):
            static.copy_(value)
        captured.graph.replay()
        return captured.output.clone()

    def _capture(self, inputs, body) -> _Captured:
        static = [t.clone() for t in inputs]
        # Warm up on a side stream (torch's recipe): lazy kernel loading, cuDNN plans and allocator
        # growth happen here, not inside the capture.
        side = warmup_stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            body(static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (an adapter prefetcher) must not void this capture
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            output = body(static)
        self.captures += 1
        return _Captured(graph, static, output)
