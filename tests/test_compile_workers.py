"""The build's compile stage: each program goes to a worker as soon as it is exported, saved without its weights'
bytes (6.45 GB for an h200 package's modulation program); the build's own process compiles from the back of the
queue once the exports are done, while the workers take from the front; every job compiles once, and a failure on
either side (or in an export) ends the other and leaves no temporary file."""

import io
import subprocess
import time

import pytest
import torch

from aotpack.builder import compile as compile_stage
from aotpack.builder.compile import CompileTime, compile_programs
from aotpack.errors import ExportError
from aotpack.progress import Progress


def exported_linear(features: int):
    module = torch.nn.Linear(features, features)
    return torch.export.export(module, (torch.randn(2, features),))


@pytest.fixture
def started(monkeypatch) -> list:
    """The worker processes the compile stage starts, in order."""
    processes = []

    class RecordedPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            processes.append(self)

    monkeypatch.setattr(subprocess, "Popen", RecordedPopen)
    return processes


def wait_for_a_worker(started: list, seconds: float = 20) -> None:
    deadline = time.perf_counter() + seconds
    while not started and time.perf_counter() < deadline:
        time.sleep(0.05)


def test_every_job_compiles_once_here_or_in_a_worker(tmp_path, monkeypatch):
    here = []

    def fake_compile_here(exported, package_path, inductor_configs):  # the workers compile for real
        here.append(package_path.name)
        if len(here) == 1:
            time.sleep(1.0)  # long enough for the worker thread to hand the first job to a worker process
        return CompileTime(0.0, 0.0)

    monkeypatch.setattr(compile_stage, "compile_program", fake_compile_here)
    names = ["first", "big", "other", "last"]
    jobs = [(name, exported_linear(256 if name == "big" else 4), tmp_path / f"{name}.pt2") for name in names]
    said = io.StringIO()
    seconds = compile_programs(jobs, workers=2, inductor_configs={}, attention="sdpa", needs_torchao=False,
                               report=Progress(stream=said))
    assert "4 programs saved for the workers in" in said.getvalue()
    assert "GB of weights left out" in said.getvalue()
    assert sorted(seconds) == sorted(names)
    assert here == ["last.pt2", "other.pt2", "big.pt2"]  # from the back, while the worker took the first job
    assert [p.name for p in tmp_path.iterdir()] == ["first.pt2"]  # a real package, no temporary file
    in_worker = seconds["first"]
    # the worker's timing came back whole: wall time, its thread's CPU time and torch's phase timers
    assert 0 < in_worker.seconds < in_worker.process_seconds  # the worker's start and program load come on top
    assert 0 < in_worker.cpu_seconds <= in_worker.seconds + 1
    assert "compile_fx_inner" in in_worker.phases
    assert all(0 < phase <= in_worker.seconds + 1 for phase in in_worker.phases.values())
    # and its own stages before the compile: imports (torch at least) and the saved program's load
    stages = in_worker.worker_stages
    assert sorted(stages) == ["imports", "load"] and stages["imports"] > 0.2 and stages["load"] > 0
    assert in_worker.seconds + sum(stages.values()) < in_worker.process_seconds
    said = in_worker.summary()
    assert f"(its worker process {in_worker.process_seconds:.1f} s, imports {stages['imports']:.1f}, load " in said
    assert "start and exit" in said


def test_a_failed_compile_here_stops_the_workers_and_removes_their_files(tmp_path, monkeypatch, started):
    compiled_here = []

    def failing_compile(exported, package_path, inductor_configs):
        compiled_here.append(package_path.name)
        time.sleep(1.0)  # a worker process has started by now
        raise ExportError("AOTInductor failed to compile last.pt2", "run `aotpack doctor`")

    monkeypatch.setattr(compile_stage, "compile_program", failing_compile)
    small = exported_linear(4)
    jobs = [("small", small, tmp_path / "small.pt2"), ("big", exported_linear(64), tmp_path / "big.pt2"),
            ("last", small, tmp_path / "last.pt2")]
    report = Progress(enabled=False)
    with pytest.raises(ExportError, match="last.pt2"):
        compile_programs(jobs, workers=2, inductor_configs={}, attention="sdpa", needs_torchao=False, report=report)
    assert compiled_here == ["last.pt2"]  # the queue's last, in this process, which took no other job after failing
    assert started and all(process.poll() is not None for process in started)  # killed, not left compiling
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no saved program, job spec, log or package left


