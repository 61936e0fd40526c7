"""`aotpack build`: load, quantize, slot, export, compile, validate, write the package."""

from __future__ import annotations

import datetime
import logging
import platform
import time
from pathlib import Path

import torch

from ..errors import AotpackError
from ..machine.compat import check_can_build, gpu_name, versions
from ..machine.toolchain import check_package_shared_objects, require_working_toolchain
from ..models.activations import use_sigmoid_gelu
from ..models.attention import attention_context, check_attention_runs_here, kernels_in_package
from ..models.checkpoint import (
    config_fingerprint,
    load_transformer,
    parse_model_ref,
    structural_config,
)
from ..models.examples import transformer_inputs
from ..models.fused_quant import check_kernel_against_reference, install_fused_gelu_quant, install_lora_up_in_gemm
from ..models.gemm_lora import MIN_IN_FEATURES
from ..models.gemm_lora import check_kernel_against_reference as check_gemm_lora_kernel_against_reference
from ..models.gelu_lora import check_kernel_against_reference as check_gelu_lora_kernel_against_reference
from ..models.lora_down_fp8 import check_kernel_against_reference as check_lora_down_kernel_against_reference
from ..models.lora_down_fp8 import program_lora_inputs
from ..models.lora_tails import check_kernel_against_reference as check_tails_kernel_against_reference
from ..models.lora_up import check_kernel_against_reference as check_lora_up_kernel_against_reference
from ..models.merge_by_address import MERGE_BY_ADDRESS_PROGRAM, export_merge_by_address
from ..models.merge_by_address import check_program as check_merge_program
from ..models.qk_norm_rope import check_kernel_against_reference as check_qk_kernel_against_reference
from ..models.qk_norm_rope import install_fused_qk_norm_rope
from ..models.merge_rows import MERGE_PROGRAM, export_merge_layers
from ..models.norm_quant import check_kernel_against_reference as check_norm_kernel_against_reference
from ..models.norm_quant import install_fused_norm_quant
from ..models.joined_qkv import install_joined_qkv
from ..models.tail_groups import (
    TAILS_SUFFIX,
    block_tail_groups,
    example_tail_inputs,
    install_lora_tails,
    tail_groups,
    with_tails,
)
from ..models.modulation import (
    MODULATION,
    block_index,
    block_widths,
    mark_batched_modulation,
    modulation_example,
    split_step_rows,
    uses_batched_modulation,
)
from ..models.prepare import prepare_transformer, regional_slot_names, torch_dtype
from ..models.quant import quantization_record
from ..models.regions import (
    BLOCK_KINDS,
    EPILOGUE,
    PROLOGUE,
    SINGLE_BLOCK,
    WHOLE,
    block_prefixes,
    instance_slot_prefix,
    prologue_arguments,
)
from ..models.slots import (
    SlotSpec,
    random_slot_tensors,
    select_slot_names,
)
from ..models.units import make_region
from ..progress import Progress
from ..recipes.recipe import TAILS_MAX_RANK, Recipe, load_recipe
from ..runtime.program import open_program
from ..store.manifest import Manifest, ProgramSpec, sha256_file
from ..store.package_ref import DEFAULT_OUT
from ..store.program_metadata import stamp_program
from .compile import compile_programs
from .export import describe_inputs, export_region
from .lora_grouping import group_lora_down_projections, group_lora_up_projections
from .output import OutputDir, removes_staging_on_error
from .validate import validate_package

logger = logging.getLogger(__name__)


