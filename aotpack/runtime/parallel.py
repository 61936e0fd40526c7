"""Context parallel serving: one image's tokens split over N ranks (Ulysses), LoRA hot-swap intact.

A package built with `--parallel ulysses` has every block split around attention
(models/split_regions.py). Each rank is a process (torch.multiprocessing, spawn) with its own copy
of the weights and the full slot bank; the prologue runs on every rank, the joint sequence is
sharded, attention runs between the block programs after a Ulysses all-to-all (ulysses.py), and
the epilogue's output is all-gathered so every rank holds the same latents. Rank 0 owns the I/O.

Every collective has the process group's timeout, and a rank that fails ends the whole run
(`launch` tears the other ranks down and raises `ParallelRunError` naming the rank and its error).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import os
import pickle
import signal
import threading
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import AotpackError, PackageMismatchError
from ..models.split_regions import valid_world_sizes
from .process_folders import ProcessFolder
from .ulysses import Ulysses

DEFAULT_TIMEOUT_S = 300.0  # AOTPACK_PARALLEL_TIMEOUT_S overrides it (parallel_timeout)
TEARDOWN_GRACE_S = 5.0  # ranks ended on an interrupt get this long after SIGTERM before SIGKILL


def parallel_timeout() -> float:
    """The collectives' timeout: AOTPACK_PARALLEL_TIMEOUT_S seconds (a finite number > 0), else 300."""
    text = os.environ.get("AOTPACK_PARALLEL_TIMEOUT_S")
    if text is None or not text.strip():
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0 or value > 10**8:
        raise AotpackError(f"AOTPACK_PARALLEL_TIMEOUT_S = {text!r} is not a number of seconds > 0",
                           f"set AOTPACK_PARALLEL_TIMEOUT_S to seconds such as 300, or unset it "
                           f"(default {DEFAULT_TIMEOUT_S:g})")
    return value


class ParallelRunError(AotpackError):
    """A rank of a context-parallel run failed (the run was ended on every rank)."""


def package_parallel(manifest) -> str:
    return (manifest.recipe or {}).get("parallel", "none")


def check_world_size(manifest, world_size: int, fewest: int = 1) -> None:
    """Refuse a package not split for context parallelism, or a rank count that does not divide the heads.
    `fewest`: the smallest --gpus the caller accepts (the fixes suggest no count below it)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise PackageMismatchError(f"{world_size!r} GPUs asked for", f"pass --gpus {fewest} or more")
    if world_size == 1:
        return
    if package_parallel(manifest) == "none":
        raise PackageMismatchError(
            f"this package was not built for context parallelism, so it cannot run on {world_size} GPUs",
            "rebuild it with `aotpack build ... --parallel ulysses`"
            + (", or run it with --gpus 1" if fewest <= 1 else ""))
    heads = int(manifest.model["config"]["num_attention_heads"])
    if heads % world_size:
        valid = [n for n in valid_world_sizes(heads) if n >= fewest]
        raise PackageMismatchError(
            f"{heads} attention heads cannot be divided over {world_size} ranks",
            f"use one of --gpus {', '.join(map(str, valid))}" if valid else
            f"a model with {heads} heads cannot be split over {fewest} or more ranks")


def check_visible_gpus(world_size: int, device: str, fewest: int = 1) -> None:
    """Refuse more CUDA ranks than visible GPUs (one GPU per rank; CPU ranks are processes, not devices)."""
    if device != "cuda":
        return
    visible = torch.cuda.device_count()
    if visible < world_size:
        raise AotpackError(f"{world_size} GPUs asked for, {visible} visible",
                           f"pass --gpus {visible} or fewer" if visible >= fewest else
                           "run on a machine with that many CUDA GPUs (check CUDA_VISIBLE_DEVICES)")


def check_parallel_run(manifest, world_size: int, device: str, fewest: int = 1) -> None:
    """The checks a run of `manifest` on `world_size` ranks passes before anything loads or any rank starts
    (`generate` / `aotpack run --gpus`, `aotpack bench context-parallel`): the package's split and heads, the GPUs."""
    check_world_size(manifest, world_size, fewest)
    check_visible_gpus(world_size, device, fewest)


