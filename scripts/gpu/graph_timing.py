"""Kernel timing for the GPU probes (imported from this folder): launches captured in a CUDA graph and replayed,
so an eager `wrap_triton` launch's host time (more than a small kernel takes) stays out of the figure."""

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
