"""Custom recipe files and context-parallel runs gone wrong: every refusal is typed, names the value and the fix
and comes before the expensive work; a rank that dies, an interrupted launcher or a taken port never leaves a run
hanging or a rank process running."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from processes import alive

from aotpack.cli import cli
from aotpack.errors import AotpackError, RecipeError

CPU_RECIPE = (Path(__file__).resolve().parents[1] / "aotpack" / "recipes" / "cpu.toml").read_text()
RUN_BOUND_S = 90  # a launch of 2 trivial gloo ranks takes ~5 s on 2 cores


def _recipe(tmp_path: Path, old: str, new: str, *more: str) -> Path:
    """A copy of the cpu recipe with `old` replaced by `new` (and each further pair of `more`)."""
    text = CPU_RECIPE
    for before, after in zip((old, *more[::2]), (new, *more[1::2])):
        assert text.count(before) == 1, before
        text = text.replace(before, after)
    path = tmp_path / "custom.toml"
    path.write_text(text)
    return path


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


# -- recipe files --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, expected", [
    (("[shapes]", "[shape]"), ["shapes.batch is missing", "section 'shape'", "'shapes'"]),
    (("[validation]", "[validaton]"), ["validation.tolerance is missing", "section 'validaton'"]),
    (("batch = [1, 4]", "batchh = [1, 4]"), ["shapes.batch is missing", "key 'shapes.batchh'"]),
    (("[example]\nbatch = 1\nimage_tokens = 64\ntext_tokens = 32\n", "", 'name = "cpu"', 'name = "cpu"\nexample = 5'),
     ["example.batch is missing", "example = 5 is not a table"]),
])
def test_a_misspelled_section_or_key_is_named_with_the_missing_field(tmp_path, changes, expected):
    """`[shape]` for `[shapes]` said only "shapes.batch is missing", though the file has a shapes.batch line."""
    from aotpack.recipes.recipe import load_recipe

    path = _recipe(tmp_path, *changes)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    for text in [*expected, str(path)]:
        assert text in caught.value.problem, caught.value.problem


@pytest.mark.parametrize("old, new, expected", [
    ('layout = "regional"', 'layout = "whole"\nparallel = "ulysses"', "parallel = 'ulysses' needs layout = 'regional'"),
    ('attention = "sdpa"', 'attention = "cudnn"', "attention = 'cudnn' needs a CUDA GPU, but device = 'cpu'"),
    ('attention = "sdpa"', 'attention = "fa3"', "attention = 'fa3' needs a CUDA GPU"),
    ('layout = "regional"', 'layout = "whole"\nbatched_modulation = true', "batched_modulation = true needs"),
    ('name = "cpu"', 'name = "../../elsewhere"', "name = '../../elsewhere' cannot name a target"),
    ('name = "cpu"', 'name = "my h200"', "name = 'my h200' cannot name a target"),
    ("[inductor]", "[inductor]\nmax_autotun = true", "did you mean 'max_autotune'?"),
    ("[inductor]", "[inductor.triton]\ncudagraphs = true", 'write it as "triton.cudagraphs"'),
])
def test_contradictory_or_unbuildable_fields_are_refused_by_parse_naming_the_file(tmp_path, old, new, expected):
    """Each of these passed the recipe check and failed later: after loading the model (ulysses + whole), at the
    first export ("No viable backend" for cudnn on the CPU, with a fix about shape ranges), at the first compile
    (a misspelled Inductor config, with a fix to run the doctor, which said "all checks passed"), at push after
    the whole build (a name that cannot be a folder), or with the default --out outside artifacts/packages."""
    from aotpack.recipes.recipe import load_recipe

    path = _recipe(tmp_path, old, new)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert expected in caught.value.problem and str(path) in caught.value.problem, caught.value.problem
    assert str(path) in caught.value.fix
    doctor = invoke("doctor", "--target", path)  # the doctor reads the same recipe: it fails it too
    assert doctor.exit_code == 1 and expected in doctor.output, doctor.output


def test_valid_inductor_configs_and_names_still_load(tmp_path):
    from aotpack.recipes.recipe import load_recipe

    path = _recipe(tmp_path, '[inductor]', '[inductor]\nmax_autotune = false\n"triton.cudagraphs" = false')
    path.write_text(path.read_text().replace('name = "cpu"', 'name = "my-cpu_2.x"'))
    recipe = load_recipe(path)
    assert recipe.name == "my-cpu_2.x"
    assert recipe.inductor_configs == {"max_autotune": False, "triton.cudagraphs": False}


def test_build_flags_that_contradict_are_refused_before_the_model_loads(tmp_path, monkeypatch):
    from aotpack.builder import build as build_module
    from aotpack.builder.build import apply_overrides
    from aotpack.recipes.recipe import load_recipe

    with pytest.raises(RecipeError, match="needs layout = 'regional'"):
        apply_overrides(load_recipe("cpu"), layout="whole", parallel="ulysses")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for a build that cannot work")

    monkeypatch.setattr(build_module, "load_transformer", no_model)
    started = time.perf_counter()
    result = invoke("build", "--model", "tiny", "--target", "cpu", "--attention", "cudnn", "--out", tmp_path / "p")
    assert result.exit_code == 1, result.output
    assert "attention = 'cudnn' needs a CUDA GPU" in result.output and "fix:" in result.output
    assert not (tmp_path / "p").exists() and time.perf_counter() - started < 30


def test_a_recipe_path_that_does_not_exist_is_named_as_a_missing_file(tmp_path):
    missing = tmp_path / "my-h200.toml"
    for command in (["doctor", "--target", missing],
                    ["build", "--model", "tiny", "--target", missing, "--out", tmp_path / "p"]):
        result = invoke(*command)
        assert result.exit_code == 1 and f"the recipe file '{missing}' does not exist" in result.output, result.output
    assert not (tmp_path / "p").exists()


# -- context-parallel runs -------------------------------------------------------------------------------------
def _rank_dies(ctx, how):
    """Rank 1 dies without a Python error while rank 0 waits for it in a collective."""
    import torch
    import torch.distributed as dist

    if ctx.rank == 1:
        time.sleep(0.5)
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(3)
    dist.all_reduce(torch.zeros(1))
    return "not reached"


def _rank_ok(ctx):
    import torch
    import torch.distributed as dist

    total = torch.ones(1)
    dist.all_reduce(total)
    return int(total.item())


def _rank_waits(ctx, pid_dir):
    """Rank 0 works for a minute; rank 1 waits for it in a collective."""
    import torch
    import torch.distributed as dist

    Path(pid_dir, f"rank{ctx.rank}.pid").write_text(str(os.getpid()))
    if ctx.rank == 0:
        time.sleep(60)
    dist.all_reduce(torch.zeros(1))
    return "finished"


def test_a_rank_that_dies_without_an_error_is_named_not_the_rank_that_saw_it_go(tmp_path):
    """Rank 1 was killed; rank 0 then failed with gloo's "Connection closed by peer" and left its error file before
    it was torn down. The run was reported as "rank 0 failed ... Connection closed by peer"."""
    from torch.multiprocessing.spawn import ProcessExitedException

    from aotpack.runtime.parallel import _rank_error

    seen = "RuntimeError: [pair.cc:553] Connection closed by peer [127.0.0.1]:5516"
    (tmp_path / "rank0.error").write_bytes(pickle.dumps((seen, "", "trace")))
    killed = ProcessExitedException("process 1 terminated with signal SIGKILL", error_index=1, error_pid=1,
                                    exit_code=-9, signal_name="SIGKILL")
    problem = _rank_error(tmp_path, 1, killed).problem
    assert problem.startswith("rank 1 ") and "killed by SIGKILL" in problem, problem
    assert "rank 0 then saw" in problem and "Connection closed" in problem
    exited = ProcessExitedException("process 1 terminated with exit code 3", error_index=1, error_pid=1, exit_code=3)
    assert "rank 1 of the context-parallel run exited with code 3" in _rank_error(tmp_path, 1, exited).problem


@pytest.mark.parametrize("how, expected", [("kill", "killed by SIGKILL"), ("exit", "exited with code 3")])
def test_a_rank_dying_mid_run_ends_the_run_with_a_typed_error_and_no_rank_left(how, expected):
    from aotpack.runtime.parallel import ParallelRunError, launch

    before = set(Path(tempfile.gettempdir()).glob("aotpack-parallel-run-*"))
    started = time.perf_counter()
    with pytest.raises(ParallelRunError) as failed:
        launch(_rank_dies, 2, how, timeout_s=30)
    assert time.perf_counter() - started < RUN_BOUND_S
    assert failed.value.problem.startswith("rank 1 ") and expected in failed.value.problem, failed.value.problem
    assert failed.value.fix
    assert set(Path(tempfile.gettempdir()).glob("aotpack-parallel-run-*")) <= before  # the run's folder went


def test_a_port_taken_between_choosing_and_binding_does_not_fail_the_run(monkeypatch):
    """The ranks used to meet on a port the launcher had chosen and let go: taken meanwhile, the run failed with
    rank 0's EADDRINUSE and a fix that named no fix."""
    from aotpack.runtime import parallel

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setattr(parallel, "_free_port", lambda: taken.getsockname()[1], raising=False)
        assert parallel.launch(_rank_ok, 2, timeout_s=30) == 2