def attach(transformer, comm: Ulysses) -> None:
    """Make `transformer` (a CompiledFluxTransformer of a split package) run as one rank of `comm`."""
    check_world_size(transformer.manifest, comm.world_size)
    comm.attention_backend = transformer.manifest.attention
    transformer.context_parallel = comm


# -- ranks -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class RankContext:
    """What a rank function gets: its place in the run and its communicator."""

    rank: int
    world_size: int
    device: torch.device
    comm: Ulysses

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _rank_main(rank, world_size, port, device_type, timeout_s, folder, target, args, parent_pid=None):
    error_file = Path(folder) / f"rank{rank}.error"
    try:
        # a rank outlives no launcher: killed with it (SIGKILL reaches a rank blocked inside a collective, where
        # torch's SIGINT would wait for the collective's timeout), also when the launcher died before this line
        from torch.multiprocessing import _prctl_pr_set_pdeathsig

        _prctl_pr_set_pdeathsig(signal.SIGKILL)
        if parent_pid is not None and os.getppid() != parent_pid:
            os._exit(1)
        if device_type == "cuda":
            torch.cuda.set_device(rank)
            device, backend = torch.device("cuda", rank), "nccl"
        else:  # share the cores: two ranks each using all of them would thrash
            device, backend = torch.device("cpu"), "gloo"
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        timeout = datetime.timedelta(seconds=timeout_s)
        # the launcher holds the store's port for the whole run: no other process can take it meanwhile
        store = dist.TCPStore("127.0.0.1", port, world_size, False, timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
                                **({"device_id": device} if device_type == "cuda" else {}))
        comm = Ulysses(rank, world_size, dist.group.WORLD, device)
        result = target(RankContext(rank, world_size, device, comm), *args)
        if rank == 0:
            (Path(folder) / "result.pkl").write_bytes(pickle.dumps(result))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as err:
        problem = err.problem if isinstance(err, AotpackError) else f"{type(err).__name__}: {err}"
        fix = err.fix if isinstance(err, AotpackError) else ""
        error_file.write_bytes(pickle.dumps((problem, fix, traceback.format_exc())))
        raise


def _end_processes(processes, grace_s: float = TEARDOWN_GRACE_S) -> None:
    """SIGTERM every live rank, SIGKILL those still alive after `grace_s`, and reap them all."""
    import time

    try:
        for process in processes:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + grace_s
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
    finally:  # also on a second Ctrl-C during the grace period
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join()


@contextlib.contextmanager
def _signals_held():
    """Ctrl-C or SIGTERM arriving inside takes effect at the block's end (the main thread's Python handlers only):
    a rank forked inside `start` is registered before the interrupt can unwind past it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending, previous = [], {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if callable(signal.getsignal(signum)):  # SIG_DFL/SIG_IGN raise nothing here to hold
            previous[signum] = signal.signal(signum, lambda number, frame: pending.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pending:
            previous[pending[0]](pending[0], None)


def _start_ranks(processes: list, world_size: int, folder, rank_args: tuple):
    """Start one spawned process per rank, each appended to `processes` before the next starts (the caller ends
    them whatever happens meanwhile); torch's `start_processes` returns its handles only after the last start."""
    import multiprocessing

    from torch.multiprocessing.spawn import ProcessContext, _wrap

    spawn = multiprocessing.get_context("spawn")
    error_files = [str(Path(folder) / f"rank{rank}.traceback") for rank in range(world_size)]
    for rank in range(world_size):
        process = spawn.Process(target=_wrap, args=(_rank_main, rank, rank_args, error_files[rank]), daemon=False)
        with _signals_held():
            process.start()
            processes.append(process)
    return ProcessContext(processes, error_files)


