"""What the kernel probes share (imported from this folder): timing from a CUDA graph, so an eager `wrap_triton`
launch's host time (more than a small kernel takes) stays out of the figure, and bitwise comparison of outputs."""

import torch


def graph_ms(fn, launches=20, replays=20):
    """ms per call of `fn`, launched `launches` times inside one CUDA graph, the graph replayed `replays` times."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays / launches


def equal_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    """The share of elements of `a` and `b` that are equal (FP8 compared by its bits)."""
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return float((a == b).float().mean())