def apply_overrides(recipe: Recipe, max_rank=None, slots=None, layout=None, parallel=None,
                    no_slot_programs=None, attention=None) -> Recipe:
    changes = {}
    if no_slot_programs is not None:
        changes["no_slot_programs"] = bool(no_slot_programs)
    if attention:  # an unknown backend is refused by Recipe itself, with the list
        changes["attention"] = attention
    if parallel:
        changes["parallel"] = parallel
        if parallel == "ulysses" and not attention and recipe.attention == "cudnn_fp8":
            # context-parallel attention runs in the runtime between the split programs, in bf16 cuDNN; an explicit
            # --attention cudnn_fp8 with --parallel ulysses is still refused (Recipe.__post_init__)
            logger.warning("--parallel ulysses: attention 'cudnn_fp8' of target %s becomes 'cudnn' (context-parallel "
                           "packages run attention in the runtime, between the split programs)", recipe.name)
            changes["attention"] = "cudnn"
    if recipe.batched_modulation and ((layout and layout != "regional") or (parallel and parallel != "none")):
        logger.warning("--layout/--parallel: target %s's batched_modulation is off for this build (it needs the "
                       "regional layout on one GPU)", recipe.name)
        changes["batched_modulation"] = False
    if recipe.joined_qkv and ((layout and layout != "regional") or (parallel and parallel != "none")):
        logger.warning("--layout/--parallel: target %s's joined_qkv is off for this build (its programs run "
                       "diffusers' own block forward, which reads each projection's weight)", recipe.name)
        changes["joined_qkv"] = False
    if recipe.lora_tails and ((layout and layout != "regional") or (parallel and parallel != "none")):
        logger.warning("--layout/--parallel: target %s's lora_tails is off for this build (its single blocks run "
                       "other programs)", recipe.name)
        changes["lora_tails"] = changes["lora_tails_mlp_in"] = False
    if max_rank is not None:
        if int(max_rank) < 0:
            raise AotpackError(f"max_rank = {max_rank} is negative",
                               "pass --max-rank 0 for a package without LoRA slots, or the largest rank to serve")
        changes["max_rank"] = int(max_rank)
        if recipe.lora_tails and not 0 < int(max_rank) <= TAILS_MAX_RANK:
            logger.warning("--max-rank %s: target %s's lora_tails is off for this build (the tails hold sets up to "
                           "rank %d)", max_rank, recipe.name, TAILS_MAX_RANK)
            changes["lora_tails"] = changes["lora_tails_mlp_in"] = False
    if slots:
        changes["slots"] = tuple(slots)
    if layout:
        changes["layout"] = layout
    return recipe.replace(**changes) if changes else recipe


def tails_for_slots(recipe: Recipe, transformer, slot_names) -> Recipe:
    """`recipe` without its tails where `--slots` left a tail group's reader unslotted (the tails carry the readers'
    LoRA, so they need every reader slotted), as --layout/--parallel/--max-rank turn them off; a recipe file that
    sets both is refused at install instead (`install_lora_tails`)."""
    chosen = set(slot_names)
    missing = [f"{blocks}.{index}.{reader}"
               for blocks, index, _, _, readers in block_tail_groups(transformer, recipe.lora_tails_mlp_in)
               for reader in readers if f"{blocks}.{index}.{reader}" not in chosen]
    if not missing:
        return recipe
    logger.warning("--slots: target %s's lora_tails is off for this build (it needs every tail reader slotted; "
                   "%s and %d more are not)", recipe.name, missing[0], len(missing) - 1)
    return recipe.replace(lora_tails=False, lora_tails_mlp_in=False)


def check_max_rank(transformer, slot_names, max_rank: int) -> None:
    """Refuse a max_rank above the widest side of any slotted linear: the A/B inputs (and the build's memory) grow
    with max_rank (--max-rank 100000000 took a tiny build past 10 GB of memory). The bound is the larger side, not
    the smaller, because over-parameterized files exist (the benches' r64 LoRA on the tiny model's 32-wide layers)
    and served without --fit svd need slots of their full rank."""
    modules = dict(transformer.named_modules())
    limit = max((max(modules[name].in_features, modules[name].out_features) for name in slot_names), default=0)
    if slot_names and max_rank > limit:
        raise AotpackError(f"max_rank = {max_rank} is above {limit}, the widest side of any slotted linear "
                           "(no LoRA factor of these layers is wider)",
                           f"pass --max-rank {limit} or less (or set max_rank in the recipe)")