def launch(target, world_size: int, *args, device: str = "cpu", timeout_s: float | None = None):
    """Run `target(RankContext, *args)` on `world_size` ranks (one process each; GPU r for rank r on
    `device="cuda"`, NCCL; gloo on the CPU); returns rank 0's return value.

    `target` must be importable (a module-level function). If any rank fails, the others are ended
    and `ParallelRunError` names the first failing rank, its problem and fix. An interrupt (Ctrl-C, or
    SIGTERM in the main thread) ends every rank before it is raised; a rank never outlives this process.
    `timeout_s` (default AOTPACK_PARALLEL_TIMEOUT_S, else 300) bounds every collective.
    """
    from torch.multiprocessing.spawn import ProcessException

    from ..builder.output import sigterm_as_interrupt

    timeout_s = parallel_timeout() if timeout_s is None else timeout_s
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise AotpackError(f"{world_size!r} ranks asked for", "pass a rank count of 1 or more (--gpus N)")
    check_visible_gpus(world_size, device)
    with sigterm_as_interrupt(), ProcessFolder("parallel-run") as folder:  # removed by a later run if killed
        # the rendezvous store lives here, on a port the OS picks and this process holds until the ranks end
        store = dist.TCPStore("127.0.0.1", 0, world_size, True, datetime.timedelta(seconds=timeout_s),
                              wait_for_workers=False)
        processes = []
        try:  # covers the starts too: Ctrl-C between two starts leaves no started rank behind
            context = _start_ranks(processes, world_size, folder,
                                   (world_size, store.port, device, timeout_s, folder, target, args, os.getpid()))
            while not context.join():
                pass
        except ProcessException as err:
            rank = getattr(err, "error_index", None)
            raise _rank_error(Path(folder), rank, err) from None
        finally:  # Ctrl-C, SIGTERM, an error here: no rank may run on (or hold this exit); a no-op once all exited
            _end_processes(processes)
            del store
        result = Path(folder) / "result.pkl"
        if not result.exists():  # every rank exited 0, rank 0 without its result (ended from outside)
            raise ParallelRunError("rank 0 of the context-parallel run ended without its result (it was stopped "
                                   "from outside, e.g. by SIGINT)", "run it again; set AOTPACK_DEBUG=1 for tracebacks")
        return pickle.loads(result.read_bytes())


def _rank_error(folder: Path, rank, err) -> ParallelRunError:
    """The failing rank's own error; a rank that died without one (killed, crashed, exited) is named as such,
    with what another rank saw."""
    files = sorted(folder.glob("rank*.error"), key=lambda p: p.stat().st_mtime)
    preferred = folder / f"rank{rank}.error"
    if not preferred.exists():  # it ended without a Python exception: it is the cause, not the others' errors
        seen = ""
        if files:
            other_problem = pickle.loads(files[0].read_bytes())[0]
            seen = f" (rank {files[0].stem.removeprefix('rank')} then saw: {other_problem.splitlines()[0][:300]})"
        signal_name = getattr(err, "signal_name", None)
        how = (f"was killed by {signal_name}" if signal_name else
               f"exited with code {err.exit_code}" if getattr(err, "exit_code", None) is not None else f"ended: {err}")
        return ParallelRunError(f"rank {rank} of the context-parallel run {how} without an error of its own, so the "
                                f"run was ended on every rank{seen}",
                                "see the rank's output above (out of memory: use fewer ranks or a smaller image); "
                                "set AOTPACK_DEBUG=1 for tracebacks")
    problem, fix, trace = pickle.loads(preferred.read_bytes())
    if os.environ.get("AOTPACK_DEBUG"):
        problem += "\n" + trace
    return ParallelRunError(f"rank {rank} failed, so the run was ended on every rank: {problem}",
                            fix or "set AOTPACK_DEBUG=1 for the rank's traceback")


