"""Turn benchmark JSON (compare, cold start, variants) into one results.json, a markdown table and a PNG.

    python -m aotpack.bench.report RESULTS_DIR [--command "..."] [--machine "..."]

Reads whichever of bench.json, cold_start.json and variants*.json are in RESULTS_DIR and writes
results.json, results.md and results.png there. Missing measurements show as "not measured"; a folder
holding none of them is refused, and nothing is written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import RequestError

MISSING = "not measured"
RESULTS_FIX = "pass the --out folder of `aotpack bench compare`, `cold-start` or `variants`, once it has run"


def _get(data, *keys):
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _fmt(value, unit="", digits=1):
    if value is None:
        return MISSING
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}{unit}"


def _ratio(value, reference):
    return f"{value / reference:.2f}x" if value and reference else MISSING


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def recipe_figures(bench: dict, cold: dict) -> dict:
    """The compiled recipe's figures: from `compare` when it finished there, else from the cold-start
    child, which measures the same things in its own process after its first image."""
    if bench.get("compiled_recipe_regional"):
        return bench["compiled_recipe_regional"]
    recipe = cold.get("recipe", {})
    return {**recipe.get("details", {}), "rel_error_vs_eager": recipe.get("rel_error_vs_eager"),
            "source": "cold-start child"} if recipe.get("details") else {}


def recipe_cold_starts(cold: dict) -> list[float]:
    """The recipe's JIT cold starts: `recipe`, and `recipe-rerun` where a later call measured it again."""
    runs = (_get(cold, k, "process_to_first_image_seconds") for k in ("recipe", "recipe-rerun"))
    return [r for r in runs if r is not None]


def head_to_head(bench: dict, cold: dict) -> list[str]:
    eager, aot = bench.get("eager_bf16_peft", {}), bench.get("aotpack", {})
    recipe = recipe_figures(bench, cold)
    steps = [_get(eager, "step", "median_ms"), _get(recipe, "step", "median_ms"), _get(aot, "step", "median_ms")]
    images = [eager.get("image_seconds"), recipe.get("image_seconds"),
              min((r["image_seconds"] for r in aot.get("requests", [])), default=None)]
    hotswaps = recipe.get("hotswaps", [])
    cached = [r["switch_ms"] for r in aot.get("requests", [])  # one cached adapter, no stacking or fit
              if r.get("adapters_read_from_file") == 0 and "+" not in r["loras"] and r["loras"] != "none"]
    recipe_colds = recipe_cold_starts(cold)
    cold_recipe = min(recipe_colds, default=None)  # the ratio is taken against the fastest JIT cold start
    cold_warm, cold_aot = (_get(cold, k, "process_to_first_image_seconds") for k in ("recipe-warm", "aotpack"))

    def itself(value, text="1.00x"):  # a contender against itself: only where it ran
        return text if value else MISSING

    rows = [
        ["step, median of 10 (ms)", *(_fmt(s) for s in steps)],
        ["step vs eager", itself(steps[0]), _ratio(steps[1], steps[0]), _ratio(steps[2], steps[0])],
        ["step vs compiled recipe", _ratio(steps[0], steps[1]), itself(steps[1]), _ratio(steps[2], steps[1])],
        ["image, 28 steps (s)", *(_fmt(i, digits=2) for i in images)],
        ["cold start: fresh process to first image (s)", "", " / ".join(_fmt(c) for c in recipe_colds) or MISSING,
         _fmt(cold_aot)],
        ["cold start, recipe warm-started from its saved compile cache (s)", "", _fmt(cold_warm), ""],
        ["aotpack cold start vs recipe cold / warm", "", "", f"{_ratio(cold_aot, cold_recipe)} / "
                                                                f"{_ratio(cold_aot, cold_warm)}"],
        ["switch to a loaded/cached LoRA set (ms)", _fmt(eager.get("switch_loaded_ms")),
         "n/a (hotswap reads the file)", f"{min(cached):.1f}-{max(cached):.1f}" if cached else MISSING],
        ["switch reading the file, r64-all (ms)", _fmt(eager.get("switch_from_file_ms")),
         _fmt(next((h["hotswap_from_file_ms"] for h in hotswaps if h["adapter"] == "r64-all"), None)),
         _fmt(aot.get("switch_r64_all_from_file_ms"))],
        ["recompiles during hotswaps / in the first pipeline image", "n/a (no compile)",
         f"{_fmt(recipe.get('recompiles_during_switches'), digits=0)} / "
         f"{_fmt(recipe.get('recompiles_in_pipeline_image'), digits=0)}",
         itself(aot, "0 (nothing is compiled at run time)")],
        ["peak GPU memory (GiB)", _fmt(eager.get("peak_gpu_gb")), _fmt(recipe.get("peak_gpu_gb")),
         _fmt(aot.get("peak_gpu_gb"))],
        ["output rel. error vs eager (same seed and LoRA)", itself(eager, "0"),
         _fmt(recipe.get("rel_error_vs_eager"), digits=4),
         _fmt(eager.get("aotpack_rel_error_vs_eager"), digits=4)],
    ]
    return _table(["", "eager bf16 + PEFT", "FP8 + hotswap + compile_repeated_blocks", "aotpack (default h200 build)"],
                  rows)


