"""Whole images with a LoRA as a request runs them: switch the set in, N steps, switch it out, timed end to end
(device synced), the steps passed as `FluxPipeline` passes them (`denoise.py`). Three ways: no LoRA, the LoRA kept
in slots (`merge=False`), and the merge policy deciding (`merge=None`: a set whose image pays for it is merged before
the first step and unmerged at the switch out, both inside the time). The speed bench (`speed.py`) runs it in the
same process as the recipe, whose image it counts as N x its step (its hotswap not counted).
"""

from __future__ import annotations

import torch

from ..runtime.merge_policy import MergePolicy
from .denoise import denoising_loop
from .timing import Stopwatch

IMAGE_STEPS = 28  # FluxPipeline's default
# (mode, set_loras' merge=, whether steps take their modulation rows by index): "slots_read_a_step" is "slots" with
# each step's timestep read from the device (a diffusers pipeline outside a verified scope; runtime/modulation_rows.py),
# the same process's measure of what the index saves (for packages without batched_modulation the two are the same)
MODES = (("no_lora", False, True), ("slots", False, True), ("slots_read_a_step", False, False),
         ("merge_policy", None, True))


def _image(served, inputs, device, entries, merge, steps: int, by_index: bool = True) -> dict:
    transformer = served.transformer
    with Stopwatch(device) as watch, torch.no_grad():
        served.set_loras(entries, merge=merge)
        with transformer.lora_modes.auto.expecting(steps):  # what AotpackPipeline.__call__ tells it
            # the steps as FluxPipeline passes them
            denoising_loop(transformer, served.pipeline, inputs, steps, by_index=by_index)()
        merged = bool(transformer.merged)
        served.set_loras([])
    return {"ms": watch.seconds * 1000, "merged": merged}


def measure(served, workloads: dict, device, entries, *, policy="auto", steps: int = IMAGE_STEPS,
            repeats: int = 2) -> dict:
    """Per size: each mode's image ms over `repeats` images (best and all) and whether the set ran merged."""
    modes = served.transformer.lora_modes
    before = modes.auto.policy
    modes.auto.policy = MergePolicy.parse(policy, device)
    # the images set the scheduler's timesteps (denoise.py); the fixed-input steps timed after them take their
    # modulation rows from the schedule they found (an H100 run of 2026-12-07k profiled 3.1 ms of per-step rows)
    scheduler_state = dict(vars(served.pipeline.scheduler))
    result = {"steps": steps, "policy_after_token_steps": modes.auto.policy.after_token_steps, "sizes": {}}
    try:
        served.set_loras([])
        for size, inputs in workloads.items():
            rows = {}
            for mode, merge, by_index in MODES:
                runs = [_image(served, inputs, device, entries if mode != "no_lora" else [], merge, steps, by_index)
                        for _ in range(repeats)]
                rows[mode] = {"best_ms": min(r["ms"] for r in runs), "all_ms": [r["ms"] for r in runs],
                              "merged": runs[-1]["merged"]}
            result["sizes"][size] = rows
    finally:
        modes.auto.policy = before
        vars(served.pipeline.scheduler).update(scheduler_state)
        served.set_loras([])
    return result


def markdown(images: dict | None, recipe_sizes: dict, lora: str) -> list[str]:
    """The images table: best image ms, per step, and against the recipe's N x step of the same process."""
    if not images or not images.get("sizes"):
        return []
    steps = images["steps"]
    lines = ["", f"### Images: {steps} steps with {lora}, switch in and out included (same process)", "",
             f"The recipe's image is {steps} x its step (its LoRA hotswap not counted). Merge policy: merge once a "
             f"set's token-steps reach {images.get('policy_after_token_steps')}.", "",
             "| size | mode | image ms | ms per step | vs recipe | ran merged |", "| --- | --- | --- | --- | --- | --- |"]
    for size, rows in images["sizes"].items():
        recipe_row = recipe_sizes.get(size) or recipe_sizes.get(str(size)) or {}
        recipe_image = recipe_row["step"]["median_ms"] * steps if "step" in recipe_row else None
        if recipe_image:
            lines.append(f"| {size} | recipe ({steps} x step) | {recipe_image:.1f} | {recipe_image / steps:.2f} | "
                         "1.00x | |")
        for mode, *_ in MODES:
            row = rows.get(mode)
            if row:
                ratio = f"{row['best_ms'] / recipe_image:.3f}x" if recipe_image else ""
                lines.append(f"| {size} | {mode} | {row['best_ms']:.1f} | {row['best_ms'] / steps:.2f} | {ratio} | "
                             f"{row['merged']} |")
    return lines
