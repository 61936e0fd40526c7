"""AOTInductor: compile exported programs into `.pt2` packages, in parallel worker processes."""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import ExportError
from .aoti_scratch import scratch_for_every_program
# aotpack's own ops must be registered before a worker loads an exported program that calls them
from ..models import fused_quant, gelu_lora, gemm_lora, lora_up, merge_by_address, qk_norm_rope  # noqa: F401
from ..models.regions import BLOCK_KINDS

# The prologue turns a bf16 timestep into sinusoidal embeddings of `t * 1000`: fused in fp32, the
# product skips eager's bf16 rounding and the high-frequency sin/cos of the embedding decorrelate
# (36% relative error measured on the H200). Emulating eager's casts restores parity; block
# programs do not need it (2e-3 without).
EAGER_CASTS = {"emulate_precision_casts": True}

# Weights never go into the package: the runtime binds them from the checkpoint.
BASE_INDUCTOR_CONFIGS = {"aot_inductor.package_constants_in_so": False}

# torch's compile timers are nested (a phase includes those it calls); these name where a compile goes without the
# wrappers around them: lowering, fusion, kernel code generation, waiting for Triton's compile pool, the C++ compile.
TELLING_PHASES = ("GraphLowering.run", "Scheduler.__init__", "Scheduler.codegen", "async_compile.wait",
                  "aoti_precompile_header", "AotCodeCompiler.compile", "compile_file", "aoti_compile_fatbin")


@dataclass
class CompileTime:
    """Where one program's compile went: why the H200 build's modulation program took 124 s in the build's own
    process against 83-111 s in a worker (2026-12-05b) is not known, and these tell wall time spent waiting (for the
    CPU or for the compiler's own processes) from work done in the compiling thread."""

    seconds: float  # wall time
    cpu_seconds: float  # CPU time of the compiling thread; g++ and Triton's compile pool run in other processes
    phases: dict[str, float] = field(default_factory=dict)  # torch's compile timers (s), nested, the largest first
    process_seconds: float | None = None  # a worker's whole life: its start, imports and program load included
    # a worker's own stages before the compile (s): "imports" (torch, aotpack's ops, torchao), "load" (the saved
    # program and its empty weights). On the H200 a worker lived 24-33 s longer than its compile (2026-12-07j); the
    # rest of that (the interpreter's start and exit) is process_seconds - seconds - these
    worker_stages: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        phases = ", ".join(f"{name} {self.phases[name]:.1f}" for name in TELLING_PHASES if name in self.phases)
        process = ""
        if self.process_seconds is not None:
            stages = dict(self.worker_stages)
            if stages:
                stages["start and exit"] = self.process_seconds - self.seconds - sum(stages.values())
            told = "".join(f", {name} {seconds:.1f}" for name, seconds in stages.items())
            process = f" (its worker process {self.process_seconds:.1f} s{told})"
        return (f"{self.seconds:.1f} s{process}, {self.cpu_seconds:.1f} s CPU in its thread"
                + (f"; phases (s): {phases}" if phases else ""))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_worker_log(cls, name: str, log: str) -> "CompileTime":
        """The timing a worker printed as its last JSON line (anything printed after it, e.g. at exit, is skipped)."""
        for line in reversed(log.strip().splitlines()):
            try:
                return cls(**json.loads(line))
            except (ValueError, TypeError):
                continue
        raise ExportError(f"the worker compiling {name} ended without reporting its timing:\n{log[-3000:]}",
                          "run with --workers 1 to compile in this process, and report it")


def _phase_timers() -> dict[str, list[float]]:
    """torch's compile timers (a private table: where a torch lacks it, builds go on without phases)."""
    import torch._dynamo.utils

    timers = getattr(torch._dynamo.utils, "compilation_time_metrics", None)
    return timers if isinstance(timers, dict) else {}


def _phase_counts() -> dict[str, int]:
    return {name: len(times) for name, times in _phase_timers().items()}