def _program_plan(transformer, layout: str, parallel: str = "none") -> list[tuple[str, list]]:
    """(kind, instances) for each program to compile, in execution order."""
    if layout == WHOLE:
        return [(WHOLE, [None])]
    plan = [(PROLOGUE, [None])]
    if uses_batched_modulation(transformer):  # recipe lever batched_modulation (models/modulation.py)
        plan.append((MODULATION, [None]))
    if parallel != "none":  # blocks split around attention (context parallel, split_regions.py)
        from ..models.split_regions import split_program_plan

        return plan + split_program_plan(block_prefixes(transformer)) + [(EPILOGUE, [None])]
    plan += [(kind, instances) for kind, instances in block_prefixes(transformer).items() if instances]
    return plan + [(EPILOGUE, [None])]


def _region_activations(kind: str, inputs: dict, prologue_outputs, transformer=None, instance=None) -> tuple:
    from ..models.split_regions import SPLIT_KINDS, split_example_activations

    if kind in SPLIT_KINDS:
        return split_example_activations(transformer, kind, instance, prologue_outputs)
    if kind in (PROLOGUE, WHOLE):
        return prologue_arguments(inputs)
    if kind == MODULATION:
        return modulation_example(inputs)
    hidden, encoder, temb, cos, sin = prologue_outputs
    if uses_batched_modulation(transformer) and kind in BLOCK_KINDS:  # the block's rows in place of temb
        rows = make_region(transformer, MODULATION)(*modulation_example(inputs, steps=1), None)[0]
        temb = split_step_rows(rows, block_widths(transformer), hidden.shape[0])[block_index(transformer, instance)]
    if kind == EPILOGUE:
        return hidden, temb
    if kind == SINGLE_BLOCK:  # the joint sequence (regions.JointSingleBlockRegion)
        return torch.cat([encoder, hidden], dim=1), temb, cos, sin
    return hidden, encoder, temb, cos, sin


def _export_programs(transformer, recipe: Recipe, slot_specs, inputs: dict, shapes: dict, device, generator,
                     report: Progress):
    """Export every program of the layout, yielding (kind, instances, region, activations, exported) as each is
    done."""
    lora_dtype = torch_dtype(recipe.lora_dtype)
    prologue_outputs = None
    if recipe.layout == "regional":  # block programs are traced on the prologue's real outputs
        with torch.no_grad():
            prologue = make_region(transformer, PROLOGUE)
            prologue_outputs = prologue(*_region_activations(PROLOGUE, inputs, None), None)
    for kind, instances in _program_plan(transformer, recipe.layout, recipe.parallel):
        region = make_region(transformer, kind, instances[0])
        activations = _region_activations(kind, inputs, prologue_outputs, transformer, instances[0])
        lora = random_slot_tensors(_relative_specs(slot_specs, region, instances[0]), recipe.max_rank, lora_dtype,
                                   device, generator)
        lora = program_lora_inputs(lora, region.lora_names())  # with A's FP8 halves where slots read them
        with report.stage(f"export {kind}"):
            program = export_region(region, activations, lora, _shard_shapes(shapes, kind, recipe.parallel))
            _group_lora_projections(program, kind, recipe, report)
        yield kind, instances, region, activations, program
        if recipe.no_slot_programs and recipe.max_rank and region.slot_names() and kind not in ONLY_SLOTTED:
            plain = _without_slots(region)
            with report.stage(f"export {kind}{NO_SLOT_SUFFIX}"):
                program = export_region(plain, activations, {}, _shard_shapes(shapes, kind, recipe.parallel))
            yield kind + NO_SLOT_SUFFIX, instances, plain, activations, program
        if recipe.lora_tails and kind in BLOCK_KINDS and tail_groups(region.body):
            tailed = with_tails(region)
            names = set(tailed.lora_names())
            tail_lora = {name: tensor for name, tensor in lora.items() if name in names}
            tail_lora.update(example_tail_inputs(region, lora_dtype, device, generator))
            with report.stage(f"export {kind}{TAILS_SUFFIX}"):  # export_region unbinds the group inputs after
                program = export_region(tailed, activations, tail_lora, _shard_shapes(shapes, kind, recipe.parallel))
                # its other slots as the slotted program's (a double block's q/k/v: one down GEMM a stream)
                _group_lora_projections(program, kind + TAILS_SUFFIX, recipe, report)
            yield kind + TAILS_SUFFIX, instances, tailed, activations, program


