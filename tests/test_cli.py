"""The command line's contract (issues 14 item 4 and 15 item 5): exit 1 for runtime errors, 2 for usage
errors, 130 for Ctrl-C, one message and no traceback unless AOTPACK_DEBUG=1; distinct flag names; the
model recorded in the package by default; `bench` as a real group; logging with --quiet/--verbose;
narrow warning filters; unknown recipe keys refused; doctor catching a recipe that cannot build here;
and a seeded fuzz over jobs lines."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from aotpack.cli import cli
from aotpack.errors import RecipeError

AOTPACK = [sys.executable, "-m", "aotpack"]
COMMON = {"prompt": "a cat", "seed": 1, "steps": 1, "height": 64, "width": 64, "max_sequence_length": 16}
CPU_RECIPE = (Path(__file__).resolve().parents[1] / "aotpack" / "recipes" / "cpu.toml").read_text()


def invoke(*args, **kwargs):
    result = CliRunner().invoke(cli, [str(a) for a in args], **kwargs)
    assert "Traceback" not in result.output, result.output
    return result


# -- exit codes and messages ---------------------------------------------------------------------------


def test_float_options_refuse_nan_and_infinity_as_usage_errors(tmp_path):
    """nan passes click's FloatRange bounds (every comparison with it is False) and inf passes a lower bound: each
    float option of run and serve refuses both before anything loads, naming the option."""
    options = {"run": ["--guidance", "--merge-share"],
               "serve": ["--max-wait", "--request-timeout", "--shutdown-timeout", "--cache-gb", "--merge-share"]}
    for command, names in options.items():
        for name in names:
            for value in ("nan", "inf", "1e999"):
                result = invoke(command, tmp_path, name, value)
                assert result.exit_code == 2, (command, name, value, result.output)
                assert name in result.output and ("not a finite number" in result.output
                                                  or "is not in the range" in result.output)
            assert "nan is not a finite number" in invoke(command, tmp_path, name, "nan").output
    # a finite value parses: the run gets as far as the missing package (a runtime error, exit 1)
    assert invoke("run", tmp_path / "missing", "--prompt", "a cat", "--guidance", "4.5").exit_code == 1


def test_runtime_errors_exit_1_with_the_fix_and_usage_errors_exit_2(tmp_path):
    missing = invoke("inspect", tmp_path / "nope")
    assert missing.exit_code == 1 and missing.output.startswith("error: ") and "fix: " in missing.output
    assert invoke("run", tmp_path, "--steps", "many").exit_code == 2  # click: not an integer
    assert invoke("run", tmp_path, "--no-such-flag").exit_code == 2
    both = invoke("run", tmp_path / "nope", "--prompt", "x", "--requests", "x.jsonl")
    assert both.exit_code == 2 and "exactly one of --prompt and --requests" in both.output
    assert invoke("bench", "no-such-part").exit_code == 2


def test_unexpected_errors_are_one_line_and_ctrl_c_exits_130(monkeypatch, tmp_path):
    from aotpack.store import publish

    def broken(*args, **kwargs):
        raise ValueError("something internal")

    monkeypatch.setattr(publish, "locate_package", broken)
    result = invoke("inspect", tmp_path)
    assert result.exit_code == 1
    assert result.output.strip() == ("error: unexpected ValueError: something internal "
                                     "(set AOTPACK_DEBUG=1 for the traceback)")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(publish, "locate_package", interrupted)
    assert invoke("inspect", tmp_path).exit_code == 130


def test_the_installed_command_shows_a_traceback_only_with_aotpack_debug(tmp_path):
    env = {**os.environ, "AOTPACK_DEBUG": ""}
    plain = subprocess.run(AOTPACK + ["inspect", str(tmp_path / "nope")], capture_output=True, text=True, env=env, check=False,
                           timeout=120)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr and "error: " in plain.stderr
    debug = subprocess.run(AOTPACK + ["inspect", str(tmp_path / "nope")], capture_output=True, text=True,
                           env={**env, "AOTPACK_DEBUG": "1"}, timeout=120, check=False)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    usage = subprocess.run(AOTPACK + ["run"], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert usage.returncode == 2 and "Missing argument" in usage.stderr


# -- flags ---------------------------------------------------------------------------------------------

def test_build_needs_a_model_and_takes_workers(monkeypatch, tmp_path):
    from aotpack.builder import build

    missing = invoke("build", "--target", "cpu")
    assert missing.exit_code == 2 and "Missing option '--model'" in missing.output
    calls = []
    monkeypatch.setattr(build, "build_package", lambda *a, **kw: calls.append(kw) or tmp_path)
    assert invoke("build", "--model", "tiny", "--workers", "3").exit_code == 0
    old = invoke("build", "--model", "tiny", "--jobs", "2")  # hidden, deprecated alias
    assert old.exit_code == 0 and "build --jobs is deprecated; use --workers" in old.output
    assert [c["compile_workers"] for c in calls] == [3, 2]
    assert invoke("build", "--model", "tiny", "--workers", "0").exit_code == 2
    assert invoke("build", "--model", "tiny", "--target", "h200", "--attention", "cudnn").exit_code == 0
    assert calls[-1]["attention"] == "cudnn" and calls[0]["attention"] is None  # None: the recipe's own
    bad = invoke("build", "--model", "tiny", "--attention", "xformers")
    assert bad.exit_code == 2 and "'xformers'" in bad.output and "cudnn_fp8" in bad.output
    help_text = invoke("build", "--help").output
    assert "--workers" in help_text and "--jobs" not in help_text
    run_help = invoke("run", "--help").output
    assert "--requests" in run_help and "--jobs" not in run_help and "--merge" in run_help


def test_run_defaults_to_the_model_recorded_in_the_package(tiny_package, tmp_path):
    out = tmp_path / "a.png"
    result = invoke("run", tiny_package, "--prompt", "a cat", "--steps", 1, "--height", 64, "--width", 64,
                    "--max-sequence-length", 16, "--out", out)
    assert result.exit_code == 0, result.output
    assert "model: tiny (recorded in the package manifest" in result.output and out.is_file()
    quiet = invoke("--quiet", "run", tiny_package, "--model", "tiny", "--prompt", "a cat", "--steps", 1,
                   "--height", 64, "--width", 64, "--max-sequence-length", 16)
    assert quiet.exit_code == 0 and "==>" not in quiet.output and "model:" not in quiet.output
    assert "==> load" in result.output  # progress goes through logging, shown at the default level


def test_run_merge_passes_merge_to_set_loras(tiny_package, demo_loras, monkeypatch):
    from aotpack.runtime.pipeline import AotpackPipeline

    from aotpack.runtime.merge_policy import MergePolicy

    seen = []
    original = AotpackPipeline.set_loras

    def spy(self, loras=(), **kwargs):
        result = original(self, loras, **kwargs)
        seen.append((kwargs["merge"], self.transformer.lora_modes.auto.policy, bool(self.transformer.merged_blocks)))
        return result

    monkeypatch.setattr(AotpackPipeline, "set_loras", spy)
    args = ["run", tiny_package, "--prompt", "a cat", "--steps", 1, "--height", 64, "--width", 64,
            "--max-sequence-length", 16, "--lora", f"{demo_loras['tiny-style-attn']}:0.5"]
    assert invoke(*args, "--merge").exit_code == 0
    assert invoke(*args).exit_code == 0
    assert invoke(*args, "--no-merge", "--merge-policy", "always").exit_code == 0
    assert invoke(*args, "--merge", "--merge-share", 0.5).exit_code == 0  # half the blocks folded, half in slots
    never, always = MergePolicy(None), MergePolicy(0)  # "auto" on the CPU is never: its costs were not measured
    assert seen == [(True, never, False), (None, never, False), (False, always, False),
                    (True, MergePolicy(None, 0.5), True)]
    bad = invoke(*args, "--merge-policy", "sometimes")
    assert bad.exit_code == 2 and "'sometimes' is not one of" in bad.output
    bad = invoke(*args, "--merge-share", 0)
    assert bad.exit_code == 2 and "--merge-share" in bad.output and "0<x<=1" in bad.output


def test_cuda_graphs_on_a_cpu_package_fail_with_the_fix(tiny_package):
    args = ["run", tiny_package, "--prompt", "a cat", "--steps", 1, "--height", 64, "--width", 64,
            "--max-sequence-length", 16, "--cuda-graphs"]
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert "CUDA graphs need a CUDA device" in result.output and "drop --cuda-graphs" in result.output


def test_bench_is_a_group_whose_parts_show_their_options():
    listing = invoke("bench", "--help")
    assert listing.exit_code == 0
    for part in ("compare", "cold-start", "variants", "serve", "report"):
        assert f"  {part} " in listing.output
    part = invoke("bench", "variants", "--help")  # argparse prints the part's options and exits 0
    assert part.exit_code == 0 and "Usage: " in part.output and "--variant" in part.output
    result = subprocess.run(AOTPACK + ["bench", "variants", "--help"], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0 and "Usage: " in result.stdout and "--variant" in result.stdout


# -- logging and warnings ------------------------------------------------------------------------------

def test_library_warnings_are_filtered_narrowly_not_globally():
    from aotpack.cli.output import quiet_libraries

    with warnings.catch_warnings():
        warnings.resetwarnings()
        quiet_libraries()
        for action, message, category, module, lineno in warnings.filters:
            if action == "ignore":
                assert module is not None and module.pattern, (category, module)  # scoped to named modules
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            quiet_libraries()
            warnings.warn("user code still warns", UserWarning, stacklevel=1)
        assert [str(w.message) for w in caught] == ["user code still warns"]


def test_progress_uses_logging(caplog):
    import logging

    from aotpack.progress import Progress

    with caplog.at_level(logging.INFO, logger="aotpack"), Progress(enabled=True).stage("step"):
        pass
    assert [r.name for r in caplog.records] == ["aotpack.progress", "aotpack.progress"]
    assert caplog.records[0].getMessage() == "==> step ..."


# -- recipes and doctor --------------------------------------------------------------------------------

@pytest.mark.parametrize("line, key, suggestion", [
    ("max_rnak = 4", "max_rnak", "max_rank"), ("quantisation = 'none'", "quantisation", "quantization"),
    ("[shapes.extra]\nx = 1", "shapes.extra", None), ("[validaton]\ntolerance = 1.0", "validaton", None),
])
def test_unknown_recipe_keys_are_refused_by_name(tmp_path, line, key, suggestion):
    from aotpack.recipes.recipe import load_recipe

    text = CPU_RECIPE.replace("[shapes]", f"{line}\n[shapes]", 1) if "[" not in line else CPU_RECIPE + f"\n{line}\n"
    path = tmp_path / "typo.toml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=f"unknown field '{key}'") as info:
        load_recipe(path)
    if suggestion:
        assert f"did you mean '{suggestion}'" in info.value.problem
    result = invoke("build", "--model", "tiny", "--target", path, "--out", tmp_path / "pkg")
    assert result.exit_code == 1 and key in result.output and not (tmp_path / "pkg").exists()


def test_inductor_table_keys_stay_free(tmp_path):
    from aotpack.recipes.recipe import load_recipe

    path = tmp_path / "ok.toml"
    path.write_text(CPU_RECIPE + '\n"max_autotune" = false\n')  # under [inductor], the last table
    assert load_recipe(path).inductor_configs == {"max_autotune": False}


@pytest.mark.parametrize("device, arch, status", [("cpu", "", "fail"), ("cuda", "sm_80", "fail"),
                                                  ("cuda", "sm_89", "ok"), ("cuda", "sm_90a", "ok")])
def test_doctor_fails_an_fp8_recipe_that_cannot_build(tmp_path, device, arch, status):
    from aotpack.machine.doctor import check_quantization
    from aotpack.recipes.recipe import load_recipe

    path = tmp_path / "fp8.toml"
    path.write_text(CPU_RECIPE.replace('device = "cpu"', f'device = "{device}"').replace(
        'gpu_arch = ""', f'gpu_arch = "{arch}"').replace('quantization = "none"', 'quantization = "fp8_rowwise"'))
    assert check_quantization(load_recipe(path)).status == status


def test_doctor_command_fails_an_fp8_cpu_recipe(tmp_path):
    path = tmp_path / "cpu-fp8.toml"
    path.write_text(CPU_RECIPE.replace('quantization = "none"', 'quantization = "fp8_rowwise"'))
    result = invoke("doctor", "--target", path)
    assert result.exit_code == 1 and "FAIL  quantization" in result.output and "sm_89" in result.output


# -- fuzz: jobs lines ----------------------------------------------------------------------------------

_VALUES = [0, -1, 1, 2, 2.5, 1e309, -1e309, 2**63, 2**64, 10**30, "", "x", "64", None, True, False, [], {},
           [1, 2], {"a": 1}, "nan", 1e-300, 64, 100, 72, 16, 512, 513, 8, 7]


def _mutate(rng: random.Random, tmp_path: Path, demo_loras) -> dict:
    line = dict(COMMON)
    for _ in range(rng.randint(1, 3)):
        field = rng.choice(["prompt", "seed", "steps", "height", "width", "guidance", "max_sequence_length",
                            "loras", "out", "save_latents", "fit", "merge", "num_inference_steps",
                            "guidance_scale", "bogus", "delete"])
        if field == "delete":
            line.pop(rng.choice(sorted(line)), None)
        elif field == "loras":
            scale = rng.choice([0.5, -1, math.nan, math.inf, 1e309, "0.5", 101, None])
            line["loras"] = rng.choice([[[str(demo_loras["tiny-style-attn"]), scale]],
                                        {str(demo_loras["tiny-style-attn"]): 1},
                                        [f"{demo_loras['tiny-style-mlp']}:{scale}"],
                                        [[str(tmp_path / "missing.safetensors"), 1]], "x", [[1]]])
        elif field in ("out", "save_latents"):
            line[field] = rng.choice([str(tmp_path / "out" / f"{rng.randrange(10**6)}.png"),
                                      str(tmp_path / "out" / f"{rng.randrange(10**6)}.safetensors"),
                                      str(tmp_path / "out"), str(tmp_path / "out" / "x.txt"), 3, None])
        elif field in ("steps", "num_inference_steps"):
            line[field] = rng.choice([0, -1, 1, 2, 2.0, 1.5, 1001, "2", None, True, 2**63])
        else:
            line[field] = rng.choice(_VALUES)
    return line


def _non_finite(path: Path) -> bool:
    from safetensors.torch import load_file

    return not bool(load_file(str(path))["latents"].isfinite().all())


def test_fuzzed_jobs_lines_never_traceback_or_succeed_with_bad_output(tiny_package, demo_loras, tmp_path):
    """40 seeded mutations of a good line, each alone in a jobs file; the ones that validate then run
    together. No traceback, exit in {0, 1, 2}, nothing written outside tmp_path/out, no exit 0 with a
    non-finite output."""
    from aotpack.errors import AotpackError
    from aotpack.runtime.jobs import request_from_json
    from aotpack.runtime.requests import PackageLimits
    from aotpack.store.manifest import read_manifest

    rng = random.Random(1234)
    (tmp_path / "out").mkdir()
    limits = PackageLimits.from_manifest(read_manifest(tiny_package))
    before = {p for p in tmp_path.rglob("*")}
    valid = []
    for case in range(40):
        line = _mutate(rng, tmp_path, demo_loras)
        jobs = tmp_path / f"case{case}.jsonl"
        jobs.write_text(json.dumps(line) + "\n")  # json writes NaN/Infinity, which json.loads reads back
        before.add(jobs)
        try:
            request_from_json(json.loads(jobs.read_text()), "x", limits)
        except AotpackError:
            result = invoke("run", tiny_package, "--requests", jobs)
            assert result.exit_code == 1, (line, result.output)
            continue
        if request_from_json(json.loads(jobs.read_text()), "x", limits).steps <= 2:
            valid.append(line)
    assert 3 <= len(valid) < 40, len(valid)  # the fuzz exercised both paths
    together = tmp_path / "valid.jsonl"
    together.write_text("".join(json.dumps(line) + "\n" for line in valid))
    before.add(together)
    result = invoke("run", tiny_package, "--requests", together, "--report", tmp_path / "out" / "report.json")
    assert result.exit_code in (0, 1), result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["jobs"]) == len(valid)
    for job in report["jobs"]:
        for key in ("image", "latents"):
            if job.get(key):
                assert Path(job[key]).is_relative_to(tmp_path / "out")
        if job.get("latents"):
            assert not _non_finite(Path(job["latents"]))
    assert result.exit_code == (1 if report["failed"] else 0)
    touched = {p for p in tmp_path.rglob("*")} - before
    assert all(p.is_relative_to(tmp_path / "out") for p in touched), sorted(touched)


# -- run: outputs never land in the package or on an input; flags never silently ignored ---------------

def _package_files(package) -> dict:
    return {p.relative_to(package): p.read_bytes() for p in Path(package).rglob("*") if p.is_file()}


def test_run_refuses_outputs_inside_the_package_or_on_its_inputs_before_loading(tiny_package, demo_loras,
                                                                                tmp_path, monkeypatch):
    from aotpack.runtime import pipeline

    monkeypatch.setattr(pipeline, "load_package", lambda *a, **k: pytest.fail("loaded before the checks"))
    before = _package_files(tiny_package)
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(Path(demo_loras["tiny-style-attn"]).read_bytes())
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps(dict(COMMON, loras=[[str(lora), 1.0]], out=str(tmp_path / "a.png"))) + "\n")
    args = ["run", tiny_package, "--prompt", "a cat", "--steps", 1, "--height", 64, "--width", 64]
    cases = [
        (args + ["--report", Path(tiny_package) / "manifest.json"], "inside the package"),  # it replaced the manifest
        (args + ["--out", Path(tiny_package) / "extra.png"], "inside the package"),
        (args + ["--lora", lora, "--save-latents", lora], "would overwrite or add to the LoRA"),
        (args + ["--lora", "", "--out", tmp_path / "b.png"], "empty path"),  # "" read the folder "."
        (args + ["--out", f"{tmp_path / 'c.png'}/"], "is not a file path"),  # PIL failed after generating
    ]
    for case, says in cases:
        result = invoke(*case)
        assert result.exit_code == 1 and says in result.output, (case, result.output)
    report_on_jobs = jobs.with_suffix(".json")
    jobs.rename(report_on_jobs)
    result = invoke("run", tiny_package, "--requests", report_on_jobs, "--report", report_on_jobs)
    assert result.exit_code == 1 and "would overwrite or add to the jobs file" in result.output, result.output
    latents_on_lora = tmp_path / "latents-on-lora.jsonl"
    latents_on_lora.write_text(json.dumps(dict(COMMON, loras=[[str(lora), 1.0]], save_latents=str(lora))) + "\n")
    result = invoke("run", tiny_package, "--requests", latents_on_lora)
    assert result.exit_code == 1 and "would overwrite or add to the LoRA" in result.output, result.output
    assert _package_files(tiny_package) == before
    assert lora.read_bytes() == Path(demo_loras["tiny-style-attn"]).read_bytes()


def test_run_refuses_per_request_flags_with_requests_and_missing_local_loras_up_front(tiny_package, tmp_path,
                                                                                      monkeypatch):
    from aotpack.runtime import pipeline

    monkeypatch.setattr(pipeline, "load_package", lambda *a, **k: pytest.fail("loaded before the checks"))
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps(COMMON) + "\n")
    for flags in (["--lora", "x.safetensors:7"], ["--out", "ignored.png"], ["--steps", 5], ["--merge"]):
        result = invoke("run", tiny_package, "--requests", jobs, *flags)
        assert result.exit_code == 2 and f"{flags[0]} apply to --prompt only" in result.output, result.output
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)  # "sub/dir/x.safetensors" is a local typo here, not the Hub repo sub/dir
    result = invoke("run", tiny_package, "--prompt", "a", "--lora", "sub/dir/missing.safetensors")
    assert result.exit_code == 1 and "does not exist" in result.output, result.output
    bad_scale = tmp_path / "bad-scale.jsonl"
    bad_scale.write_text(json.dumps(dict(COMMON, loras=["style.safetensors:abc"])) + "\n")
    result = invoke("run", tiny_package, "--requests", bad_scale)
    assert result.exit_code == 1 and f"{bad_scale}:1: loras entry 'style.safetensors:abc'" in result.output