def variants_table(variants: dict) -> list[str]:
    entries = variants.get("variants", {})
    base = _get(entries, "none", "step", "median_ms")
    rows = []
    for label, v in entries.items():
        if v.get("failed"):  # its build failed or timed out: say so rather than "not measured" everywhere
            rows.append([label, "", "", v["failed"], *[""] * 6])
            continue
        step = _get(v, "step", "median_ms")
        graph = _get(v, "step_cuda_graph", "median_ms") or ("capture failed" if _get(v, "step_cuda_graph", "failed")
                                                             else None)
        compile_s = v.get("compile_seconds") or {}
        rows.append([label, v.get("layout", ""), str(v.get("max_rank", "")), _fmt(step, digits=2),
                     f"{(step / base - 1) * 100:+.1f}%" if base and step else MISSING, _fmt(graph, digits=2),
                     _fmt(v.get("build_seconds"), digits=0), _fmt(max(compile_s.values(), default=None), digits=0),
                     _fmt(v.get("package_mb"), digits=2), _fmt(v.get("load_seconds"), digits=1)])
    return _table(["variant", "layout", "max rank", "step (ms)", "vs no slots", "step as CUDA graph (ms)",
                   "build (s)", "longest program compile (s)", "package (MB)", "load (s)"], rows)


def kernels_table(kernels: list[dict], limit: int = 8) -> list[str]:
    rows = [[k["kernel"].replace("|", "/")[:90], f"{k['ms_per_call']:.2f}", f"{k['share'] * 100:.1f}%",
             f"{k['launches_per_call']:.0f}"] for k in kernels[:limit]]
    return _table(["kernel", "ms per step", "share", "launches per step"], rows)