# -- serving on ranks ------------------------------------------------------------------------------
class RankPipeline:
    """One rank's `AotpackPipeline`; LoRA switches agree on every rank.

    Every rank parses and checks the set itself (each holds its own slot bank); the outcomes are
    exchanged, and if any rank refused the set, the ranks that took it go back to the previous set,
    so every rank keeps the set it had and raises the same error.
    """

    def __init__(self, served, ctx: RankContext):
        self.served, self.ctx = served, ctx
        self._active = ([], {})

    def __getattr__(self, name):  # pipeline, decode_latents, device, transformer, ...
        return getattr(self.served, name)

    def __call__(self, *args, **kwargs):
        return self.served(*args, **kwargs)

    def set_loras(self, loras=(), **options):
        loras = list(loras)
        result, refusal = None, None
        try:
            result = self.served.set_loras(loras, **options)
        except AotpackError as err:
            refusal = (err.problem, err.fix)
        refusals = [None] * self.ctx.world_size
        dist.all_gather_object(refusals, refusal)
        failed = [(rank, r) for rank, r in enumerate(refusals) if r is not None]
        if failed:
            if refusal is None:  # this rank took the set: go back to the one every rank still has
                previous, previous_options = self._active
                self.served.set_loras(previous, **previous_options)
            rank, (problem, fix) = failed[0]
            raise AotpackError(problem if refusal else f"rank {rank} refused the LoRA set: {problem}", fix)
        self._active = (loras, options)
        return result


def load_rank(ctx: RankContext, package, model: str, revision: str | None = None,
              cuda_graphs: bool | None = None, merge_policy: str = "auto", merge_share: float = 1.0) -> RankPipeline:
    """This rank's pipeline: the package loaded on its device, its transformer joined to the run.
    `cuda_graphs`, `merge_policy` and `merge_share` as for `load_package` (every rank must pass the same values)."""
    from .pipeline import load_package

    served = load_package(package, model, revision=revision, device=str(ctx.device), cuda_graphs=cuda_graphs,
                          merge_policy=merge_policy, merge_share=merge_share)
    attach(served.transformer, ctx.comm)
    return RankPipeline(served, ctx)


def _serve_requests(ctx: RankContext, package, model, revision, requests, cuda_graphs=None, merge_policy="auto",
                    merge_share=1.0):
    from .jobs import JobOutcome, run_request

    served = load_rank(ctx, package, model, revision, cuda_graphs, merge_policy, merge_share)
    outcomes = []
    for index, request in enumerate(requests, start=1):
        if not ctx.is_main:  # rank 0 owns the outputs; the others only take part in the steps
            request = dataclasses.replace(request, out=None, save_latents=None)
        outcome = JobOutcome(index, request)
        try:
            outcome.result = run_request(served, request, index)
        except AotpackError as err:  # the same on every rank (the latents are gathered everywhere)
            outcome.error, outcome.fix = err.problem, err.fix
        outcomes.append(outcome)
    return outcomes


def generate(package, model: str, requests, *, gpus: int, revision: str | None = None,
             device: str | None = None, timeout_s: float | None = None, cuda_graphs: bool | None = None,
             merge_policy: str = "auto", merge_share: float = 1.0):
    """Run `requests` (jobs.Request) with `package` on `gpus` ranks; returns rank 0's JobOutcomes.

    `device` defaults to the package's ("cuda": one GPU per rank, NCCL; "cpu": gloo, for tests);
    `cuda_graphs`, `merge_policy` and `merge_share` as for `load_package` (None: graphs on for GPUs).
    """
    from ..store.manifest import read_manifest
    from ..store.publish import locate_package

    package_dir = locate_package(package)
    manifest = read_manifest(package_dir)
    device = manifest.run_device(device)
    check_parallel_run(manifest, gpus, device)
    return launch(_serve_requests, gpus, str(package_dir), model, revision, list(requests), cuda_graphs,
                  merge_policy, merge_share, device=device, timeout_s=timeout_s)
