"""What the kernel probes share (imported from this folder): timing from a CUDA graph, so an eager `wrap_triton`
launch's host time (more than a small kernel takes) stays out of the figure; bitwise comparison of outputs; launch-config
sweeps (PROBE_SWEEP) and shape filters (PROBE_SHAPES) read from the environment; a report written after each size."""

import itertools
import json
import os

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


def sweep_from_env(default: dict) -> dict:
    """A probe's launch-config sweep: `default` ({name: values}), or PROBE_SWEEP='{"block_m": [128, 256], ...}'."""
    given = json.loads(os.environ.get("PROBE_SWEEP") or "{}")
    return {key: tuple(values) for key, values in given.items()} or default


def shapes_from_env(shapes: dict) -> dict:
    """A probe's {size: {name: shape}}, or only the PROBE_SHAPES="1024:single_block 512:single_block" ones (the
    per-step totals then cover only them)."""
    if not os.environ.get("PROBE_SHAPES"):
        return shapes
    kept = [entry.split(":") for entry in os.environ["PROBE_SHAPES"].split()]
    return {size: {name: shape for name, shape in by_name.items() if [str(size), name] in kept}
            for size, by_name in shapes.items()}


def timed_sweep(sweep: dict, call) -> tuple[list, list]:
    """`call(**config)` timed for every configuration of `sweep`: (all rows, the timed ones fastest first). A
    configuration that fails (e.g. out of shared memory) is a row with its error, not a crash."""
    rows = []
    for values in itertools.product(*sweep.values()):
        config = dict(zip(sweep, values))
        try:
            rows.append({**config, "ms": graph_ms(lambda: call(**config))})
        except Exception as err:
            rows.append({**config, "failed": f"{type(err).__name__}: {err}"[:200]})
    return rows, sorted((row for row in rows if "ms" in row), key=lambda row: row["ms"])


def record_size(report: dict, size, totals: dict, rows: list, out_path: str) -> None:
    """Add a size's per-step totals and rows to `report`, print the totals and write the report: after each size,
    so a command cut by its time limit keeps what was measured."""
    report["sizes"][size] = {"per_step_ms": totals, "shapes": rows}
    print(f"[{size}] per step: {json.dumps(totals)}", flush=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)