def _group_lora_projections(program, name: str, recipe: Recipe, report: Progress) -> None:
    """The recipe's LoRA grouping passes on an exported program, in place (each reports what it changed)."""
    if recipe.group_lora_down and (removed := group_lora_down_projections(program, name)):
        report.info(f"    {name}: grouped LoRA down-projections ({removed} matmuls fewer)")
    if recipe.group_lora_up and (replaced := group_lora_up_projections(program, name)):
        report.info(f"    {name}: {replaced} LoRA up-projections in aotpack::lora_up calls")


NO_SLOT_SUFFIX = ".noslot"
# No-slot twins (same weights, no slot tax while no LoRA is live or a set is merged) are compiled for the blocks.
# Prologue and epilogue run with empty slots instead: their slotted linears (embedders, norm_out, proj_out) see one
# row or few channels, ~0.1 ms of a 1024^2 step by launch count, while their two twins made the H200 build's 9th
# and 10th compile jobs for 8 workers (202 s build, 2026-12-02; the target is 180 s).
# The modulation program (batched_modulation) runs once an image: its slot tax is a few rows.
ONLY_SLOTTED = (PROLOGUE, EPILOGUE, MODULATION)


def _without_slots(region):
    """`region` traced with its slots detached (rank 0): a program with no LoRA inputs that reads the
    very same weights under the very same constant names (a shallow copy shares the submodules)."""
    import copy

    plain = copy.copy(region)
    plain.slot_names = list
    plain.lora_names = list
    plain.bind_lora = lambda lora: region.bind_lora(None)
    return plain


def _shard_shapes(shapes: dict, kind: str, parallel: str) -> dict:
    """Split programs (and a split package's epilogue) see one rank's shard of the tokens: any count
    from 2 up to the full range."""
    from ..models.split_regions import SPLIT_KINDS

    if parallel == "none" or kind not in (*SPLIT_KINDS, EPILOGUE):
        return shapes
    return {**shapes, **{name: [min(2, low), high] for name, (low, high) in shapes.items()
                         if name in ("image_tokens", "text_tokens")}}


