"""CUDA graphs of the step chain (runtime/cuda_graphs.py): where they apply, and the fallback when a
capture fails. Capture and replay themselves need a GPU: the speed bench checks them there, bit for bit
against the plain chain (benchmarks/results/2026-12-01b-h200-cuda-graphs)."""

from __future__ import annotations

import pytest

from aotpack.errors import UnsupportedCallError


def test_graphs_stay_off_on_the_cpu_by_default_and_are_refused_when_asked(tiny_package):
    import aotpack

    served = aotpack.load(tiny_package, model="tiny")
    assert not served.transformer.cuda_graphs_apply and not served.transformer.cuda_graphs
    with pytest.raises(UnsupportedCallError, match="CUDA graphs need a CUDA device"):
        served.transformer.use_cuda_graphs(True)
    served.transformer.use_cuda_graphs(False)  # turning them off is always fine


def test_a_failed_cuda_graph_capture_falls_back_to_the_plain_chain_once(caplog):
    """CUDA graphs are on by default on a GPU: a capture that fails (a driver, a custom op) must cost the
    request nothing. The step runs the plain chain, a warning says why and how to turn graphs off, and no
    later step tries to capture again. (The capture itself needs a GPU: benchmarks check it there.)"""
    import logging

    import torch

    from aotpack.runtime.cuda_graphs import StepGraphs

    graphs = StepGraphs(torch.device("cpu"))
    attempts, calls = [], []

    def failing_capture(inputs, body):
        attempts.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs._capture = failing_capture

    def body(inputs):
        calls.append(1)
        return inputs[0] * 2

    x = torch.arange(4.0)
    with caplog.at_level(logging.WARNING, logger="aotpack.runtime.cuda_graphs"):
        first = graphs.run(graphs.key("slots", [x]), [x], body)
        second = graphs.run(graphs.key("slots", [x + 1]), [x + 1], body)
    assert torch.equal(first, x * 2) and torch.equal(second, (x + 1) * 2)
    assert len(attempts) == 1 and len(calls) == 2 and len(graphs) == 0
    assert "operation not permitted" in graphs.failed
    assert "CUDA graph capture failed" in caplog.text and "--no-cuda-graphs" in caplog.text


def test_ranks_that_do_not_all_capture_all_run_the_plain_chain(caplog):
    """Context-parallel ranks capture their collectives with the programs: if one rank's capture fails,
    the others must not replay graphs (their collectives would wait for a rank that runs the plain
    chain). `agree` (an all-reduce across ranks on GPUs) says whether every rank captured."""
    import logging

    import torch

    from aotpack.runtime.cuda_graphs import StepGraphs, _Captured

    graphs = StepGraphs(torch.device("cpu"))
    graphs._capture = lambda inputs, body: _Captured(None, inputs, body(inputs))  # this rank captured
    votes, calls = [], []

    def agree(captured_here):  # another rank failed
        votes.append(captured_here)
        return False

    def body(inputs):
        calls.append(1)
        return inputs[0] + 1

    x = torch.arange(3.0)
    with caplog.at_level(logging.WARNING, logger="aotpack.runtime.cuda_graphs"):
        out = graphs.run(graphs.key("slots", [x]), [x], body, agree=agree)
        again = graphs.run(graphs.key("slots", [x]), [x], body, agree=agree)
    assert torch.equal(out, x + 1) and torch.equal(again, x + 1)
    assert votes == [True]  # asked once; from then on no rank captures again
    assert len(graphs) == 0 and graphs.failed == "another rank's capture failed"
    assert len(calls) == 3  # the capture's body, then the plain chain twice


def test_every_capture_warms_up_on_one_side_stream_per_device(monkeypatch):
    """cuBLAS keeps a workspace per (handle, stream) for the process (32 MiB on Hopper): a fresh pool stream per
    capture left one more behind for each load or new shape (scripts/gpu/probe_capture_streams.py)."""
    import torch

    from aotpack.runtime import cuda_graphs

    made = []
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: made.append(device) or object())
    monkeypatch.setattr(cuda_graphs, "_WARMUP_STREAMS", {})
    first, second = torch.device("cuda", 0), torch.device("cuda", 1)
    assert cuda_graphs.warmup_stream(first) is cuda_graphs.warmup_stream(first)  # two packages, many shapes: one
    assert cuda_graphs.warmup_stream(second) is not cuda_graphs.warmup_stream(first)
    assert made == [first, second]
