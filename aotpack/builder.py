"""`aotpack build`: load, quantize, slot, export, compile, validate, write the package."""

from __future__ import annotations

import datetime
import platform
import shutil
import time
from pathlib import Path

import torch

from .aoti import compile_programs, describe_inputs, export_region
from .attention import attention_context, kernels_in_package
from .doctor import require_working_toolchain
from .errors import AotpackError, ValidationFailedError
from .examples import relative_error, transformer_inputs
from .lora_grouping import group_lora_down_projections
from .machine import check_can_build, gpu_name, versions
from .manifest import Manifest, ProgramSpec, sha256_file
from .models import (
    config_fingerprint,
    load_transformer,
    parse_model_ref,
    structural_config,
)
from .prepare import prepare_transformer, regional_slot_names, torch_dtype
from .progress import Progress
from .quant import quantization_record
from .recipe import Recipe, load_recipe
from .regions import (
    EPILOGUE,
    PROLOGUE,
    WHOLE,
    block_prefixes,
    instance_slot_prefix,
    make_region,
    prologue_arguments,
)
from .slots import (
    SlotSpec,
    bind_slot_tensors,
    lora_input_names,
    random_slot_tensors,
    select_slot_names,
)
from .toolchain import check_package_shared_objects

DEFAULT_OUT = Path("artifacts") / "packages"


def apply_overrides(recipe: Recipe, max_rank=None, slots=None, layout=None) -> Recipe:
    changes = {}
    if max_rank is not None:
        if int(max_rank) < 0:
            raise AotpackError(f"max_rank = {max_rank} is negative",
                               "pass --max-rank 0 for a package without LoRA slots, or the largest rank to serve")
        changes["max_rank"] = int(max_rank)
    if slots:
        changes["slots"] = tuple(slots)
    if layout:
        changes["layout"] = layout
    return recipe.replace(**changes) if changes else recipe


def _program_plan(transformer, layout: str) -> list[tuple[str, list]]:
    """(kind, instances) for each program to compile, in execution order."""
    if layout == WHOLE:
        return [(WHOLE, [None])]
    plan = [(PROLOGUE, [None])]
    plan += [(kind, instances) for kind, instances in block_prefixes(transformer).items() if instances]
    return plan + [(EPILOGUE, [None])]


def _region_activations(kind: str, inputs: dict, prologue_outputs) -> tuple:
    if kind in (PROLOGUE, WHOLE):
        return prologue_arguments(inputs)
    hidden, encoder, temb, cos, sin = prologue_outputs
    if kind == EPILOGUE:
        return hidden, temb
    return hidden, encoder, temb, cos, sin


def _validate(package_dir: Path, manifest: Manifest, transformer, recipe: Recipe, device: str,
              progress: Progress) -> dict:
    """Check the package (bound to this very model) against eager, with random LoRA tensors in the slots.

    Two checks: every program against its eager region on identical inputs (`tolerance`), and the
    whole transformer against diffusers' own forward, which also covers how the runtime chains the
    programs (`end_to_end_tolerance`; rounding differences compound across blocks).
    """
    from .runtime import CompiledFluxTransformer

    cases = [(recipe.example_batch, recipe.example_image_tokens, recipe.example_text_tokens)]
    cases.append((min(recipe.batch[1], recipe.example_batch + 1), recipe.image_tokens[0], recipe.text_tokens[0] + 1))
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
        spec.constants = compiled.program_constants(spec.kind)
    full_lora = {spec.name: [(lora[a], lora[b])] for spec in manifest.slots for a, b in [lora_input_names(spec.name)]}
    results, worst_end_to_end, program_errors = [], 0.0, {}
    with torch.no_grad():
        for (batch, image_tokens, text_tokens), (inputs, with_lora, without_lora) in zip(cases, references):
            compiled.bank.write({})
            error_plain = relative_error(compiled(**inputs, return_dict=False)[0], without_lora)
            compiled.bank.write(full_lora)
            error_lora = relative_error(compiled(**inputs, return_dict=False)[0], with_lora)
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
    progress.info("    per program (worst instance, random LoRA): "
                  + ", ".join(f"{k} {v:.2e}" for k, v in program_errors.items()))
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
            "program_rel_errors": program_errors, "cases": results,
            "reference": "diffusers FluxTransformer2DModel.forward / eager regions, same weights and quantization"}


def _export_programs(transformer, recipe: Recipe, slot_specs, inputs: dict, shapes: dict, device, generator,
                     report: Progress):
    """Export every program of the layout; returns [(kind, instances, region, activations, exported)]."""
    lora_dtype = torch_dtype(recipe.lora_dtype)
    prologue_outputs = None
    if recipe.layout == "regional":  # block programs are traced on the prologue's real outputs
        with torch.no_grad():
            prologue = make_region(transformer, PROLOGUE)
            prologue_outputs = prologue(*_region_activations(PROLOGUE, inputs, None), None)
    exported = []
    for kind, instances in _program_plan(transformer, recipe.layout):
        region = make_region(transformer, kind, instances[0])
        activations = _region_activations(kind, inputs, prologue_outputs)
        lora = random_slot_tensors(_relative_specs(slot_specs, region, instances[0]), recipe.max_rank, lora_dtype,
                                   device, generator)
        with report.stage(f"export {kind}"):
            program = export_region(region, activations, lora, shapes)
            if recipe.group_lora_down and (removed := group_lora_down_projections(program, kind)):
                report.info(f"    {kind}: grouped LoRA down-projections ({removed} matmuls fewer)")
        exported.append((kind, instances, region, activations, program))
    return exported