def default_compile_workers(device: str) -> int:
    """Programs compiled at once (the build's own process included); a build starts no more than it has programs.

    GPU builds: two cores per worker process (Inductor's codegen is mostly single-threaded), plus the build's
    own process. An h200 package has 9 programs; on the 16-core H200 machine 8 at once left one job waiting for a
    free worker: compile stage 178.4 s of a 227 s build (2026-12-05b, the waiting job 59 s after a worker's ~90).
    9 at once: 161.0 s (758c4c7), and 159.3 s with weightless saves (weightless.py) and exports feeding the
    workers (H200, 2026-12-05c, benchmarks/results/2026-12-05c-h200-weightless-build/).
    One more on GPU builds since 2026-12-07 (10 on 16 cores), so an h100 package's 10 programs (`lora_tails` adds
    `single_block.tails`) start at once too: it built in 219 s with 8 workers (H100, 2026-12-07g) and in 218.8 s with
    10 (H100, 2026-12-07h): the programs share the cores either way.
    CPU builds: one per core. The C++ compile of each program is single-threaded: the tiny CPU
    package took 111 s with 2 workers against 142 s in-process on a 2-core machine (2026-12-01)."""
    import os

    cores = os.cpu_count() or 1
    return max(1, cores if device == "cpu" else cores // 2 + 2)


def default_package_dir(model_id: str, target: str) -> Path:
    return DEFAULT_OUT / f"{model_id.replace('/', '--')}-{target}"


@removes_staging_on_error
def build_package(model: str = "tiny", target: str = "cpu", *, out=None, overwrite: bool = False,
                  revision: str | None = None,
                  max_rank: int | None = None, slots=None, layout: str | None = None, parallel: str | None = None,
                  compile_workers: int | None = None, no_slot_programs: bool | None = None,
                  attention: str | None = None, progress: bool | Progress = True) -> Path:
    """Build a package for `model` on `target` and return its directory. Keyword arguments left None
    take the recipe's values."""
    report = progress if isinstance(progress, Progress) else Progress(enabled=bool(progress))
    started = time.perf_counter()
    recipe = apply_overrides(load_recipe(target), max_rank=max_rank, slots=slots, layout=layout, parallel=parallel,
                             no_slot_programs=no_slot_programs, attention=attention)
    check_can_build(recipe.name, recipe.device, recipe.gpu_arch)
    check_attention_runs_here(recipe.attention)  # validation runs the programs: their attention op must run here
    cxx = require_working_toolchain()  # refuse a compiler whose packages would segfault at load
    ref = parse_model_ref(model, revision)
    out = Path(out) if out else default_package_dir(ref.model_id, recipe.name)
    output = OutputDir(out, overwrite)  # refuses a user's folder (or a package, without overwrite) before any work
    device = "cuda" if recipe.device == "cuda" else "cpu"
    report.info(f"aotpack build: {ref.describe()} for target {recipe.name} ({recipe.description}), "
                f"max_rank {recipe.max_rank}, {recipe.layout} layout"
                + (f", parallel {recipe.parallel}" if recipe.parallel != "none" else "") + f" -> {out}")

    with report.stage("load transformer"):
        transformer = load_transformer(ref, torch_dtype(recipe.dtype), device)
        config = structural_config(dict(transformer.config))
    if recipe.parallel != "none":
        from ..models.split_regions import check_parallel_build

        check_parallel_build(recipe, config)
    with report.stage(f"prepare ({recipe.dtype}, quantization {recipe.quantization}, LoRA slots)"):
        if recipe.max_rank == 0:  # a base-only package: no LoRA inputs at all
            names = []
        elif recipe.layout == "regional":
            names = regional_slot_names(transformer, recipe.slots)
        else:
            names = select_slot_names(transformer, recipe.slots)
        check_max_rank(transformer, names, recipe.max_rank)  # before any slot tensor of that rank is made
        if slots and recipe.lora_tails:
            recipe = tails_for_slots(recipe, transformer, names)
        slot_specs = prepare_transformer(transformer, dtype=recipe.dtype, device=device,
                                         quantization=recipe.quantization, slot_names=names,
                                         unquantized_linears=recipe.unquantized_linears)
        report.info(f"    {len(slot_specs)} slotted linear layers, rank {recipe.max_rank}")
        if recipe.fused_gelu_quant:  # GELU (+ concat) + FP8 quantization in one op; names do not change
            routed = install_fused_gelu_quant(transformer, lora_down_from_fp8=recipe.lora_down_from_fp8,
                                              fused_gelu_lora=recipe.fused_gelu_lora,
                                              lora_down_fp8_gemm=recipe.lora_down_fp8_gemm,
                                              lora_down_fp8_dots=recipe.lora_down_fp8_dots,
                                              lora_down_fp8_text=recipe.lora_down_fp8_text)
            report.info(f"    {routed} MLP GELUs fused into the FP8 quantization"
                        + (", their next linears' LoRA read its FP8 output" if recipe.lora_down_from_fp8 else "")
                        + (" by an FP8 GEMM" if recipe.lora_down_fp8_gemm else "")
                        + (" by FP8 dots against A's FP8 halves" if recipe.lora_down_fp8_dots else "")
                        + (", the text stream's too" if recipe.lora_down_fp8_text else "")
                        + (", with the LoRA projections around them" if recipe.fused_gelu_lora else ""))
            if torch.device(device).type == "cuda":
                check_kernel_against_reference(device)
                if recipe.lora_down_from_fp8:
                    check_lora_down_kernel_against_reference(device, dots=recipe.lora_down_fp8_dots)
                if recipe.fused_gelu_lora:
                    check_gelu_lora_kernel_against_reference(device)
        if recipe.fused_qk_norm_rope:  # q/k epilogue + norms + RoPE in one op per tensor; names do not change
            fused = install_fused_qk_norm_rope(transformer, quantize_qk=recipe.fp8_qk_in_norm_rope)
            report.info(f"    {fused} attentions take q/k norms + RoPE in one op"
                        + (", which writes q/k in FP8 for FP8 attention" if recipe.fp8_qk_in_norm_rope else ""))
            if torch.device(device).type == "cuda":
                check_qk_kernel_against_reference(device)
        if recipe.fused_norm_quant:  # each block norm + modulation quantized once for its FP8 linears
            report.info(f"    {install_fused_norm_quant(transformer)} blocks quantize each norm once for their linears")
            if torch.device(device).type == "cuda":
                check_norm_kernel_against_reference(device)
        if recipe.joined_qkv:  # after quantizing and slotting: the members' FP8 rows move into one buffer
            report.info(f"    {install_joined_qkv(transformer)} q/k/v groups run as one FP8 GEMM each")
        if recipe.lora_tails:  # after quantizing and slotting: each tail group's readers get tailed weights
            groups = install_lora_tails(transformer, mlp_in=recipe.lora_tails_mlp_in, paired=recipe.lora_tails_paired)
            where = ("single blocks' q/k/v/MLP-in" + (", q/k and v/MLP-in in pairs" if recipe.lora_tails_paired else "")
                     + (", double blocks' MLP-in" if recipe.lora_tails_mlp_in else ""))
            report.info(f"    {groups} tail groups ({where}) also compiled with LoRA tails")
            if torch.device(device).type == "cuda":
                check_tails_kernel_against_reference(device, paired=recipe.lora_tails_paired)
        if recipe.gelu_via_sigmoid != "none":  # inside the programs only: weights and slots keep their names
            report.info(f"    {use_sigmoid_gelu(transformer, recipe.gelu_via_sigmoid)} GELUs computed as x * sigmoid(2u)")
        if recipe.batched_modulation:  # block programs take their modulation rows from the modulation program
            mark_batched_modulation(transformer)
            report.info("    AdaLN modulation linears in one program, run once an image")
        if recipe.group_lora_up and torch.device(device).type == "cuda":
            check_lora_up_kernel_against_reference(device)
        if recipe.lora_up_in_gemm:  # each FP8 slot's GEMM adds its bias and LoRA before its store
            marked = install_lora_up_in_gemm(transformer)
            report.info(f"    {marked} FP8 slots add their LoRA in the GEMM's epilogue"
                        + ("" if marked else f" (it takes slots of {MIN_IN_FEATURES} inputs or more: none here)"))
            if torch.device(device).type == "cuda":
                check_gemm_lora_kernel_against_reference(device)

    staging = output.open()  # this build's own folder next to `out`; removed if the build fails
    shapes = {"batch": list(recipe.batch), "image_tokens": list(recipe.image_tokens),
              "text_tokens": list(recipe.text_tokens)}
    generator = torch.Generator().manual_seed(0)
    # A size-1 example would make export specialise the batch dim to 1: trace with batch 2 if allowed.
    export_batch = max(recipe.example_batch, min(2, recipe.batch[1]))
    inputs = transformer_inputs(transformer.config, batch=export_batch,
                                image_tokens=recipe.example_image_tokens, text_tokens=recipe.example_text_tokens,
                                dtype=torch_dtype(recipe.dtype), device=device, generator=generator)
    merge_program = merge_by_address_program = None
    if recipe.quantization == "fp8_rowwise" and recipe.max_rank > 0:  # merged LoRA sets re-quantize rows
        merge_program = f"{MERGE_PROGRAM}.pt2"
        if recipe.merge_by_address and torch.device(device).type == "cuda":  # writes by address: CUDA only
            merge_by_address_program = f"{MERGE_BY_ADDRESS_PROGRAM}.pt2"
    exported, jobs = [], []  # filled as the exports go

    def compile_jobs():
        """Each program as soon as it is exported: its compile starts in a worker while the next exports."""
        with attention_context(transformer, recipe.attention, recipe.fp8_attention_min_tokens):
            for item in _export_programs(transformer, recipe, slot_specs, inputs, shapes, device, generator, report):
                exported.append(item)
                jobs.append((item[0], item[4], staging / f"{item[0]}.pt2"))
                yield jobs[-1]
        lora_dtype = torch_dtype(recipe.lora_dtype)
        for name, file, export in ((MERGE_PROGRAM, merge_program, export_merge_layers),
                                   (MERGE_BY_ADDRESS_PROGRAM, merge_by_address_program, export_merge_by_address)):
            if file:
                with report.stage(f"export {name}"):
                    jobs.append((name, export(lora_dtype, device), staging / file))
                yield jobs[-1]

    workers = compile_workers or default_compile_workers(device)
    compile_timings = compile_programs(compile_jobs(), workers=workers, inductor_configs=recipe.inductor_configs,
                                       attention=recipe.attention, needs_torchao=recipe.quantization != "none",
                                       report=report)
    workers = min(workers, len(jobs))
    export_seconds = {kind: report.timings[f"export {kind}"] for kind, *_ in exported}
    for _, _, path in jobs:
        check_package_shared_objects(path)
    programs = []
    for kind, instances, region, activations, _ in exported:
        path = staging / f"{kind}.pt2"
        variant_of = kind.removesuffix(NO_SLOT_SUFFIX).removesuffix(TAILS_SUFFIX)
        programs.append(ProgramSpec(name=kind, kind=variant_of, file=path.name, instances=list(instances),
                                    inputs=describe_inputs(region, activations), slots=region.slot_names(),
                                    constants=[], attention_kernels=kernels_in_package(path),
                                    rank=0 if kind.endswith(NO_SLOT_SUFFIX) else recipe.max_rank))
    del exported

    manifest = Manifest(
        target=recipe.name, device=recipe.device, gpu_arch=recipe.gpu_arch, versions=versions(),
        model={"id": ref.model_id, "revision": ref.revision, "fingerprint": config_fingerprint(config),
               "config": config},
        dtype=recipe.dtype, lora_dtype=recipe.lora_dtype,
        quantization=quantization_record(recipe.quantization, recipe.unquantized_linears),
        attention=recipe.attention, max_rank=recipe.max_rank, slot_patterns=list(recipe.slots), slots=slot_specs,
        shapes=shapes, layout=recipe.layout, programs=programs, validation={},
        build={}, inductor_configs=recipe.inductor_configs, recipe=recipe.to_json(), merge_program=merge_program,
        merge_by_address_program=merge_by_address_program,
    )
    with report.stage("validate against eager diffusers"):
        manifest.validation = validate_package(staging, manifest, transformer, recipe, device, report)
    if merge_by_address_program:
        with report.stage(f"check {MERGE_BY_ADDRESS_PROGRAM} against the merge's math"):
            program = open_program(staging / merge_by_address_program).instantiate(str(device))
            manifest.validation[MERGE_BY_ADDRESS_PROGRAM] = check_merge_program(
                program, torch_dtype(recipe.lora_dtype), device)
    manifest.build = {
        "seconds": round(time.perf_counter() - started, 1),
        "export_seconds": {k: round(v, 2) for k, v in export_seconds.items()},
        "compile_seconds": {k: t.seconds for k, t in compile_timings.items()},
        "compile_cpu_seconds": {k: t.cpu_seconds for k, t in compile_timings.items()},  # the compiling thread's
        "compile_phases": {k: t.phases for k, t in compile_timings.items()},  # torch's timers, nested, largest
        "compile_process_seconds": {k: t.process_seconds for k, t in compile_timings.items()  # start + load too
                                    if t.process_seconds is not None},
        "compile_workers": workers,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "gpu": gpu_name(),
        "compiler": cxx,
    }
    for spec in programs:  # the compiled max_rank/slots/inputs/shapes travel inside each program (in its sha256)
        stamp_program(staging / spec.file, spec, recipe.max_rank, manifest.slot_table(), shapes)
    manifest.files = {f: sha256_file(staging / f) for f in manifest.program_files()}
    manifest.write(staging)
    output.commit()  # atomic swap under out's lock; a replaced package is removed only afterwards
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