def _phases_since(counts_before: dict[str, int]) -> dict[str, float]:
    """Seconds per compile phase since `counts_before` (the timers accumulate over a process's compiles)."""
    spent = {name: sum(times[counts_before.get(name, 0):]) for name, times in _phase_timers().items()}
    return {name: round(seconds, 2) for seconds, name in sorted(((s, n) for n, s in spent.items() if s >= 0.1),
                                                                 reverse=True)}


# A folder to write one Python profile per compile (`<program>.profile.txt`): torch's timers leave 50-80 s of a
# concurrent compile on a GPU unnamed (2026-12-07j), and a profile names the function that waits.
PROFILE_DIR_VARIABLE = "AOTPACK_PROFILE_COMPILE"


@contextmanager
def _profiled(package_path: Path):
    """Profile the block into `$AOTPACK_PROFILE_COMPILE/<package stem>.profile.txt` where that variable is set."""
    folder = os.environ.get(PROFILE_DIR_VARIABLE)
    if not folder:
        yield
        return
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text).sort_stats("cumulative")
        stats.print_stats(80)
        stats.sort_stats("tottime").print_stats(30)  # where the wall time sits: a lock's or a subprocess's wait
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{package_path.stem}.profile.txt").write_text(text.getvalue())


def compile_program(exported, package_path: Path, inductor_configs: dict) -> CompileTime:
    """AOTInductor-compile `exported` into `package_path`; returns where the time went."""
    started, cpu_started, phases_before = time.perf_counter(), time.thread_time(), _phase_counts()
    configs = {**inductor_configs, **BASE_INDUCTOR_CONFIGS}
    try:  # scratch_for_every_program: torch 2.11's undersized scratch (aoti_scratch.py)
        with warnings.catch_warnings(), scratch_for_every_program(), _profiled(package_path):
            # torch 2.13 copies the program's pytree specs through its own deprecated LeafSpec check: one warning a
            # compile, about torch's code, not the user's
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            torch._inductor.aoti_compile_and_package(exported, package_path=str(package_path),
                                                     inductor_configs=configs)
    except Exception as err:
        raise ExportError(
            f"AOTInductor failed to compile {package_path.name}: {type(err).__name__}: {str(err)[:2000]}",
            "run `aotpack doctor` to check the compiler; AOTPACK_DEBUG=1 shows the traceback",
        ) from err
    return CompileTime(round(time.perf_counter() - started, 2), round(time.thread_time() - cpu_started, 2),
                       _phases_since(phases_before))


def program_configs(kind: str, recipe_configs: dict) -> dict:
    """Inductor configs for one program: the recipe's, plus eager-cast emulation outside the blocks."""
    return {**recipe_configs, **(EAGER_CASTS if kind not in BLOCK_KINDS else {})}


def compile_saved_program(exported_path: str, package_path: str, inductor_configs: dict, attention: str,
                          needs_torchao: bool, left_out: dict[str, str], imports_seconds: float = 0.0) -> CompileTime:
    """Load a program saved without its large weights (`weightless.py`) and compile it (runs in a worker
    process, see `compile_programs`); `imports_seconds`: the worker's imports before this call, reported with the
    rest of its stages."""
    from ..models.attention import attention_context
    from .weightless import give_empty_weights

    started = time.perf_counter()
    if needs_torchao:
        import torchao  # noqa: F401  registers the FP8 tensor subclass before the program is loaded
    imported = time.perf_counter()
    exported = torch.export.load(exported_path)
    give_empty_weights(exported, left_out)
    loaded = time.perf_counter()
    with attention_context(None, attention):
        timing = compile_program(exported, Path(package_path), inductor_configs)
    timing.worker_stages = {"imports": round(imports_seconds + imported - started, 2),
                            "load": round(loaded - imported, 2)}
    return timing


