"""Build validation: the written package, bound to the very model it was built from, against eager.

Runs the runtime's own `CompiledFluxTransformer` (the code users run), with random LoRA tensors in
every slot, so a package that passes here is checked end to end, chaining included.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ValidationFailedError
from ..models.examples import relative_error, transformer_inputs
from ..models.prepare import torch_dtype
from ..models.slots import bind_slot_tensors, lora_input_names, random_slot_tensors
from ..progress import Progress
from ..recipes.recipe import Recipe
from ..runtime.transformer import CompiledFluxTransformer
from ..store.manifest import Manifest


def validation_cases(recipe: Recipe) -> list[tuple[int, int, int]]:
    """(batch, image tokens, text tokens) to validate: the example, and one more shape inside the
    recipe's ranges where they leave room (a static-shape recipe has only its one shape)."""
    example = (recipe.example_batch, recipe.example_image_tokens, recipe.example_text_tokens)
    other = (min(recipe.batch[1], recipe.example_batch + 1), recipe.image_tokens[0],
             min(recipe.text_tokens[1], recipe.text_tokens[0] + 1))
    return [example] if other == example else [example, other]


def _without_tuning(recipe: Recipe) -> str:
    """How to build `recipe` without its Inductor settings, the likely cause of unrepeatable programs
    (coordinate_descent_tuning, on in h100 since, made an h200 build on an H200 unrepeatable on 2026-12-01,
    docs/recipes.md); empty when it has none."""
    if not recipe.inductor_configs:
        return ""
    return (f"build without the recipe's [inductor] settings ({', '.join(recipe.inductor_configs)}): a recipe file "
            f"with base = \"{recipe.name}\" (or your recipe file's path), its own name and each of them set back, "
            "e.g. [inductor] coordinate_descent_tuning = false; if that repeats, keep it, else ")