@pytest.mark.parametrize("text", ["abc", "0", "-5", "nan", "inf"])
def test_a_bad_parallel_timeout_setting_is_a_typed_error_before_any_rank_starts(monkeypatch, text):
    from aotpack.runtime import parallel

    monkeypatch.setenv("AOTPACK_PARALLEL_TIMEOUT_S", text)
    monkeypatch.setattr(parallel, "_start_ranks", lambda *a, **k: pytest.fail("ranks started"))
    with pytest.raises(AotpackError) as caught:
        parallel.launch(_rank_ok, 2)
    assert "AOTPACK_PARALLEL_TIMEOUT_S" in caught.value.problem and repr(text) in caught.value.problem
    assert "300" in caught.value.fix
    monkeypatch.setenv("AOTPACK_PARALLEL_TIMEOUT_S", "12.5")
    assert parallel.parallel_timeout() == 12.5


def test_zero_ranks_is_a_typed_error_not_a_division_by_zero():
    from aotpack.errors import PackageMismatchError
    from aotpack.runtime.parallel import check_world_size, launch

    split = SimpleNamespace(recipe={"parallel": "ulysses"}, model={"config": {"num_attention_heads": 2}})
    for count in (0, -2):
        with pytest.raises(PackageMismatchError, match="--gpus 1 or more"):
            check_world_size(split, count)
        with pytest.raises(AotpackError, match="1 or more"):
            launch(_rank_ok, count)