class _JobQueue:
    """The jobs to compile, put in as their exports end: the worker thread takes them from the front, the build's
    own process (once every export is done) from the back, so the first programs go to workers while the rest
    export, and the two sides meet wherever the jobs run out."""

    def __init__(self):
        import threading

        self._specs, self._lock, self._closed = [], threading.Lock(), False

    def put(self, spec: dict) -> None:
        with self._lock:
            self._specs.append(spec)

    def close(self) -> None:
        """No job comes after those in the queue."""
        with self._lock:
            self._closed = True

    def take(self, from_back: bool = False) -> dict | None:
        with self._lock:
            return self._specs.pop(-1 if from_back else 0) if self._specs else None

    def finished(self) -> bool:
        with self._lock:
            return self._closed and not self._specs


def _run_workers(jobs: _JobQueue, workers: int, report, stop=None) -> dict[str, CompileTime]:
    """Run `python -m aotpack.builder.compile_worker SPEC` for each job taken from `jobs`, `workers` at a time,
    until the queue is closed and empty; `stop` (a `threading.Event`), once set, kills the running workers and
    returns.

    Plain subprocesses rather than multiprocessing: spawn would re-run an unguarded caller script.
    Worker output goes to a log file beside the package, not a pipe: a chatty compile could fill a
    pipe nobody reads until the worker exits, and hang both.
    """
    import json
    import subprocess
    import sys

    running, timings = {}, {}

    def end_running():  # killed and their job files removed
        for process, spec_path, log_path, _ in running.values():
            process.kill()
            process.wait()
            spec_path.unlink(missing_ok=True)
            log_path.unlink(missing_ok=True)

    while True:
        if stop is not None and stop.is_set():
            end_running()
            return timings
        while len(running) < workers and (spec := jobs.take()) is not None:
            spec_path = Path(spec["package_path"]).with_suffix(".job.json")
            spec_path.write_text(json.dumps(spec))
            log_path = spec_path.with_suffix(".log")
            with open(log_path, "w") as log:
                process = subprocess.Popen([sys.executable, "-m", "aotpack.builder.compile_worker", str(spec_path)],
                                           stdout=log, stderr=subprocess.STDOUT)
            running[spec["name"]] = (process, spec_path, log_path, time.perf_counter())
        if not running and jobs.finished():
            return timings
        for name, (process, spec_path, log_path, started) in list(running.items()):
            if process.poll() is None:
                continue
            output = log_path.read_text(errors="replace")
            spec_path.unlink(missing_ok=True)
            log_path.unlink(missing_ok=True)
            del running[name]
            if process.returncode != 0:
                end_running()
                # said now: the error itself surfaces once the export or compile running in this process ends
                report.info(f"    compiling {name} failed in its worker process; the build stops after the export "
                            "or compile running in this process")
                raise ExportError(f"compiling {name} failed in its worker process:\n{output[-3000:]}",
                                  "run with --workers 1 (or AOTPACK_DEBUG=1) to see the full error in-process")
            try:
                timings[name] = CompileTime.from_worker_log(name, output)
            except ExportError:
                end_running()
                raise
            timings[name].process_seconds = round(time.perf_counter() - started, 2)
            report.info(f"    compiled {name}: {timings[name].summary()}")
        time.sleep(0.2)


