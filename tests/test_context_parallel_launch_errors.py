"""Context-parallel launches refused or interrupted before they run: `aotpack bench context-parallel --gpus N`
refuses a count it cannot run before it loads anything or starts a rank (the checks of `aotpack run --gpus`),
and a Ctrl-C while the launcher starts its rank processes leaves none of them running."""

from __future__ import annotations

import multiprocessing.process
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from processes import alive

from aotpack.cli import cli

GONE_BOUND_S = 20  # a leaked rank waits for its peers for the run's timeout (60 s here)


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail the test if the bench gets past its checks: model config, LoRA files, launch, any process start."""
    from aotpack.bench import context_parallel
    from aotpack.runtime import parallel

    def refuse(*args, **kwargs):
        raise AssertionError("the bench went on past a --gpus value it cannot run")

    for owner, name in ((context_parallel, "load_transformer_config"), (context_parallel, "write_bench_loras"),
                        (parallel, "launch"), (multiprocessing.process.BaseProcess, "start")):
        monkeypatch.setattr(owner, name, refuse)


def bench(package, tmp_path, *gpus):
    result = CliRunner().invoke(cli, ["bench", "context-parallel", "--package", str(package), "--model", "tiny",
                                      "--out", str(tmp_path / "out"), "--gpus", *map(str, gpus)])
    assert "Traceback" not in result.output and "AssertionError" not in result.output, result.output
    assert not (tmp_path / "out").exists()
    return result


# -- bench --gpus ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gpus, named", [((1,), "--gpus 1"), ((0,), "--gpus 0"), ((-2,), "--gpus -2"),
                                         ((2, 1), "--gpus 1")])
def test_a_bench_rank_count_below_2_is_a_usage_error(split_package, tmp_path, nothing_runs, gpus, named):
    """--gpus 1 ran the 1-rank measurement twice (as "1" and as "N"); --gpus 0 ran 1 rank then failed in launch."""
    result = bench(split_package, tmp_path, *gpus)
    assert result.exit_code == 2, result.output
    assert f"{named}:" in result.output and "fix: pass --gpus 2 or more" in result.output, result.output


def test_a_bench_rank_count_the_package_cannot_use_is_refused_before_anything_loads(
        split_package, tiny_package, tmp_path, nothing_runs):
    """Both were found only after loading the config, writing the LoRA, and a whole 1-rank run (a rank raising
    `PackageMismatchError` on N ranks, as ParallelRunError)."""
    heads = bench(split_package, tmp_path, 2, 4)  # tiny: 2 heads; the valid 2 does not run before 4 is refused
    assert heads.exit_code == 1, heads.output
    assert "error: 2 attention heads cannot be divided over 4 ranks" in heads.output, heads.output
    assert "fix: use one of --gpus 2\n" in heads.output, heads.output  # not 1: the bench refuses it
    unsplit = bench(tiny_package, tmp_path, 2)
    assert unsplit.exit_code == 1, unsplit.output
    assert "not built for context parallelism, so it cannot run on 2 GPUs" in unsplit.output, unsplit.output
    assert "--parallel ulysses" in unsplit.output and "--gpus 1" not in unsplit.output, unsplit.output


def test_more_bench_ranks_than_visible_gpus_are_refused_before_anything_loads(split_package, tmp_path, nothing_runs,
                                                                             monkeypatch):
    """On a one-GPU machine the bench ran its 1-rank pass, then launch refused the N ranks."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # this CPU machine, seen as one with 1 GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    result = bench(split_package, tmp_path, 2)
    assert result.exit_code == 1, result.output
    assert "error: 2 GPUs asked for, 1 visible" in result.output, result.output
    assert "fix: run on a machine with that many CUDA GPUs" in result.output, result.output

    from aotpack.runtime.parallel import check_parallel_run
    from aotpack.store.manifest import read_manifest

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_parallel_run(read_manifest(split_package), 2, "cuda", fewest=2)  # the same check lets 2 of 2 through


# -- Ctrl-C while ranks start ----------------------------------------------------------------------------------
def _rank_waits(ctx):
    """Waits for every rank in a collective (rank 1 never comes: it is never started or interrupted)."""
    import torch
    import torch.distributed as dist

    dist.all_reduce(torch.zeros(1))
    return "finished"


@pytest.mark.parametrize("when", ["before rank 1 is forked", "after rank 1 is forked, inside its start"])
def test_ctrl_c_while_the_ranks_start_leaves_no_rank_running(monkeypatch, when):
    """The launcher started every rank before it held any of them: a Ctrl-C between two starts (or inside one,
    after the fork) unwound with the started ranks untracked, and rank 0 waited on for rank 1 until the run's
    timeout (300 s by default), then held the launcher's exit."""
    from multiprocessing import popen_spawn_posix

    from aotpack.runtime.parallel import launch

    original, forked = popen_spawn_posix.Popen._launch, []

    def launch_rank(self, process_obj):
        if forked and when.startswith("before"):
            raise KeyboardInterrupt
        original(self, process_obj)
        forked.append(self.pid)
        if len(forked) == 2:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C reaching the launcher before `start` returns

    monkeypatch.setattr(popen_spawn_posix.Popen, "_launch", launch_rank)
    # Python's Ctrl-C handler, as an interactive launcher has it: a suite started in the background by a script
    # (`nohup bash .ci/run &`) inherits SIGINT ignored, and the signal above would do nothing
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    before = set(Path(tempfile.gettempdir()).glob("aotpack-parallel-run-*"))
    try:
        with pytest.raises(KeyboardInterrupt):
            launch(_rank_waits, 2, timeout_s=60)
        monkeypatch.undo()
        assert len(forked) == (1 if when.startswith("before") else 2)
        deadline = time.monotonic() + GONE_BOUND_S
        while any(map(alive, forked)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in forked if alive(pid)], "a rank outlived the interrupted launch"
        assert set(Path(tempfile.gettempdir()).glob("aotpack-parallel-run-*")) <= before  # the run's folder went
    finally:
        signal.signal(signal.SIGINT, previous)
        for pid in forked:  # never leave a rank of this test behind
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
