"""Timing helpers: CUDA events after warm-up, median of repeats (host clock on the CPU)."""

from __future__ import annotations

import gc
import os
import re
import statistics
import time

import torch


def bench_device() -> tuple[str, torch.dtype]:
    """Where benchmarks run, and the dtype of the eager contenders there (bf16 on a GPU, fp32 on the CPU)."""
    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, *, warmup: int = 2, repeats: int = 10, before=None) -> dict:
    """Median/min/max milliseconds of `fn()` over `repeats` runs after `warmup` runs; `before()`, untimed, ahead of
    each (a reset of what `fn` changes)."""
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
    synchronize(device)
    samples = []
    cuda = torch.device(device).type == "cuda"
    for _ in range(repeats):
        if before is not None:
            before()
            synchronize(device)
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


def back_to_back_ms(fn, device, *, steps: int = 10, warmup: int = 2, repeats: int = 3) -> dict:
    """Milliseconds per call of `fn` called `steps` times in a row with no wait in between, as a denoising loop runs
    its steps: the host enqueues the next call while the device runs this one. Median/min/max over `repeats` loops
    (each timed by `time_ms`, which starts each timed call on an idle device: for one step replayed from a CUDA graph
    its figure also holds the host's input copies and graph launch)."""
    for _ in range(warmup):
        fn()

    def loop():
        for _ in range(steps):
            fn()

    timed = time_ms(loop, device, warmup=0, repeats=repeats)
    return {**{key: timed[key] / steps for key in ("median_ms", "min_ms", "max_ms")}, "repeats": repeats,
            "steps_per_repeat": steps}


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


def synced_ms(fn, device) -> float:
    """Milliseconds of one `fn()` call, the device synchronized at both ends (a switch, a merge, a whole image)."""
    with Stopwatch(device) as watch:
        fn()
    return watch.seconds * 1000


def peak_memory_gb(device, resident_gb: float = 0.0) -> float | None:
    """Peak GiB since the last `reset_peak_memory`, less `resident_gb` (what was allocated then; None on the CPU)."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30 - resident_gb


def reset_peak_memory(device) -> float:
    """Start a new peak; returns the GiB allocated now, which a later `peak_memory_gb` includes."""
    if torch.device(device).type != "cuda":
        return 0.0
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2**30


def kernel_profiles_on(device) -> bool:
    """Whether the compare and variants benches profile kernels on `device`: on a GPU only, where kernel times are
    what they compare (tests patch it to check, on the CPU, when the profiles run)."""
    return torch.device(device).type == "cuda"


def free_memory() -> None:
    """Collect what the caller just dropped (`del`) and hand the allocator's cached blocks back, so the next
    contender's timings and peak start from what is really held."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Profiles:
    """Profiler sessions queued while timing and run once every contender is timed: a finished session slows what
    the process runs next (`kernel_rows`), so no timed figure may follow one. What a job profiles stays alive
    until it has run, and no longer: a contender no later job holds is freed before the next job runs."""

    def __init__(self):
        self._jobs = []

    def queue(self, target: dict, key: str, profile, prepare=None, finish=None) -> None:
        """At `run()`: `prepare()` (puts back the state `profile` measures), `target[key] = profile()`, `finish()`."""
        self._jobs.append((target, key, profile, prepare, finish))

    def run(self) -> None:
        while self._jobs:
            target, key, profile, prepare, finish = self._jobs.pop(0)
            try:
                if prepare is not None:
                    prepare()
                target[key] = profile()
            except Exception as err:  # noqa: BLE001 -- recorded, the timed figures stand without it
                target[f"{key}_error"] = f"{type(err).__name__}: {err}"[:500]
            finally:
                if finish is not None:
                    finish()
            del profile, prepare, finish  # the references to this job's model, before the next job runs
            free_memory()


