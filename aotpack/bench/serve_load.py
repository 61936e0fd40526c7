"""Load on the HTTP server (loopback): N requests over K adapters with Zipf popularity, scheduling policies
compared on the same request sequence (default: LoRA affinity vs FIFO, both with adapter prefetch).

    aotpack bench serve-load --package DIR --model tiny --out OUT --requests 64 --adapters 8
    python -m aotpack.bench.serve_load ...   # the same

Per policy: throughput, latency p50/p95/p99 (arrival to answer), switches per request, prefetch hit
rate (adapters needed at a switch that had been staged while the previous batch ran), and the
switch time of switches whose new adapters were all prefetched vs parsed at the switch. The package
is loaded once; each policy starts with an empty adapter cache and no active LoRA. The LoRAs are
random (rank --rank on every block linear), written once under --lora-dir. Writes
OUT/serve_load.json and OUT/serve_load.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import numpy as np

PATTERNS = ["transformer_blocks.*", "single_transformer_blocks.*"]


def zipf_sequence(requests: int, adapters: int, exponent: float, seed: int) -> list[int]:
    """Adapter index per request, P(i) ~ 1 / (i+1)^exponent."""
    weights = 1.0 / np.arange(1, adapters + 1) ** exponent
    return np.random.default_rng(seed).choice(adapters, size=requests, p=weights / weights.sum()).tolist()


def write_loras(model: str, directory: Path, count: int, rank: int) -> dict[str, Path]:
    """`count` random rank-`rank` LoRAs on every block linear of `model` (bf16, like published files)."""
    import torch
    from safetensors.torch import save_file

    from ..demo import random_lora_state_dict
    from ..models.checkpoint import (
        config_fingerprint,
        load_transformer_config,
        parse_model_ref,
        structural_config,
    )
    from .loras import meta_transformer

    config = load_transformer_config(parse_model_ref(model))
    directory = directory / f"{config_fingerprint(structural_config(dict(config)))[:16]}-r{rank}"
    directory.mkdir(parents=True, exist_ok=True)
    meta = meta_transformer(config)
    paths = {}
    for i in range(count):
        path = directory / f"load-{i}.safetensors"
        if not path.exists():
            state = random_lora_state_dict(meta, rank, PATTERNS, seed=100 + i, std=0.02)
            save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(path))
        paths[f"load-{i}"] = path
    return paths


def percentile(values, q):
    return float(np.percentile(values, q)) if values else None


async def _drive(url: str, bodies: list[dict], rate: float, time_limit: float, seed: int) -> list[dict]:
    import httpx

    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, len(bodies)) if rate > 0 else np.zeros(len(bodies))
    records = [None] * len(bodies)

    async def one(client, index, body, delay):
        await asyncio.sleep(delay)
        sent = time.perf_counter()
        try:
            answer = await client.post(f"{url}/v1/images/generations", json=body)
            status, data = answer.status_code, answer.json() if answer.status_code == 200 else answer.text[:200]
        except httpx.HTTPError as err:
            status, data = 0, repr(err)
        records[index] = {"index": index, "adapter": body["loras"][0]["name"], "status": status, "sent": sent,
                          "latency": time.perf_counter() - sent,
                          "timings": data.get("timings") if isinstance(data, dict) else None,
                          "error": None if status == 200 else data}

    limits = httpx.Limits(max_connections=len(bodies) + 4, max_keepalive_connections=len(bodies) + 4)
    async with httpx.AsyncClient(timeout=time_limit, limits=limits) as client:
        tasks = [asyncio.create_task(one(client, i, b, float(d))) for i, (b, d) in
                 enumerate(zip(bodies, np.cumsum(gaps)))]
        done, pending = await asyncio.wait(tasks, timeout=time_limit)
        for task in pending:  # closing the connection cancels the queued request on the server
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return [r or {"index": i, "status": -1, "latency": None, "error": "not finished in the time limit"}
            for i, r in enumerate(records)]


def summarize(policy: str, records: list[dict], wall: float, stats: dict) -> dict:
    ok = [r for r in records if r["status"] == 200]
    latencies = [r["latency"] for r in ok]
    batches = {r["timings"]["batch"]: r["timings"] for r in ok}.values()  # one entry per batch (its switch)
    prefetched = [t["switch"] * 1000 for t in batches if t["prefetched"] and not t["parsed_at_switch"]]
    parsed = [t["switch"] * 1000 for t in batches if t["parsed_at_switch"]]
    cached = [t["switch"] * 1000 for t in batches if t["switch_copy_ms"] is not None
              and not t["prefetched"] and not t["parsed_at_switch"]]
    staged = stats["prefetch_hits"] + stats["prefetch_misses"]
    prefetched_batches = [t for t in batches if t["prefetched"] and not t["parsed_at_switch"]]
    # where a prefetched switch's time goes (medians): waiting for the cache lock, then set_loras' phases
    parts = {"lock_wait": [t.get("lock_wait_ms") for t in prefetched_batches],
             **{name: [t.get("switch_phases_ms", {}).get(name) for t in prefetched_batches]
                for name in ("resolve", "stack", "write", "sync")}}
    return {
        "policy": policy, "requests": len(records), "completed": len(ok),
        "failed": {str(r["status"]): sum(1 for x in records if x["status"] == r["status"]) for r in records
                   if r["status"] != 200},
        "wall_seconds": wall, "throughput_images_per_s": len(ok) / wall if wall else None,
        "latency_s": {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
                      "p99": percentile(latencies, 99), "mean": statistics.fmean(latencies) if latencies else None},
        "switches": stats["switches"], "switches_per_request": stats["switches"] / max(1, len(ok)),
        "batches": stats["batches"], "images_per_batch": stats["images"] / max(1, stats["batches"]),
        "prefetch_hits": stats["prefetch_hits"], "prefetch_misses": stats["prefetch_misses"],
        "prefetch_hit_rate": stats["prefetch_hits"] / staged if staged else None,
        "prefetch_failed": stats.get("prefetch_failed", 0),
        # time from batch start to adapters in the slots, as the request saw it (lock waits included)
        "switch_ms_prefetched": {"n": len(prefetched), "median": percentile(prefetched, 50),
                                 "max": max(prefetched, default=None)},
        "switch_ms_parsed_at_switch": {"n": len(parsed), "median": percentile(parsed, 50),
                                       "max": max(parsed, default=None)},
        "switch_ms_cached": {"n": len(cached), "median": percentile(cached, 50), "max": max(cached, default=None)},
        "prefetched_switch_parts_ms": {name: percentile([v for v in values if v is not None], 50)
                                       for name, values in parts.items()},
    }


def markdown(results: dict) -> str:
    def f(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    arrival = "burst (all at once)" if not results["rate"] else f"Poisson {results['rate']:g}/s"
    lines = [f"# aotpack bench serve-load ({results['label']})", "",
             f"{results['requests']} requests over {results['adapters']} rank-{results['rank']} adapters, Zipf "
             f"s={results['zipf']}, {results['size']}, {results['steps']} steps, arrival "
             f"{arrival}, max batch "
             f"{results['max_batch']}, max-wait {results['max_wait_s']:g} s, adapter cache "
             f"{results['cache_budget_gib']:g} GiB, loopback HTTP. Model: {results['model']}.", "",
             "| policy | done | img/s | p50 s | p95 s | p99 s | switches/req | img/batch | prefetch hit rate | "
             "switch ms prefetched (n, median, max) | switch ms parsed at switch (n, median, max) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["policies"]:
        sp, sx = r["switch_ms_prefetched"], r["switch_ms_parsed_at_switch"]
        lines.append(
            f"| {r['policy']} | {r['completed']}/{r['requests']} | {f(r['throughput_images_per_s'])} | "
            f"{f(r['latency_s']['p50'])} | {f(r['latency_s']['p95'])} | {f(r['latency_s']['p99'])} | "
            f"{f(r['switches_per_request'], '{:.3f}')} | {f(r['images_per_batch'])} | "
            f"{f(r['prefetch_hit_rate'])} | {sp['n']}, {f(sp['median'], '{:.1f}')}, {f(sp['max'], '{:.1f}')} | "
            f"{sx['n']}, {f(sx['median'], '{:.1f}')}, {f(sx['max'], '{:.1f}')} |")
    lines += ["", "Prefetched switches, median ms by part (lock wait, then set_loras: resolve / stack / write / "
              "sync): " + "; ".join(
                  f"{r['policy']} " + " / ".join(f(r["prefetched_switch_parts_ms"].get(k), "{:.1f}")
                                                 for k in ("lock_wait", "resolve", "stack", "write", "sync"))
                  for r in results["policies"])]
    by = {r["policy"]: r for r in results["policies"]}
    if "affinity" in by and "fifo" in by and by["affinity"]["switches_per_request"]:
        a, b = by["affinity"], by["fifo"]
        lines += ["", f"Switches per request: FIFO / affinity = "
                  f"{b['switches_per_request'] / a['switches_per_request']:.2f}x; p99 affinity "
                  f"{f(a['latency_s']['p99'])} s vs FIFO {f(b['latency_s']['p99'])} s."]
    return "\n".join(lines) + "\n"


def run(args) -> dict:
    import torch

    from ..adapters.cache import AdapterCache
    from ..models.prepare import torch_dtype
    from ..runtime.pipeline import load_package
    from ..serve.generate import Params, generate
    from ..serve.registry import AdapterRegistry
    from ..serve.server import BackgroundServer
    from ..serve.service import ServeOptions, Service, parse_size

    args.out.mkdir(parents=True, exist_ok=True)
    paths = write_loras(args.model, args.lora_dir, args.adapters, args.rank)
    started = time.perf_counter()
    served = load_package(args.package, args.model, progress=True)
    load_seconds = time.perf_counter() - started
    served.pipeline.set_progress_bar_config(disable=True)
    height, width = parse_size(args.size)
    max_batch = int(served.manifest.shapes["batch"][1])
    for batch in sorted({1, max_batch}):  # one-time kernel loading at this size, outside every policy's run
        warm = Params(height, width, 1, 3.5, args.max_sequence_length)
        generate(served, warm, [("warm-up", i) for i in range(batch)])
    sequence = zipf_sequence(args.requests, args.adapters, args.zipf, args.seed)
    names = list(paths)
    bodies = [{"prompt": f"request {i}", "size": args.size, "steps": args.steps, "seed": i,
               "max_sequence_length": args.max_sequence_length, "loras": [{"name": names[k], "scale": 1.0}]}
              for i, k in enumerate(sequence)]
    budget = int(args.cache_gib * 2**30)
    results = {"label": args.label, "model": args.model, "package": str(args.package), "requests": args.requests,
               "adapters": args.adapters, "rank": args.rank, "zipf": args.zipf, "size": args.size,
               "steps": args.steps, "rate": args.rate, "max_wait_s": args.max_wait, "cache_budget_gib": args.cache_gib,
               "max_sequence_length": args.max_sequence_length, "load_seconds": load_seconds,
               "adapter_popularity": {n: sequence.count(i) for i, n in enumerate(names)},
               "device": str(served.device), "policies": []}
    for policy in args.policies.split(","):
        name, _, variant = policy.partition("-")
        # a fresh start per policy: empty adapter cache, no active LoRA
        served.cache = AdapterCache(served.device, torch_dtype(served.manifest.lora_dtype), budget_bytes=budget)
        served.set_loras([])
        registry = AdapterRegistry()
        for adapter, path in paths.items():
            registry.add(adapter, str(path), trusted=True)
        options = ServeOptions(max_queue=args.requests + 1, max_wait_s=args.max_wait, policy=name,
                               request_timeout_s=args.time_limit, prefetch=variant != "noprefetch", warm_up=True)
        service = Service(args.package, args.model, registry=registry, options=options, loader=lambda: served)
        results["max_batch"] = service.max_batch
        server = BackgroundServer(service)
        with server as url:
            server.wait_ready()
            began = time.perf_counter()
            records = asyncio.run(_drive(url, bodies, args.rate, args.time_limit, args.seed))
            wall = time.perf_counter() - began
            stats = dict(service.worker.stats)
            stage_log = [dict(entry, at=entry["at"] - began) for entry in service.worker.stage_log]
        if not service.worker.stop(timeout=600):  # never two workers on one model
            raise RuntimeError(f"the {policy} worker did not stop")
        summary = summarize(policy, records, wall, stats)
        results["policies"].append(summary)
        (args.out / f"serve_load_{policy}_requests.json").write_text(json.dumps(records, indent=1, default=str))
        (args.out / f"serve_load_{policy}_prefetch.json").write_text(json.dumps(stage_log, indent=1, default=str))
        print(f"{policy:22s} {summary['completed']}/{len(records)} done in {wall:.1f} s; "
              f"p99 {summary['latency_s']['p99']} s; switches/request {summary['switches_per_request']:.3f}; "
              f"prefetch hit rate {summary['prefetch_hit_rate']}", flush=True)
    if served.device.type == "cuda":
        results["peak_gpu_gb"] = torch.cuda.max_memory_allocated(served.device) / 2**30
    (args.out / "serve_load.json").write_text(json.dumps(results, indent=2, default=str))
    (args.out / "serve_load.md").write_text(markdown(results))
    print(markdown(results), flush=True)
    return results


def main(argv=None) -> None:
    from .checks import package_and_output

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", required=True)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of adapter popularity.")
    parser.add_argument("--size", default="128x128")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-sequence-length", type=int, default=32)
    parser.add_argument("--rate", type=float, default=0.0, help="Poisson arrivals per second; 0: all at once.")
    parser.add_argument("--max-wait", type=float, default=600.0, help="The scheduler's max-wait bound (s).")
    parser.add_argument("--cache-gib", type=float, default=4.0, help="Adapter cache budget per policy run.")
    parser.add_argument("--policies", default="affinity,fifo",
                        help="Comma list of affinity, fifo, affinity-noprefetch, fifo-noprefetch.")
    parser.add_argument("--time-limit", type=float, default=300.0, help="Seconds per policy (bounded).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora-dir", type=Path, default=Path("/tmp/aotpack-bench-loras"))
    parser.add_argument("--label", default="CPU, tiny random model")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.adapters < 1:
        parser.error("--requests and --adapters must be at least 1")
    package_and_output(args)
    run(args)


if __name__ == "__main__":
    main()