def render_markdown(bench: dict, cold: dict, variant_runs: dict[str, dict], command: str, machine: str,
                    notes=()) -> str:
    """`variant_runs`: each `variants*.json` of the folder by file name, one table each."""
    setup = bench.get("setup", {})
    dates = [bench.get("date"), cold.get("date"), *(run.get("date") for run in variant_runs.values())]
    lines = [f"# aotpack benchmark, {next((d for d in dates if d), MISSING)}", "",
             f"Machine: {machine}. torch {setup.get('torch') or cold.get('torch')}, GPU "
             f"{setup.get('gpu') or cold.get('gpu')}. **Random weights** ({setup.get('model', 'random:flux-dev')}, "
             f"FLUX.1-dev configuration), {setup.get('height', 1024)}x{setup.get('width', 1024)}, "
             f"{setup.get('steps', 28)} steps, batch 1, {setup.get('text_tokens', 512)} text tokens.", "",
             f"Command: `{command}`"]
    if bench or cold:  # a variants-only folder has no contender to set side by side
        lines += ["", "## Head to head (same GPU, same random weights, inputs and LoRAs)", "",
                  *head_to_head(bench, cold)]
    if recipe_figures(bench, cold).get("source"):
        lines += ["", "The recipe's step, switch, image, memory and error figures come from its cold-start process "
                      "(after its first image), not from the `compare` process."]
    aot = bench.get("aotpack", {})
    if aot.get("switch_r128_mlp_svd_fit_to_max_rank_ms"):
        lines += ["", f"A rank-128 LoRA (r128-mlp) into the rank-64 package by SVD fit: "
                      f"{_fmt(aot.get('switch_r128_mlp_svd_fit_to_max_rank_ms'))} ms "
                      f"({'; '.join(aot.get('r128_fit_notes', []))})."]
    for name, run in variant_runs.items():
        if run.get("variants"):
            lines += ["", f"## Package variants, {name} ({run.get('model')}, same request, one process)", "",
                      *variants_table(run)]
    for title, kernels in (("aotpack", aot.get("top_kernels")),
                           ("compiled recipe", recipe_figures(bench, cold).get("top_kernels"))):
        if kernels:
            lines += ["", f"## Top GPU kernels per step: {title}", "", *kernels_table(kernels)]
    if notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def render_png(bench: dict, cold: dict, path: Path, caption: str = "") -> None:
    """Two horizontal bar groups (step ms, cold start s), drawn with Pillow (no plotting dependency)."""
    from PIL import Image, ImageDraw

    groups = [
        ("transformer step (ms), lower is better", [
            ("eager bf16 + PEFT", _get(bench, "eager_bf16_peft", "step", "median_ms")),
            ("torch.compile recipe", _get(recipe_figures(bench, cold), "step", "median_ms")),
            ("aotpack", _get(bench, "aotpack", "step", "median_ms"))]),
        ("fresh process to first image (s), lower is better", [
            ("torch.compile recipe, cold (fastest)", min(recipe_cold_starts(cold), default=None)),
            ("recipe, warm compile cache", _get(cold, "recipe-warm", "process_to_first_image_seconds")),
            ("aotpack", _get(cold, "aotpack", "process_to_first_image_seconds"))]),
    ]
    width, bar_h, left = 900, 26, 250
    height = 50 + sum(40 + bar_h * len(bars) for _, bars in groups)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), caption, fill="black")
    y = 34
    colors = {"aotpack": (40, 110, 200)}
    for title, bars in groups:
        draw.text((10, y), title, fill="black")
        y += 24
        top = max((v for _, v in bars if isinstance(v, (int, float))), default=1) or 1
        for label, value in bars:
            draw.text((10, y + 6), label, fill="black")
            if isinstance(value, (int, float)):
                length = int((width - left - 90) * value / top)
                draw.rectangle([left, y + 3, left + length, y + bar_h - 3],
                               fill=colors.get(label.split(",")[0], (150, 150, 150)))
                draw.text((left + length + 6, y + 6), f"{value:.1f}", fill="black")
            else:
                draw.text((left, y + 6), MISSING, fill="gray")
            y += bar_h
        y += 16
    image.save(path)


def _load(folder: Path, name: str) -> dict:
    path = folder / name
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RequestError(f"{path} cannot be read as benchmark results ({err})",
                           "run that benchmark again, or move the file out of the folder") from err
    if not isinstance(data, dict):
        raise RequestError(f"{path} holds {type(data).__name__}, not benchmark results",
                           "run that benchmark again, or move the file out of the folder")
    return data


def render(folder: Path, command: str, machine: str, notes=()) -> Path:
    """Every file is read, and a folder without results refused, before anything is written."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RequestError(f"{str(folder)!r} " + ("is not a folder" if folder.exists() else "does not exist"),
                           RESULTS_FIX)
    bench, cold = (_load(folder, n) for n in ("bench.json", "cold_start.json"))
    variant_runs = {p.name: _load(folder, p.name) for p in sorted(folder.glob("variants*.json"))}
    if not (bench or cold or any(variant_runs.values())):
        raise RequestError(f"{str(folder)!r} holds no benchmark results (bench.json, cold_start.json or "
                           "variants*.json)", RESULTS_FIX)
    (folder / "results.json").write_text(json.dumps({"machine": machine, "command": command, "notes": list(notes),
                                                     "compare": bench, "cold_start": cold, "variants": variant_runs},
                                                    indent=2))
    markdown = folder / "results.md"
    markdown.write_text(render_markdown(bench, cold, variant_runs, command, machine, notes))
    setup = bench.get("setup", {})
    caption = (f"{setup.get('gpu') or cold.get('gpu')}, {machine}; random weights ({setup.get('model') or cold.get('model')}), "
               f"{setup.get('height', '?')}x{setup.get('width', '?')}, {setup.get('steps', '?')} steps, batch 1")
    render_png(bench, cold, folder / "results.png", caption)
    return markdown


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--command", default="aotpack bench ...")
    parser.add_argument("--machine", default="unknown")
    parser.add_argument("--note", action="append", default=[], help="a line for the Notes section (repeatable)")
    args = parser.parse_args(argv)
    print(render(args.folder, args.command, args.machine, args.note).read_text())


if __name__ == "__main__":
    main()
