"""The benchmark tools on the CPU: real packages measured, cold start in a fresh process, the report's arithmetic.

These check that the tools measure and report correctly; the numbers that matter come from the GPU
(benchmarks/results/).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import zipfile

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from aotpack.bench.report import render, render_markdown, variants_table
from aotpack.cli import cli
from aotpack.cli.bench import PARTS
from aotpack.errors import PackageMismatchError, RequestError
from aotpack.runtime.program import ProgramFile

SMALL = ["--height", "128", "--width", "128", "--text-tokens", "16"]


def test_variants_then_report(tiny_package, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["bench", "variants", "--model", "tiny", "--variant", f"r32={tiny_package}",
                                      "--out", str(out), "--lora-dir", str(tmp_path / "loras"), *SMALL],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "variants.json").read_text())
    measured = data["variants"]["r32"]
    assert measured["max_rank"] == 32 and measured["active_lora"] == "r16-attn"
    assert 0 < measured["step"]["min_ms"] <= measured["step"]["median_ms"] <= measured["step"]["max_ms"]
    assert measured["package_mb"] > 0 and measured["validation"]["max_rel_error"] < 1e-3
    markdown = render(out, "aotpack bench variants ...", "test machine", notes=["a note"]).read_text()
    assert f"| r32 | regional | 32 | {measured['step']['median_ms']:.2f} |" in markdown
    assert "Head to head" not in markdown  # no compare or cold start ran: no eager 1.00x or error 0 to show
    assert "- a note" in markdown
    # older results recorded builds that did not finish (benchmarks/results/2026-11-29-h200): their row says so
    assert "| broken |  |  | no package (build did not finish) |" in "\n".join(
        variants_table({"variants": {"broken": {"failed": "no package (build did not finish)"}}}))
    assert Image.open(out / "results.png").size[0] == 900


def test_cold_start_of_a_package_in_a_fresh_process(tiny_package, tmp_path):
    out = tmp_path / "cold"
    result = CliRunner().invoke(cli, ["bench", "cold-start", "--package", str(tiny_package), "--model", "tiny",
                                      "--out", str(out), "--kinds", "aotpack", "--steps", "2", "--lora", "r16-attn",
                                      "--lora-dir", str(tmp_path / "loras"), *SMALL], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    cold = json.loads((out / "cold_start.json").read_text())["aotpack"]
    assert "failed" not in cold, cold
    phases = cold["imported_seconds"] + cold["load_package"] + cold["activate_lora"] + cold["first_image"]
    assert 0 < phases <= cold["process_to_first_image_seconds"] <= cold["process_wall_seconds"]


def test_cold_start_refuses_a_missing_package_before_any_phase(tmp_path, monkeypatch):
    from aotpack.bench import cold_start

    monkeypatch.setattr(cold_start, "spawn", lambda *a, **k: pytest.fail("a phase ran"))
    for package in (tmp_path / "missing", tmp_path):  # no folder; a folder that is no package
        result = CliRunner().invoke(cli, ["bench", "cold-start", "--package", str(package), "--model", "tiny",
                                          "--out", str(tmp_path / "cold")])
        assert result.exit_code == 1, result.output
        assert f"--package {str(package)!r}: " in result.output and "unexpected" not in result.output
    assert not (tmp_path / "cold").exists()


def test_cold_start_exits_1_naming_a_failed_phase_after_writing_the_others(tiny_package, tmp_path, monkeypatch):
    """A child that fails (here the aotpack one, with a typed error's traceback) fails the command once every phase
    ran: exit 1 with its error's line, and cold_start.json keeps what the other phases measured."""
    from aotpack.bench import cold_start

    def child(command, **kwargs):  # the children's output, as subprocess.run returns it
        kind = command[command.index("--child") + 1]
        if kind == "aotpack":
            output = ('Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
                      "aotpack.errors.PackageIntegrityError: block_0.pt2 does not match its sha256\n"
                      "  fix: pull or build the package again\n")
            return subprocess.CompletedProcess(command, 1, output)
        result = {"imported_seconds": 1.0, "first_image_since_spawn_seconds": 2.0}
        return subprocess.CompletedProcess(command, 0, cold_start.RESULT_PREFIX + json.dumps(result) + "\n")

    monkeypatch.setattr(cold_start.subprocess, "run", child)
    out = tmp_path / "cold"
    result = CliRunner().invoke(cli, ["bench", "cold-start", "--package", str(tiny_package), "--model", "tiny",
                                      "--out", str(out), "--kinds", "aotpack", "eager-reference"])
    assert result.exit_code == 1, result.output
    assert "cold start: aotpack failed (exit 1: aotpack.errors.PackageIntegrityError: block_0.pt2 does not match " \
           "its sha256)" in result.output
    assert "unexpected" not in result.output and "eager-reference failed" not in result.output
    written = json.loads((out / "cold_start.json").read_text())
    assert written["aotpack"]["failed"] == "exit 1"
    assert written["eager-reference"]["process_to_first_image_seconds"] == 2.0
    assert "PackageIntegrityError" in (out / "cold_start.log").read_text()


def test_report_ratios_and_missing_figures():
    bench = {"setup": {"model": "random:flux-dev"},
             "eager_bf16_peft": {"step": {"median_ms": 200.0}, "rel_error_vs_eager": 0},
             "aotpack": {"step": {"median_ms": 100.0}, "requests": [
                 {"loras": "a", "switch_ms": 9.0, "adapters_read_from_file": 0, "image_seconds": 3.0},
                 {"loras": "a+b", "switch_ms": 900.0, "adapters_read_from_file": 0, "image_seconds": 3.1}]}}
    cold = {"recipe": {"process_to_first_image_seconds": 400.0,
                       "details": {"step": {"median_ms": 125.0}}, "rel_error_vs_eager": 0.05},
            "aotpack": {"process_to_first_image_seconds": 20.0}}
    markdown = render_markdown(bench, cold, {}, "cmd", "machine")
    assert "| step vs eager | 1.00x | 0.62x | 0.50x |" in markdown
    assert "| step vs compiled recipe | 1.60x | 1.00x | 0.80x |" in markdown
    assert "0.05x / not measured" in markdown  # cold start vs recipe cold / warm (no warm figure)
    assert "| 9.0-9.0 |" in markdown  # the stacked set is not a cached-set switch
    assert "from its cold-start process" in markdown


def test_report_shows_no_figure_for_a_contender_that_did_not_run():
    """Only the aotpack cold start ran: eager's own 1.00x and error 0, and aotpack's recompile count, are not
    figures of this run."""
    markdown = render_markdown({}, {"aotpack": {"process_to_first_image_seconds": 20.0}}, {}, "cmd", "machine")
    assert "| step vs eager | not measured | not measured | not measured |" in markdown
    assert "| step vs compiled recipe | not measured | not measured | not measured |" in markdown
    assert "| output rel. error vs eager (same seed and LoRA) | not measured |" in markdown
    assert "| recompiles during hotswaps / in the first pipeline image | n/a (no compile) | not measured / not " \
           "measured | not measured |" in markdown
    assert "| 20.0 |" in markdown


@pytest.mark.parametrize("make, message", [
    (lambda d: d.mkdir(), "holds no benchmark results (bench.json, cold_start.json or variants*.json)"),
    (lambda d: d.mkdir() or (d / "notes.txt").write_text("mine"), "holds no benchmark results"),
    (lambda d: None, "does not exist"),
    (lambda d: d.write_text("a file"), "is not a folder"),
    (lambda d: d.mkdir() or (d / "bench.json").write_text("{trunc"), "bench.json cannot be read as benchmark results"),
    (lambda d: d.mkdir() or (d / "variants.json").write_text("[]"), "variants.json holds list, not benchmark results"),
])
def test_report_refuses_a_folder_without_results_writing_nothing(make, message, tmp_path):
    folder = tmp_path / "user"
    make(folder)
    before = sorted(tmp_path.rglob("*"))
    result = CliRunner().invoke(cli, ["bench", "report", str(folder)])
    assert result.exit_code == 1, result.output
    assert message in result.output and str(folder) in result.output and "unexpected" not in result.output
    assert sorted(tmp_path.rglob("*")) == before


def test_a_program_archive_escaping_its_folder_is_refused(tmp_path):
    archive = tmp_path / "evil.pt2"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("evil/data/aotinductor/model/../../../../escaped.so", b"\x7fELF")
    with pytest.raises(PackageMismatchError, match="outside the package"):
        ProgramFile(archive)
    assert not (tmp_path / "escaped.so").exists()


def test_kernel_categories_and_fidelity_metric():
    import torch

    from aotpack.bench.fidelity import effect_strength, lora_effect_error
    from aotpack.bench.timing import kernel_category

    # names from the committed H200 profiles (benchmarks/results/2026-11-29-h200)
    assert kernel_category("nvjet_sm90_qqtst_128x128_128x6_2x1_v_bz_ovscale_TNT") == "fp8_gemm"
    assert kernel_category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7") == "attention"
    assert kernel_category("triton_red_fused__unsafe_view_abs_add_amax_cat_gelu_permute_view_8") == "activation_quant"
    assert kernel_category("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN") == "bf16_gemm_lora"
    # the modulation linears' GEMVs (one row per image; benchmarks/results/2026-12-04e-h200-row-amax)
    assert kernel_category("nvjet_sm90_tst_192x8_64x8_4x1_v_bz_bias_TNT") == "bf16_gemv"
    assert kernel_category("nvjet_sm90_tst_64x8_64x16_1x1_h_bz_splitK_TNT") == "bf16_gemv"
    assert kernel_category("lora_down_fp8_kernel") == "bf16_gemm_lora"  # the LoRA branch, though it reads FP8
    assert kernel_category("lora_up_kernel") == "bf16_gemm_lora"  # group_lora_up's kernel
    assert kernel_category("nvjet_sm90_tst_128x80_64x8_2x4_h_bz_TNT") == "bf16_gemm_lora"
    assert kernel_category("triton_per_fused__to_copy__unsafe_view_add_mean_mul_pow_rsqrt_view_4") \
        == "norm_modulation_elementwise"
    assert kernel_category("Memcpy HtoD (Pageable -> Device)") == "other"

    base, effect = torch.zeros(100), torch.linspace(-1, 1, 100)
    assert lora_effect_error(base + effect, base, base + effect, base) == 0.0
    weak = base + effect * (2 / 3)  # the FP8 complaint: the LoRA at two thirds of its strength
    assert abs(lora_effect_error(weak, base, base + effect, base) - 1 / 3) < 1e-6  # float32 inputs
    assert abs(effect_strength(weak, base, base + effect, base) - 2 / 3) < 1e-6


def test_speed_report_names_a_host_bound_mode():
    from aotpack.bench.speed import host_bound_notes, markdown
    from aotpack.bench.timing import CATEGORIES

    def mode(step, kernels, low, high):
        return {"sizes": {"1024": {"step": {"median_ms": step, "min_ms": low, "max_ms": high}}},
                "breakdown": {"total_ms": kernels, "ms_per_step": dict.fromkeys(CATEGORIES, 0.0)}}

    # the figures of the H200 run of 2026-12-02 10:30 UTC: the recipe's step far above its kernels, aotpack's not
    data = {"setup": {"date": "d", "torch": "t", "model": "m", "text_tokens": 512, "lora": "r64-all",
                      "sizes": [1024]},
            "eager_bf16_peft": {"step": {"1024": {"median_ms": 201.0}}},
            "recipe": mode(164.27, 100.85, 152.14, 178.33),
            "aotpack": {"slots": mode(106.36, 101.27, 105.9, 107.0), "merge": {"merge_ms": 93.4}}}
    notes = host_bound_notes(data)
    assert notes[1:] == ["**recipe ran host-bound at 1024:** 164.27 ms a step (min 152.14, max 178.33) on 100.85 ms "
                         "of kernels; ratios against it measure this process's host, not the kernels."]
    data["recipe"] = mode(120.80, 104.93, 119.9, 121.6)  # an ordinary process: 1.15x, no note
    assert host_bound_notes(data) == []
    data["aotpack"]["slots"] = mode(150.0, 101.27, 140.0, 160.0)
    assert "**aotpack slots ran host-bound at 1024:**" in markdown(data)


def test_speed_merge_sweep_reports_the_check_beside_merged_over_slots(served_tiny, demo_loras):
    """The fidelity sweep's merge table: the merge check's estimate per strength (none on a package without FP8
    weights) and merged / slots ratios of the effect strength and fidelity error taken from the sweep's rows."""
    from aotpack.bench.speed import _sweep_markdown, merge_sweep

    path = demo_loras["tiny-style-mlp"]
    rows = merge_sweep(served_tiny, {0.02: path})
    assert rows[0.02]["estimate"] is None and rows[0.02]["estimate_seconds"] >= 0  # fp32 package: nothing re-rounds
    assert served_tiny.transformer.lora_modes.mode == "merged"
    served_tiny.set_loras([])

    def cell(error, strength):
        return {"lora_fidelity_error": error, "lora_effect_strength": strength, "lora_effect_relative": 0.01}

    data = {"setup": {"sizes": [512]},
            "aotpack": {"fidelity_sweep": {"slots": {"0.005": cell(1.732, 0.153)},
                                           "merged": {"0.005": cell(1.926, 0.103)}},
                        "merge_sweep": {"0.005": {"estimate": {"strength": 0.332, "error": 1.783, "rows": 3072},
                                                  "estimate_seconds": 0.0071}}}}
    assert "| 0.005 | 0.332 / 1.783 | 0.673 | 1.112 | 7.1 |" in _sweep_markdown(data)


def test_speed_partial_merges_time_each_share_and_report_it_beside_slots_and_merged(served_tiny, demo_loras):
    """`merge_shares.measure` (the speed bench's `--merge-shares`): per share, the blocks it folded, merge and
    unmerge time and the bench's own row (step, error, fidelity) for that state; the report's table puts them between
    slots and the whole merge. The policy and the base weights are as before afterwards."""
    from test_merge import _inputs

    from aotpack.bench import merge_shares
    from aotpack.bench.speed import Profiles, _mode, _out

    transformer = served_tiny.transformer
    policy, inputs = transformer.lora_modes.auto.policy, _inputs(served_tiny)
    lora = [(demo_loras["tiny-style-all"], 0.8)]
    served_tiny.set_loras([])
    base = _out(transformer, inputs)
    served_tiny.set_loras(lora)
    refs = {64: {"base": base, "lora": _out(transformer, inputs)}}  # the slots as the reference: partial = slots
    slots = _mode(transformer, {64: inputs}, "cpu", 2, refs, {64: base}, Profiles(None))

    def plain():
        return _mode(transformer, {64: inputs}, "cpu", 2, refs, {64: base}, Profiles(None))

    rows = merge_shares.measure(served_tiny, lora, [0.5, 0.25], "cpu", plain, lambda size: {})
    assert transformer.lora_modes.auto.policy == policy and transformer.bank.is_empty
    assert torch.equal(_out(transformer, inputs), base)
    half = rows["0.5"]
    # tiny-style-all touches all 50 slotted linears: one double (14) and one single block (6) fold, the rest in slots
    assert half["blocks"] == 4 and half["blocks_folded"] == 2 and half["layers_folded"] == 20
    assert half["layers_in_slots"] == 30
    assert half["merge_ms"] > 0 and half["unmerge_ms"] > 0
    row = half["sizes"][64]
    assert row["variant"].startswith("slots+merged:") and row["lora_fidelity_error"] <= 1e-4
    assert "_output" not in row
    lines = merge_shares.markdown(rows, {"slots": slots}, {})
    assert lines[-3].startswith("| 0 (slots) | none | 64 |")
    assert lines[-2].startswith("| 0.5 | 2 / 4 | 64 |") and lines[-1].startswith("| 0.25 | 1 / 4 | 64 |")


def test_precise_reference_is_the_same_sweep_on_the_upcast_model(demo_loras):
    """`precise_sweep` runs the sweep's LoRAs on the eager model upcast (float64 from the CPU's float32): against
    it the float32 model's LoRA effect is at full strength to 1e-4, the effect is well above that, and the report's
    table puts eager first and each contender's row against the upcast reference beside it."""
    from aotpack.bench.speed import _fidelity, _out, _sweep_markdown, precise_sweep
    from aotpack.bench.speed import main as speed_main
    from aotpack.models.checkpoint import load_transformer, parse_model_ref
    from aotpack.models.examples import transformer_inputs

    model = load_transformer(parse_model_ref("tiny"), torch.float32, "cpu").eval()
    inputs = transformer_inputs(model.config, batch=1, image_tokens=16, text_tokens=8, dtype=torch.float32,
                                device="cpu", generator=torch.Generator().manual_seed(5))
    path = demo_loras["tiny-style-mlp"]
    base = _out(model, inputs)
    model.load_lora_adapter(str(path), adapter_name="r64", prefix="transformer")
    lora = _out(model, inputs)
    model.delete_adapters("r64")
    precise = precise_sweep(model, inputs, {0.02: path})
    assert precise["dtype"] == "float64" and model.dtype == torch.float64
    assert not torch.equal(precise["base"], base)  # computed again, not the float32 output handed back
    assert precise["lora_effect_relative"][0.02] > 0.05
    row = _fidelity(lora, base, precise["sweep"][0.02], precise["base"])
    assert abs(row["lora_effect_strength"] - 1) < 1e-4 and row["lora_fidelity_error"] < 1e-4

    def cell(error, strength):
        return {"lora_fidelity_error": error, "lora_effect_strength": strength, "lora_effect_relative": 0.01}

    with pytest.raises(SystemExit) as usage:  # nothing to read against float32 without a sweep
        speed_main(["--package", "p", "--out", "o", "--precise-reference"])
    assert usage.value.code == 2

    data = {"setup": {"sizes": [512]},
            "eager_bf16_peft": {"precise_reference": {"dtype": "float32", "lora_effect_relative": {"0.005": 0.0051},
                                                      "fidelity_sweep": {"0.005": cell(0.84, 0.58)}}},
            "aotpack": {"fidelity_sweep": {"slots": {"0.005": {**cell(1.732, 0.153), "vs_precise": cell(0.9, 0.97)}},
                                           "merged": {"0.005": cell(1.926, 0.103)}}}}
    table = _sweep_markdown(data)
    assert "| 0.005 | 0.0051 | 0.8400 / 0.580 | 0.9000 / 0.970 |  |  |" in table  # merged ran without it


def _step_inputs(served) -> dict:
    """One transformer step's inputs at the package's first shape (seeded)."""
    from aotpack.models.examples import transformer_inputs

    shapes = served.manifest.shapes
    return transformer_inputs(served.transformer.config, batch=1, image_tokens=shapes["image_tokens"][0],
                              text_tokens=shapes["text_tokens"][0], dtype=torch.float32, device="cpu",
                              generator=torch.Generator().manual_seed(3))


def test_whole_images_time_slots_against_the_merge_policy(served_tiny, demo_loras):
    """`bench.images` on the CPU: the policy's image runs merged (and unmerges at the switch out), the slots' does
    not, and the table sets each against the recipe's N x step."""
    from aotpack.bench import images

    inputs = _step_inputs(served_tiny)
    lora = [(demo_loras["tiny-style-mlp"], 1.0)]
    scheduler = served_tiny.pipeline.scheduler
    scheduler.set_timesteps(3, mu=1.0)
    timesteps = scheduler.timesteps
    result = images.measure(served_tiny, {64: inputs}, "cpu", lora, policy="always", steps=2, repeats=1)
    assert scheduler.timesteps is timesteps  # its images' schedules left the pipeline's as it was
    rows = result["sizes"][64]
    assert rows["merge_policy"]["merged"] and not rows["slots"]["merged"] and not rows["no_lora"]["merged"]
    assert not rows["slots_read_a_step"]["merged"]
    assert all(row["best_ms"] > 0 for row in rows.values())
    assert not served_tiny.transformer.merged and served_tiny.transformer.lora_modes.auto.policy.after_token_steps is None
    table = images.markdown(result, {"64": {"step": {"median_ms": rows["slots"]["best_ms"] / 2}}}, "r64-all")
    assert "| 64 | recipe (2 x step) |" in table[-5] and "| 64 | slots |" in table[-3] and "| 1.000x | False |" in table[-3]
    assert "| 64 | slots_read_a_step |" in table[-2]


def test_speed_breakdowns_wait_for_every_timed_figure_and_restore_their_mode(served_tiny, demo_loras):
    """`speed.Profiles` (on `timing.Profiles`): a breakdown queued while timing runs only at `run()` (a finished
    profiler session slows what follows it), in the mode it was queued for (merged here), and leaves no LoRA live;
    profiling sets TEARDOWN_CUPTI=1 first so Kineto lets go of CUPTI afterwards."""
    import os

    from aotpack.bench import speed

    inputs = _step_inputs(served_tiny)
    lora = [(demo_loras["tiny-style-mlp"], 1.0)]
    merged_while_profiled = []

    def prepare():
        served_tiny.set_loras([])
        served_tiny.set_loras(lora, merge=True)
        merged_while_profiled.append(served_tiny.transformer.merged)

    profiles = speed.Profiles(64)
    merged, other_size = {}, {}
    profiles.queue_breakdown(merged, served_tiny.transformer, {64: inputs}, "cpu", prepare,
                             lambda: served_tiny.set_loras([]))
    profiles.queue_breakdown(other_size, served_tiny.transformer, {32: inputs}, "cpu")  # not the breakdown size
    assert merged == {} and merged_while_profiled == []
    profiles.run()
    assert merged_while_profiled == [True] and not served_tiny.transformer.merged and served_tiny.active == []
    assert merged["breakdown"]["total_ms"] > 0 and other_size == {}
    assert os.environ["TEARDOWN_CUPTI"] == "1"
    profiles.run()  # the queue is empty now: nothing runs twice
    assert merged_while_profiled == [True]


def _recorded(events: list, event, fn):
    """`fn`, appending `event()` (or `event`) to `events` at each call."""
    def call(*args, **kwargs):
        events.append(event() if callable(event) else event)
        return fn(*args, **kwargs)
    return call


def _loads_recorded(loaded: list, load):
    """`load`, keeping each package it loads in `loaded`."""
    def call(*args, **kwargs):
        loaded.append(load(*args, **kwargs))
        return loaded[-1]
    return call


def test_variants_breakdowns_follow_every_timed_step(tiny_package, tmp_path, monkeypatch):
    """`bench.variants`: the kernel breakdowns (profiler sessions) run after every pass is timed, the graph pass
    included, each on the package loaded again in the state its step was timed in: the LoRA in slots, then none."""
    from aotpack.bench import timing, variants

    events, loaded = [], []
    monkeypatch.setattr(variants, "kernel_profiles_on", lambda device: True)  # the GPU's path, on the CPU
    monkeypatch.setattr(variants, "time_ms", _recorded(events, "time", timing.time_ms))
    monkeypatch.setattr(variants, "_load", _loads_recorded(loaded, variants._load))
    monkeypatch.setattr(variants, "kernel_breakdown",
                        _recorded(events, lambda: ("profile", loaded[-1].active), timing.kernel_breakdown))
    out = tmp_path / "out"
    data = variants.run({"r32": str(tiny_package)}, "tiny", out, height=128, width=128, text_tokens=16,
                        lora_dir=tmp_path / "loras", graph_variants=("r32",))
    # step and step with no LoRA, then the graph pass's step; then the breakdowns, the LoRA active in the first only
    assert events == ["time"] * 3 + [("profile", [("r16-attn", 1.0)]), ("profile", [])]
    assert len(loaded) == 4  # two timed passes, and a fresh load for each breakdown
    measured = data["variants"]["r32"]
    assert measured["breakdown"]["total_ms"] > 0 and measured["breakdown_no_lora"]["total_ms"] > 0
    assert data["cublaslt_workspace_kib"] == os.environ.get("CUBLASLT_WORKSPACE_SIZE")  # the setting it ran under
    assert json.loads((out / "variants.json").read_text())["variants"]["r32"]["breakdown"] == measured["breakdown"]


def test_variants_refuses_a_graph_variant_it_does_not_time(tmp_path):
    """`--graph-variant` names a `--variant` label: a typo fails before any package loads, never a silent skip."""
    from aotpack.bench import variants

    with pytest.raises(RequestError, match=r"--graph-variant \['r64'\] are not among the --variant labels"):
        variants.run({"r32": str(tmp_path / "pkg")}, "tiny", tmp_path / "out", height=128, width=128, text_tokens=16,
                     lora_dir=tmp_path / "loras", graph_variants=("r64",))
    assert not (tmp_path / "out").exists()


def test_variants_refuses_a_missing_package_before_any_is_measured(tiny_package, tmp_path, monkeypatch):
    """A --variant whose package is not there (its build failed) is refused before the others are timed: a result
    file recording only a failed build was an exit 0 with the wrong reason."""
    from aotpack.bench import variants

    monkeypatch.setattr(variants, "measure", lambda *a, **k: pytest.fail("a package was measured"))
    (tmp_path / "empty").mkdir()
    base = ["bench", "variants", "--model", "tiny", "--out", str(tmp_path / "out"),
            "--variant", f"r32={tiny_package}"]
    for package, why in ((tmp_path / "missing", "no such folder"), (tmp_path / "empty", "has no manifest.json")):
        result = CliRunner().invoke(cli, [*base, "--variant", f"none={package}"])
        assert result.exit_code == 1, result.output
        assert f"--variant 'none={package}': " in result.output and why in result.output
    result = CliRunner().invoke(cli, [*base, "--variant", "none"])  # no package at all: usage
    assert result.exit_code == 2 and "--variant 'none': write LABEL=PACKAGE_DIR" in result.output
    assert not (tmp_path / "out").exists()


# each part's arguments but --out (a real package where it takes one); `report` takes a results folder instead
_PART_ARGS = {"quality": ["--model", "tiny", "--package", "a={package}", "--prompt", "x", "--steps", "1"],
              "variants": ["--model", "tiny", "--variant", "a={package}"]}


@pytest.mark.parametrize("part", [part for part in PARTS if part != "report"])
def test_every_bench_refuses_an_out_that_is_not_a_folder_before_any_work(part, tiny_package, tmp_path, monkeypatch):
    import importlib

    module = importlib.import_module(f"aotpack.bench.{PARTS[part][0]}")
    monkeypatch.setattr(module, "run", lambda *a, **k: pytest.fail("the benchmark ran"))
    args = [a.format(package=tiny_package) for a in _PART_ARGS.get(part, ["--model", "tiny", "--package", "{package}"])]
    afile = tmp_path / "afile.txt"
    afile.write_text("mine")
    for out, message in ((afile, f"--out {str(afile)!r} exists and is not a folder"),
                         (afile / "sub", f"--out {str(afile / 'sub')!r}: {afile} is not a folder")):
        result = CliRunner().invoke(cli, ["bench", part, *args, "--out", str(out)])
        assert result.exit_code == 1, result.output
        assert message in result.output and "unexpected" not in result.output
    assert afile.read_text() == "mine" and sorted(tmp_path.iterdir()) == [afile]


def test_compare_top_kernels_follow_every_timed_figure(tiny_package, tmp_path, monkeypatch):
    """`bench.compare`: the top kernels (profiler sessions) of the recipe and aotpack run after every contender is
    timed, aotpack's on its package loaded again with r64-all in slots, as its step was timed."""
    from aotpack.bench import compare, loras, serve_demo, timing

    events, loaded = [], []

    class Stopwatch(timing.Stopwatch):
        def __enter__(self):
            events.append("time")
            return super().__enter__()

    for module in (compare, serve_demo):  # every timed figure: CUDA-event steps and wall-clock blocks
        monkeypatch.setattr(module, "time_ms", _recorded(events, "time", timing.time_ms))
        monkeypatch.setattr(module, "Stopwatch", Stopwatch)
    monkeypatch.setattr(compare, "kernel_profiles_on", lambda device: True)  # the GPU's path, on the CPU
    monkeypatch.setattr(compare, "load_package", _loads_recorded(loaded, compare.load_package))
    monkeypatch.setattr(compare, "top_kernels", _recorded(events, "profile", timing.top_kernels))
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *args, **kwargs: None)  # the recipe eager: no Inductor
    # r64-all at the tiny package's max rank (32), still the widest target set (PEFT hotswap swaps subsets of it in)
    monkeypatch.setitem(loras.BENCH_LORAS, "r64-all", (32, *loras.BENCH_LORAS["r64-all"][1:]))
    out = tmp_path / "out"
    data = compare.run(str(tiny_package), "tiny", out, height=128, width=128, steps=1, text_tokens=16,
                       lora_dir=tmp_path / "loras")
    first_profile = events.index("profile")
    assert events[first_profile:] == ["profile", "profile"] and events.count("time") > 10
    assert [served.active for served in loaded] == [[("r64-all", 1.0)]] and not loaded[0].transformer.merged
    written = json.loads((out / "bench.json").read_text())
    for key in ("aotpack", "compiled_recipe_regional"):
        assert data[key]["top_kernels"] and written[key]["top_kernels"] == data[key]["top_kernels"]


def test_back_to_back_timing_calls_in_a_row_and_reports_per_call():
    """`back_to_back_ms`: warm-up calls, then `repeats` loops of `steps` calls with no wait between them; the figure
    is per call (host clock on the CPU, CUDA events around each loop on a GPU)."""
    from aotpack.bench.timing import back_to_back_ms

    calls = []
    result = back_to_back_ms(lambda: calls.append(time.sleep(0.002)), "cpu", steps=4, warmup=1, repeats=3)
    assert len(calls) == 1 + 4 * 3
    assert result["repeats"] == 3 and result["steps_per_repeat"] == 4
    assert 2.0 <= result["min_ms"] <= result["median_ms"] <= result["max_ms"] < 50
