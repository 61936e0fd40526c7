"""Jobs are isolated (issue 15 item 4): every line is validated before the first job runs; at run time a
failing job is reported and the others still run; a summary (and `--report FILE.json`) says which
failed and why; the exit code is 1 when any failed."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from aotpack.cli import cli

COMMON = {"prompt": "a cat", "seed": 1, "steps": 1, "height": 64, "width": 64, "max_sequence_length": 16}


def write_jobs(path, jobs):
    lines = [{**COMMON, **job} for job in jobs]
    for line in lines:
        if "num_inference_steps" in line:  # a line in diffusers' names only
            del line["steps"]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_every_line_is_validated_before_the_first_job_runs(tiny_package, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"out": str(tmp_path / "first.png")},
        {"height": 8, "width": 8, "out": str(tmp_path / "second.png")},
        {"loras": [["x.safetensors", float("nan")]]},
        {"loras": {"x.safetensors": 0.5}},
        {"stpes": 3},
    ])
    result = invoke("run", tiny_package, "--requests", jobs)
    assert result.exit_code == 1
    assert "4 of the jobs" in result.output and "none was run" in result.output
    for line in (2, 3, 4, 5):
        assert f"jobs.jsonl:{line}" in result.output
    assert "did you mean 'steps'" in result.output and "is a dict, not a list" in result.output
    assert not (tmp_path / "first.png").exists()  # line 1 is fine, but nothing ran


def test_a_non_utf8_jobs_file_is_a_typed_error_with_the_line(tiny_package, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_bytes(json.dumps(COMMON).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    result = invoke("run", tiny_package, "--requests", jobs)
    assert result.exit_code == 1 and "jobs.jsonl:2: not UTF-8" in result.output and "fix:" in result.output


def test_a_jobs_file_with_a_utf8_bom_reads_as_without_it(tmp_path):
    from aotpack.runtime.jobs import read_jobs

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_bytes(b"\xef\xbb\xbf" + json.dumps(COMMON).encode() + b"\n")  # Windows editors save one
    assert read_jobs(jobs)[0].prompt == COMMON["prompt"]


def test_a_missing_local_lora_refuses_the_jobs_before_the_package_loads(tiny_package, demo_loras, tmp_path,
                                                                          monkeypatch):
    from aotpack.runtime import pipeline

    monkeypatch.setattr(pipeline, "load_package", lambda *a, **k: pytest.fail("loaded before the checks"))
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"loras": [[str(demo_loras["tiny-style-attn"]), 0.8]], "out": str(tmp_path / "a.png")},
        {"loras": [[str(tmp_path / "missing.safetensors"), 1.0]], "out": str(tmp_path / "b.png")}])
    result = invoke("run", tiny_package, "--requests", jobs)
    assert result.exit_code == 1 and "missing.safetensors does not exist" in result.output, result.output
    assert not (tmp_path / "a.png").exists()


def test_jobs_writing_the_same_file_are_refused(tiny_package, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"out": str(tmp_path / "a.png")}, {"out": str(tmp_path / "a.png")}])
    result = invoke("run", tiny_package, "--requests", jobs)
    assert result.exit_code == 1 and "which line 1 writes too" in result.output


def test_a_failing_job_does_not_stop_the_others(tiny_package, demo_loras, big_lora, tmp_path):
    outputs = [tmp_path / f"job{i}.png" for i in range(4)]
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"loras": [[str(demo_loras["tiny-style-attn"]), 0.8]], "out": str(outputs[0])},
        {"loras": [[str(broken), 1.0]], "out": str(outputs[1])},  # fails at run time, when it is parsed
        {"loras": [[str(big_lora), 100]], "out": str(outputs[2])},  # NaN latents: an error, no image
        # diffusers' names mean the same as the short ones
        {"num_inference_steps": 2, "guidance_scale": 2.0, "height": 100, "width": 72, "out": str(outputs[3])},
    ])
    report = tmp_path / "reports" / "report.json"
    result = invoke("run", tiny_package, "--requests", jobs, "--report", report)
    assert result.exit_code == 1, result.output
    assert outputs[0].is_file() and outputs[3].is_file()
    assert not outputs[1].exists() and not outputs[2].exists()  # no black PNG for the NaN job
    assert Image.open(outputs[3]).size == (64, 96)  # 72x100 is produced as 64x96, and said so
    assert "produced as 64x96" in result.output
    assert "summary: 2 ok, 2 failed" in result.output
    assert "request 2: FAILED: adapter" in result.output and "broken.safetensors" in result.output
    assert "request 3: FAILED: the generation produced" in result.output
    data = json.loads(report.read_text())
    assert (data["ok"], data["failed"]) == (2, 2)
    assert [job["ok"] for job in data["jobs"]] == [True, False, False, True]
    assert "not a readable safetensors file" in data["jobs"][1]["error"] and data["jobs"][1]["fix"]
    assert "NaN/Inf" in data["jobs"][2]["error"]
    assert data["jobs"][3]["size"] == [64, 96] and data["jobs"][3]["image"] == str(outputs[3])


def test_all_jobs_ok_exit_0_and_the_old_flag_still_works(tiny_package, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"out": str(tmp_path / "a.png")}, {"seed": 2}])
    report = tmp_path / "report.json"
    result = invoke("run", tiny_package, "--jobs", jobs, "--report", report)  # --jobs: deprecated alias
    assert result.exit_code == 0, result.output
    assert "--jobs is deprecated; use --requests" in result.output
    assert "summary: 2 ok, 0 failed" in result.output
    assert json.loads(report.read_text())["ok"] == 2


def test_the_report_path_is_checked_before_any_work(tiny_package, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"out": str(tmp_path / "a.png")}])
    result = invoke("run", tiny_package, "--requests", jobs, "--report", tmp_path / "report.txt")
    assert result.exit_code == 1 and "--report" in result.output and not (tmp_path / "a.png").exists()


def test_a_missing_or_directory_jobs_file_is_named(tiny_package, tmp_path):
    assert "does not exist" in invoke("run", tiny_package, "--requests", tmp_path / "nope.jsonl").output
    assert "is a directory" in invoke("run", tiny_package, "--requests", tmp_path).output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    result = invoke("run", tiny_package, "--requests", empty)
    assert result.exit_code == 1 and "holds no requests" in result.output
