"""Parse a rank-64 FLUX.1-dev LoRA file (687 MB) on the host and on the GPU (the serve prefetcher's
path), alone and while another thread keeps the GPU busy as a serving model does. Prints ms per parse.

    source scripts/gpu/env.sh && python3 scripts/gpu/probe_prefetch.py
"""

import threading
import time

import torch

from aotpack.adapters.parse import parse_adapter
from aotpack.bench.loras import write_bench_loras
from aotpack.models.checkpoint import load_transformer_config, parse_model_ref

config = load_transformer_config(parse_model_ref("random:flux-dev"))
path = write_bench_loras(config, "/tmp/probe-loras", names=["r64-all"])["r64-all"]
device = torch.device("cuda")
side = torch.cuda.Stream(device)


def timed(label: str, where: str) -> None:
    runs = []
    for _ in range(3):
        began = time.perf_counter()
        if where == "host":
            parse_adapter(path).to(device, torch.bfloat16)
        else:
            with torch.cuda.stream(side):
                parse_adapter(path, device=device, dtype=torch.bfloat16)
            side.synchronize()
        runs.append((time.perf_counter() - began) * 1000)
    print(f"{label:10s} parse on {where}: " + ", ".join(f"{ms:.0f}" for ms in runs) + " ms", flush=True)


stop = threading.Event()


def busy():
    x = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    while not stop.is_set():
        for _ in range(20):
            x = (x @ x).clamp_(-1, 1)
        torch.cuda.current_stream().synchronize()


for where in ("host", "device"):
    timed("alone", where)
worker = threading.Thread(target=busy)
worker.start()
for where in ("host", "device"):
    timed("GPU busy", where)
stop.set()
worker.join()