def default_compile_workers(device: str, programs: int) -> int:
    """Parallel compile processes: one per program on a many-core GPU build machine, else 1."""
    import os

    if device == "cpu":
        return 1
    return max(1, min(programs, (os.cpu_count() or 1) // 4))


def default_package_dir(model_id: str, target: str) -> Path:
    return DEFAULT_OUT / f"{model_id.replace('/', '--')}-{target}"


def build_package(model: str = "tiny", target: str = "cpu", *, out=None, revision: str | None = None,
                  max_rank: int | None = None, slots=None, layout: str | None = None,
                  compile_workers: int | None = None, progress: bool | Progress = True) -> Path:
    """Build a package for `model` on `target` and return its directory."""
    report = progress if isinstance(progress, Progress) else Progress(enabled=bool(progress))
    started = time.perf_counter()
    recipe = apply_overrides(load_recipe(target), max_rank=max_rank, slots=slots, layout=layout)
    check_can_build(recipe.name, recipe.device, recipe.gpu_arch)
    cxx = require_working_toolchain()  # refuse a compiler whose packages would segfault at load
    ref = parse_model_ref(model, revision)
    out = Path(out) if out else default_package_dir(ref.model_id, recipe.name)
    device = "cuda" if recipe.device == "cuda" else "cpu"
    report.info(f"aotpack build: {ref.describe()} for target {recipe.name} ({recipe.description}), "
                f"max_rank {recipe.max_rank}, {recipe.layout} layout -> {out}")

    with report.stage("load transformer"):
        transformer = load_transformer(ref, torch_dtype(recipe.dtype), device)
        config = structural_config(dict(transformer.config))
    with report.stage(f"prepare ({recipe.dtype}, quantization {recipe.quantization}, LoRA slots)"):
        if recipe.max_rank == 0:  # a base-only package: no LoRA inputs at all
            names = []
        elif recipe.layout == "regional":
            names = regional_slot_names(transformer, recipe.slots)
        else:
            names = select_slot_names(transformer, recipe.slots)
        slot_specs = prepare_transformer(transformer, dtype=recipe.dtype, device=device,
                                         quantization=recipe.quantization, slot_names=names)
        report.info(f"    {len(slot_specs)} slotted linear layers, rank {recipe.max_rank}")

    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shapes = {"batch": list(recipe.batch), "image_tokens": list(recipe.image_tokens),
              "text_tokens": list(recipe.text_tokens)}
    generator = torch.Generator().manual_seed(0)
    # A size-1 example would make export specialise the batch dim to 1: trace with batch 2 if allowed.
    export_batch = max(recipe.example_batch, min(2, recipe.batch[1]))
    inputs = transformer_inputs(transformer.config, batch=export_batch,
                                image_tokens=recipe.example_image_tokens, text_tokens=recipe.example_text_tokens,
                                dtype=torch_dtype(recipe.dtype), device=device, generator=generator)
    with attention_context(transformer, recipe.attention):
        exported = _export_programs(transformer, recipe, slot_specs, inputs, shapes, device, generator, report)
    export_seconds = {kind: report.timings[f"export {kind}"] for kind, *_ in exported}
    workers = compile_workers or default_compile_workers(device, len(exported))
    compile_seconds = compile_programs([(kind, ep, staging / f"{kind}.pt2") for kind, _, _, _, ep in exported],
                                       workers=workers, inductor_configs=recipe.inductor_configs,
                                       attention=recipe.attention, needs_torchao=recipe.quantization != "none",
                                       report=report)
    programs = []
    for kind, instances, region, activations, _ in exported:
        path = staging / f"{kind}.pt2"
        check_package_shared_objects(path)
        programs.append(ProgramSpec(name=kind, kind=kind, file=path.name, instances=list(instances),
                                    inputs=describe_inputs(region, activations), slots=region.slot_names(),
                                    constants=[], attention_kernels=kernels_in_package(path)))
    del exported

    manifest = Manifest(
        target=recipe.name, device=recipe.device, gpu_arch=recipe.gpu_arch, versions=versions(),
        model={"id": ref.model_id, "revision": ref.revision, "fingerprint": config_fingerprint(config),
               "config": config},
        dtype=recipe.dtype, lora_dtype=recipe.lora_dtype, quantization=quantization_record(recipe.quantization),
        attention=recipe.attention, max_rank=recipe.max_rank, slot_patterns=list(recipe.slots), slots=slot_specs,
        shapes=shapes, layout=recipe.layout, programs=programs, validation={},
        build={}, inductor_configs=recipe.inductor_configs, recipe=recipe.to_json(),
    )
    with report.stage("validate against eager diffusers"):
        manifest.validation = _validate(staging, manifest, transformer, recipe, device, report)
    manifest.build = {
        "seconds": round(time.perf_counter() - started, 1),
        "export_seconds": {k: round(v, 2) for k, v in export_seconds.items()},
        "compile_seconds": {k: round(v, 2) for k, v in compile_seconds.items()},
        "compile_workers": workers,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "gpu": gpu_name(),
        "compiler": cxx,
    }
    manifest.files = {p.file: sha256_file(staging / p.file) for p in programs}
    manifest.write(staging)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    size_mb = manifest.total_bytes(out) / 1e6
    report.info(f"package written: {out} ({len(programs)} programs, {size_mb:.1f} MB, built in "
                f"{manifest.build['seconds']:.0f} s)")
    return out


def _relative_specs(slot_specs, region, instance) -> list[SlotSpec]:
    """Slot specs of one region, named relative to it (a block program sees `attn.to_q`)."""
    table = {s.name: s for s in slot_specs}
    prefix = instance_slot_prefix(region.kind, instance)
    return [SlotSpec(name, table[prefix + name].in_features, table[prefix + name].out_features)
            for name in region.slot_names()]