def test_a_failed_worker_is_reported_with_its_program_and_leaves_no_file(tmp_path, monkeypatch):
    # this process's compile is faked, slow enough for the worker thread to take the first job
    monkeypatch.setattr(compile_stage, "compile_program",
                        lambda exported, package_path, configs: time.sleep(0.5) or CompileTime(0.0, 0.0))
    jobs = [("small", exported_linear(4), tmp_path / "small.pt2"), ("big", exported_linear(64), tmp_path / "big.pt2")]
    said = io.StringIO()
    with pytest.raises(ExportError, match="compiling small failed in its worker process") as caught:
        # an Inductor config that does not exist: AOTInductor refuses it in the worker (this process's compile is faked)
        compile_programs(jobs, workers=2, inductor_configs={"no_such_inductor_config": 1}, attention="sdpa",
                         needs_torchao=False, report=Progress(stream=said))
    assert "compiling small failed in its worker process; the build stops" in said.getvalue()  # said when it failed
    assert "no_such_inductor_config" in caught.value.problem and "--workers 1" in caught.value.fix
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_failed_worker_ends_the_other_workers_and_their_job_files(tmp_path, monkeypatch):
    # this process's compile is faked and slow enough for the worker thread to take both other jobs first
    monkeypatch.setattr(compile_stage, "compile_program", lambda exported, package_path, configs: time.sleep(1.0) or CompileTime(1.0, 0.0))
    small = exported_linear(4)
    jobs = [("small", small, tmp_path / "small.pt2"), ("other", small, tmp_path / "other.pt2"),
            ("big", exported_linear(64), tmp_path / "big.pt2")]
    with pytest.raises(ExportError, match="failed in its worker process"):  # both workers fail; the first to end
        compile_programs(jobs, workers=3, inductor_configs={"no_such_inductor_config": 1}, attention="sdpa",
                         needs_torchao=False, report=Progress(enabled=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the other worker's job spec and log went with it


def test_a_job_starts_in_a_worker_while_the_next_one_exports(tmp_path, monkeypatch, started):
    monkeypatch.setattr(compile_stage, "compile_program", lambda exported, package_path, configs: CompileTime(0.0, 0.0))
    running_at_second_export = []

    def exports():  # the build's exports, the second lasting until a worker runs the first (<= 20 s)
        yield "first", exported_linear(4), tmp_path / "first.pt2"
        wait_for_a_worker(started)
        running_at_second_export.append(bool(started) and started[0].poll() is None)
        yield "second", exported_linear(4), tmp_path / "second.pt2"

    seconds = compile_programs(exports(), workers=2, inductor_configs={}, attention="sdpa", needs_torchao=False,
                               report=Progress(enabled=False))
    assert running_at_second_export == [True]  # the first program compiled while the second was exported
    assert sorted(seconds) == ["first", "second"] and seconds["first"].process_seconds is not None
    assert [p.name for p in tmp_path.iterdir()] == ["first.pt2"]


def test_a_failed_export_ends_the_running_workers_and_their_files(tmp_path, started):
    def exports():
        yield "first", exported_linear(4), tmp_path / "first.pt2"
        wait_for_a_worker(started)
        raise ExportError("torch.export failed on the single_block region", "run with AOTPACK_DEBUG=1")

    with pytest.raises(ExportError, match="single_block region"):
        compile_programs(exports(), workers=3, inductor_configs={}, attention="sdpa", needs_torchao=False,
                         report=Progress(enabled=False))
    assert started and all(process.poll() is not None for process in started)  # killed, not left compiling
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_one_worker_compiles_each_program_here_as_its_export_ends(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(compile_stage, "compile_program", lambda exported, package_path, configs:
                        events.append(f"compile {package_path.stem}") or CompileTime(0.0, 0.0))

    def exports():
        for name in ("first", "second"):
            events.append(f"export {name}")
            yield name, exported_linear(4), tmp_path / f"{name}.pt2"

    seconds = compile_programs(exports(), workers=1, inductor_configs={}, attention="sdpa", needs_torchao=False,
                               report=Progress(enabled=False))
    assert events == ["export first", "compile first", "export second", "compile second"]
    assert sorted(seconds) == ["first", "second"] and list(tmp_path.iterdir()) == []  # no file saved for a worker


def test_a_worker_timing_is_read_past_lines_printed_after_it():
    timing = CompileTime(12.5, 3.25, {"compile_file": 7.0})
    log = f"warning: something\n{timing.to_json()}\nan atexit message\n"
    assert CompileTime.from_worker_log("epilogue", log) == timing
    with pytest.raises(ExportError, match="the worker compiling epilogue ended without reporting its timing"):
        CompileTime.from_worker_log("epilogue", "only a warning\n")