_LAUNCHER = """
import sys
sys.path[:0] = [{tests!r}, {root!r}]  # this test module (the ranks' function) and the aotpack beside it
import test_recipe_parallel_errors as t
from aotpack.runtime.parallel import launch
print(launch(t._rank_waits, 2, {pid_dir!r}, timeout_s=120))
"""


@pytest.mark.parametrize("sig, sigint", [(signal.SIGINT, signal.SIG_DFL), (signal.SIGTERM, signal.SIG_IGN),
                                         (signal.SIGKILL, signal.SIG_IGN)])
def test_ranks_never_outlive_an_interrupted_or_killed_launcher(tmp_path, sig, sigint):
    """A SIGINT reaching the launcher alone (`kill -INT`) ended it only once the ranks had finished the run. Started
    with SIGINT ignored (`aotpack run ... &` in a script), SIGTERM (`timeout`, `kill`) or SIGKILL ended the launcher
    at once and left both ranks running on, rank 0 writing its outputs, until the run's end: torch's parent-death
    signal for ranks is SIGINT. Now an interrupt or SIGTERM ends the ranks first (exit 130), and a rank dies with
    its launcher."""
    code = _LAUNCHER.format(tests=str(Path(__file__).parent), root=str(Path(__file__).parents[1]), pid_dir=str(tmp_path))
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))
    try:
        deadline = time.monotonic() + RUN_BOUND_S
        while not all((tmp_path / f"rank{r}.pid").is_file() for r in (0, 1)):
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[0]
            time.sleep(0.2)
        time.sleep(1.0)  # rank 1 is inside its collective
        ranks = [int((tmp_path / f"rank{r}.pid").read_text()) for r in (0, 1)]
        signaled = time.monotonic()
        launcher.send_signal(sig)
        output = launcher.communicate(timeout=40)[0].decode(errors="replace")
        assert launcher.returncode != 0 and "finished" not in output
        while any(map(alive, ranks)) and time.monotonic() - signaled < 40:
            time.sleep(0.2)
        assert not [pid for pid in ranks if alive(pid)], "a rank outlived its launcher"
        assert time.monotonic() - signaled < 30  # not the minute rank 0 would have worked on
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid_file in tmp_path.glob("rank*.pid"):  # never leave a rank of this test behind
            pid = int(pid_file.read_text())
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        from aotpack.runtime.process_folders import remove_orphans

        remove_orphans("parallel-run")  # a killed launcher's folder (the next launch would sweep it)