def compile_programs(jobs: Iterable[tuple], *, workers: int, inductor_configs: dict, attention: str,
                     needs_torchao: bool, report) -> dict[str, CompileTime]:
    """Compile several exported programs: `workers` at a time when > 1, else one by one in this process.

    `jobs` yields (name, exported program, package path), e.g. as the build exports them. AOTInductor spends much
    of a compile on one core, so independent programs compile in parallel on a many-core build machine: in `workers
    - 1` worker processes, each starting as soon as a job is yielded (the H200 build's 9 exports take ~15 s), and in
    this process once `jobs` is exhausted. Programs travel to the workers through `torch.export.save` without their
    weights' bytes (`weightless.py`): saving them took ~3.5-8.6 s a GB on a 2-core machine, and an h200 package's
    modulation program carries 6.45 GB (its 2026-12-05a build spent ~40 s outside every timed stage saving it; in
    2026-12-05b it compiled in this process instead, 124 s against 83-111 s in a worker, and the other 8 programs'
    saves took 6.7 s, benchmarks/results/2026-12-05b-h200-split-build/). Every program is saved; this process
    compiles from the back of the queue (deleting those saved copies unread) while the workers take from the front.
    """
    try:
        if workers <= 1:
            return _compile_here_one_by_one(jobs, inductor_configs, attention, report)
        return _compile_in_workers_and_here(jobs, workers, inductor_configs, attention, needs_torchao, report)
    finally:
        getattr(jobs, "close", lambda: None)()  # a generator left early (a failure) ends its exports' contexts


def _compile_here_one_by_one(jobs, inductor_configs: dict, attention: str, report) -> dict[str, CompileTime]:
    from ..models.attention import attention_context

    timings = {}
    for name, exported, package_path in jobs:
        with attention_context(None, attention), report.stage(f"compile {name} (AOTInductor)"):
            timings[name] = compile_program(exported, package_path, program_configs(name, inductor_configs))
        report.info(f"    {timings[name].summary()}")
    return timings


def _compile_in_workers_and_here(jobs, workers: int, inductor_configs: dict, attention: str, needs_torchao: bool,
                                 report) -> dict[str, CompileTime]:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from ..models.attention import attention_context
    from .weightless import save_for_compile, tensor_bytes

    report.info(f"==> compile each program as its export ends (AOTInductor: {workers - 1} worker "
                f"process{'es' if workers > 2 else ''}, then this process too) ...")
    queue, stop, timings, specs, in_memory = _JobQueue(), threading.Event(), {}, [], {}
    started, save_seconds, left_out_bytes = time.perf_counter(), 0.0, 0
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            in_workers = pool.submit(_run_workers, queue, workers - 1, report, stop)
            try:
                for name, exported, package_path in jobs:  # the build exports the next program meanwhile
                    saving = time.perf_counter()
                    exported_path = package_path.with_suffix(".exported.pt2")
                    configs = program_configs(name, inductor_configs)
                    left_out = save_for_compile(exported, str(exported_path), configs)
                    save_seconds += time.perf_counter() - saving
                    left_out_bytes += sum(tensor_bytes(t) for table in (exported.state_dict, exported.constants)
                                          for n, t in table.items() if n in left_out)
                    specs.append({"name": name, "exported_path": str(exported_path),
                                  "package_path": str(package_path),
                                  "inductor_configs": configs, "attention": attention,
                                  "needs_torchao": needs_torchao, "left_out": left_out})
                    in_memory[name] = (exported, package_path)
                    queue.put(specs[-1])
                    if in_workers.done():  # a worker failed: its error is raised below, no further export
                        break
                queue.close()
                report.info(f"    {len(specs)} programs saved for the workers in {save_seconds:.1f} s, "
                            f"{left_out_bytes / 1e9:.2f} GB of weights left out")
                with attention_context(None, attention):
                    while not in_workers.done() and (spec := queue.take(from_back=True)) is not None:
                        Path(spec["exported_path"]).unlink(missing_ok=True)
                        name = spec["name"]
                        timings[name] = compile_program(*in_memory[name], program_configs(name, inductor_configs))
                        report.info(f"    compiled {name} (in this process): {timings[name].summary()}")
            except BaseException:
                stop.set()
                raise
            timings.update(in_workers.result())  # a worker's failure raises here
    finally:
        for spec in specs:
            Path(spec["exported_path"]).unlink(missing_ok=True)
    report.info(f"    all programs compiled {time.perf_counter() - started:.1f} s after the first export began")
    return timings