def kernel_rows(fn, device, *, steps: int = 2) -> list[dict]:
    """Every kernel's self device time per call of `fn` (CPU ops' self time on the CPU, for smoke tests)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    # Kineto keeps CUPTI attached after a session unless TEARDOWN_CUPTI=1 (pytorch/pytorch#144455), and all that
    # runs later pays for it: on the H200, after one session, 3000 small launches took 41-42 ms instead of 30-33 and
    # 2000 small kernels 37-38% more device time; set here, at run time, 30.7 and +4% (2026-12-03, two runs,
    # scripts/gpu/probe_cupti_after_profiler.py). The benches also profile only after their timed figures.
    os.environ.setdefault("TEARDOWN_CUPTI", "1")
    fn()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
        synchronize(device)
    rows = []
    for event in prof.key_averages():
        if cuda:
            us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        else:
            us = event.self_cpu_time_total
        if us:
            rows.append({"kernel": event.key, "ms_per_call": us / 1000 / steps, "launches_per_call": event.count / steps})
    rows.sort(key=lambda r: -r["ms_per_call"])
    return rows


def top_kernels(fn, device, *, steps: int = 2, limit: int = 15) -> list[dict]:
    """The GPU kernels that took the most device time over `steps` calls of `fn` (per call)."""
    rows = kernel_rows(fn, device, steps=steps)
    total = sum(r["ms_per_call"] for r in rows)
    return [{**r, "kernel": r["kernel"][:120], "share": r["ms_per_call"] / total} for r in rows[:limit]]


CATEGORIES = ("fp8_gemm", "attention", "activation_quant", "bf16_gemm_lora", "bf16_gemv",
              "norm_modulation_elementwise", "communication", "other")
# cuBLASLt's bf16 kernels with a tile 8 wide (`nvjet_sm90_tst_192x8_...`): GEMMs of a few rows, i.e. the linears that
# read one row per image (modulation, time/text embedders), not the LoRA branch's GEMMs over every token
_FEW_ROWS_TILE = re.compile(r"_tst_\d+x8_")


def kernel_category(name: str) -> str:
    """The issue-11 category of a kernel, from its name (cuBLASLt nvjet / cuDNN / Inductor triton names).

    FP8 GEMMs are cuBLASLt's `qq` kernels (e4m3 inputs); other GEMMs are bf16: `bf16_gemv` where cuBLASLt
    tiles them 8 rows wide (the per-image rows: the modulation linears a recipe keeps in bf16, 2.2 ms of a FLUX.1-dev
    1024^2 step on the H200, the embedders, and a LoRA's GEMMs on those rows), else the LoRA branch over the tokens
    (`bf16_gemm_lora`; breakdowns before 2026-12-04e counted both there), where aotpack's `lora_down_fp8_kernel`
    (the LoRA branch, though it reads FP8) and `lora_up_kernel` count too. Inductor names a fused kernel after its
    ops: `amax` marks dynamic activation quantization (often fused with the preceding norm or GELU, so it counts as
    quantization).
    """
    low = name.lower()
    if "nccl" in low:  # context-parallel ranks' collectives
        return "communication"
    if any(k in low for k in ("sdpa", "flash", "fmha", "attention", "attn_fwd")):
        return "attention"
    gemm = any(k in low for k in ("nvjet", "gemm", "cutlass", "xmma", "matmul", "_mm_", "aten::mm", "aten::addmm",
                                  "aten::bmm", "aten::_scaled_mm", "aten::linear"))
    if gemm and not low.startswith("triton"):
        if "qq" in low or "e4m3" in low or "f8" in low or "fp8" in low or "_scaled_mm" in low:
            return "fp8_gemm"
        return "bf16_gemv" if _FEW_ROWS_TILE.search(low) else "bf16_gemm_lora"
    if "lora_down" in low or "lora_up" in low:  # aotpack's LoRA kernels (levers lora_down_from_fp8, group_lora_up)
        return "bf16_gemm_lora"
    if "amax" in low or "float8" in low or "fp8" in low:
        return "activation_quant"
    if low.startswith("triton") or any(k in low for k in ("elementwise", "vectorized", "reduce", "norm", "gelu",
                                                          "catarray", "copy", "aten::add", "aten::mul")):
        return "norm_modulation_elementwise"
    return "other"


def kernel_breakdown(fn, device, *, steps: int = 2, top_kernels: int = 25) -> dict:
    """Device ms per call of `fn` by category (`CATEGORIES`), with the total, the top kernel of each and
    the `top_kernels` heaviest kernels overall."""
    rows = kernel_rows(fn, device, steps=steps)
    if torch.device(device).type != "cuda":  # CPU: the ops' self times stand in (smoke tests only)
        rows = [r for r in rows if r["kernel"].startswith(("aten::", "triton", "cpp_fused", "aoti"))]
    result = {c: 0.0 for c in CATEGORIES}
    top = {}
    for row in rows:
        category = kernel_category(row["kernel"])
        result[category] += row["ms_per_call"]
        top.setdefault(category, row["kernel"][:100])
    heaviest = [{"kernel": r["kernel"][:110], "category": kernel_category(r["kernel"]), "ms": r["ms_per_call"]}
                for r in rows[:top_kernels]]
    return {"ms_per_step": result, "total_ms": sum(result.values()), "top_kernel": top, "top_kernels": heaviest}