def validate_package(package_dir: Path, manifest: Manifest, transformer, recipe: Recipe, device: str,
              progress: Progress) -> dict:
    """Check the package (bound to this very model) against eager, with random LoRA tensors in the slots.

    Three checks: every program against its eager region on identical inputs (`tolerance`); the
    whole transformer against diffusers' own forward, which also covers how the runtime chains the
    programs (`end_to_end_tolerance`; rounding differences compound across blocks); and that the
    chain repeats itself bit for bit, with and without LoRA (exact unmerge and graph replay rely on it).
    """
    cases = validation_cases(recipe)
    generator = torch.Generator().manual_seed(1234)
    lora = random_slot_tensors(manifest.slots, manifest.max_rank, torch_dtype(manifest.lora_dtype), device, generator)
    references = []
    with torch.no_grad():
        for batch, image_tokens, text_tokens in cases:
            inputs = transformer_inputs(transformer.config, batch=batch, image_tokens=image_tokens,
                                        text_tokens=text_tokens, dtype=torch_dtype(manifest.dtype), device=device,
                                        generator=generator)
            bind_slot_tensors(transformer, lora)
            with_lora = transformer(**inputs, return_dict=False)[0]
            bind_slot_tensors(transformer, None)
            without_lora = transformer(**inputs, return_dict=False)[0]
            references.append((inputs, with_lora, without_lora))
    compiled = CompiledFluxTransformer(manifest, package_dir, transformer, device)
    for spec in manifest.programs:
        spec.constants = compiled.program_constants(spec.kind, spec.name)
    full_lora = {spec.name: [(lora[a], lora[b])] for spec in manifest.slots for a, b in [lora_input_names(spec.name)]}
    results, worst_end_to_end, program_errors, unrepeatable, culprits = [], 0.0, {}, {}, {}
    with torch.no_grad():
        for (batch, image_tokens, text_tokens), (inputs, with_lora, without_lora) in zip(cases, references):
            outputs = {}
            for label, active in (("no LoRA", {}), ("random LoRA", full_lora), ("no LoRA", {}), ("random LoRA", full_lora)):
                compiled.bank.write(active)  # each variant runs twice, the other in between
                output = compiled(**inputs, return_dict=False)[0]
                first = outputs.setdefault(label, output)
                if output is not first and not torch.equal(output, first):
                    unrepeatable[f"{label}, batch {batch}"] = float((output.float() - first.float()).abs().max())
                    culprits.update(compiled.unrepeatable_programs(**inputs))  # the bank still holds `active`
            error_plain = relative_error(outputs["no LoRA"], without_lora)
            error_lora = relative_error(outputs["random LoRA"], with_lora)
            for kind, error in compiled.program_errors(inputs).items():
                program_errors[kind] = max(program_errors.get(kind, 0.0), error)
            lora_effect = relative_error(with_lora, without_lora)
            results.append({"batch": batch, "image_tokens": image_tokens, "text_tokens": text_tokens,
                            "rel_error_no_lora": error_plain, "rel_error_random_lora": error_lora,
                            "lora_effect": lora_effect})
            worst_end_to_end = max(worst_end_to_end, error_plain, error_lora)
            lora_note = (f"{error_lora:.2e} (random LoRA, which moves the output by {lora_effect:.2e})"
                         if manifest.slots else "no LoRA slots (--max-rank 0)")
            progress.info(f"    batch {batch}, {image_tokens} image + {text_tokens} text tokens: end-to-end rel. "
                          f"error {error_plain:.2e} (no LoRA), {lora_note}")
    if compiled.tails is not None:  # lora_tails: the random LoRA ran the tailed programs; now the slotted ones
        inputs, with_lora, _ = references[0]
        results[0]["rel_error_random_lora_slots"], slots_repeat = _slots_case(compiled, full_lora, inputs, with_lora)
        worst_end_to_end = max(worst_end_to_end, results[0]["rel_error_random_lora_slots"])
        if slots_repeat:
            unrepeatable["random LoRA in slots"] = slots_repeat
        progress.info(f"    the random LoRA ran the tailed programs; in slots: end-to-end rel. error "
                      f"{results[0]['rel_error_random_lora_slots']:.2e}")
    progress.info("    per program (worst instance, random LoRA): "
                  + ", ".join(f"{k} {v:.2e}" for k, v in program_errors.items()))
    if unrepeatable:
        raise ValidationFailedError(
            "the compiled programs are not deterministic: the same inputs gave different outputs (max abs "
            "difference " + ", ".join(f"{k}: {v:.3g}" for k, v in unrepeatable.items()) + "); programs whose own "
            "second run differed: " + (", ".join(f"{k} ({v:.3g})" for k, v in sorted(culprits.items()))
                                       or "none alone (look at what the chain passes between them)"),
            "exact unmerge and CUDA-graph replay rely on repeatable outputs; " + _without_tuning(recipe)
            + "report it with `aotpack doctor` output",
        )
    worst_program = max(program_errors.values())
    if not worst_program <= recipe.tolerance or not worst_end_to_end <= recipe.end_to_end_limit:
        raise ValidationFailedError(
            f"compiled programs differ from eager: worst program {worst_program:.3e} (tolerance "
            f"{recipe.tolerance:.1e}), whole transformer {worst_end_to_end:.3e} (tolerance "
            f"{recipe.end_to_end_limit:.1e}), relative L2",
            "report this with `aotpack doctor` output; try --layout whole or a different inductor config",
        )
    return {"tolerance": recipe.tolerance, "end_to_end_tolerance": recipe.end_to_end_limit,
            "max_rel_error": worst_end_to_end, "max_program_rel_error": worst_program,
            "program_rel_errors": program_errors, "cases": results, "repeatable": True,
            "reference": "diffusers FluxTransformer2DModel.forward / eager regions, same weights and quantization"}


def _slots_case(compiled, lora_set: dict, inputs: dict, reference: torch.Tensor) -> tuple[float, float]:
    """A `lora_tails` package's slotted programs against eager, with the tailed ones turned off (the runtime takes
    the tailed set for every set they hold, so the main cases ran those). Returns the relative error and, where a
    second run gave other bits, the largest difference (else 0)."""
    compiled.use_tails = False
    try:
        compiled.bank.write(lora_set)
        with torch.no_grad():
            first = compiled(**inputs, return_dict=False)[0]
            second = compiled(**inputs, return_dict=False)[0]
        if compiled.last_variant != "slots":
            raise ValidationFailedError(f"the runtime ran {compiled.last_variant!r} programs with the tails off",
                                        "report it with `aotpack doctor` output")
    finally:
        compiled.use_tails = True
        compiled.bank.write({})
    difference = 0.0 if torch.equal(first, second) else float((first.float() - second.float()).abs().max())
    return relative_error(first, reference), difference
