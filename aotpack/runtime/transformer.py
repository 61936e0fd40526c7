"""The compiled transformer: loaded programs + bound weights + LoRA slot tensors.

`CompiledFluxTransformer` has the `FluxTransformer2DModel.forward` signature, so a stock diffusers
`FluxPipeline` drives it unchanged. Nothing is compiled here: programs come from the package.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from diffusers.models.modeling_utils import ModelMixin

from ..errors import PackageMismatchError, UnsupportedCallError
from ..machine.cublaslt import check_blas_settings, workspace_hint
from ..models.joined_qkv import member_weight_names
from ..models.tail_groups import TAILS_SUFFIX, is_tail_weight
from ..models.merge_by_address import MERGE_BY_ADDRESS_PROGRAM
from ..models.merge_rows import MERGE_PROGRAM
from ..models.modulation import MODULATION, block_widths, split_step_rows
from ..models.prepare import torch_dtype
from ..models.regions import (
    BLOCK_KINDS,
    DOUBLE_BLOCK,
    EPILOGUE,
    JOINT_INPUT,
    PROLOGUE,
    SINGLE_BLOCK,
    WHOLE,
    instance_slot_prefix,
    prologue_arguments,
    run_joint,
)
from ..models.units import make_region
from ..store.manifest import Manifest
from . import merge_check
from . import program as program_files
from .a_halves_bank import AHalvesBank, a_halves_slot
from .lora_contract import LoraContractMixin
from .address_merge import AddressMerge
from .merge import CompiledMerge, LoRAModes
from .merge_policy import MergePolicy
from .modulation_rows import ModulationRows
from .program import CompiledProgram
from .slot_bank import SlotBank
from .tail_bank import TailBank

logger = logging.getLogger(__name__)


def region_constants(transformer, kind: str, instance: str | None) -> dict[str, torch.Tensor]:
    """The weights of one program instance, named as the program's constants.

    Quantized (tensor-subclass) weights are flattened the way AOTInductor flattened them at build
    time (`parametrizations.<name>.original<i>`), reusing torch's own unwrapping.
    """
    from torch._functorch._aot_autograd.subclass_parametrization import (
        unwrap_tensor_subclass_parameters,
    )
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    region = make_region(transformer, kind, instance)
    if any(is_traceable_wrapper_subclass(p) for p in region.parameters()):
        unwrap_tensor_subclass_parameters(region)
    state = region.state_dict(keep_vars=True)
    joined = member_weight_names(region, state)  # read through their joined weight (recipe lever joined_qkv)
    return {name: tensor.detach() for name, tensor in state.items() if name not in joined}


class _Instance:
    """One program bound to one block's weights, with its LoRA inputs pre-ordered."""

    def __init__(self, program: CompiledProgram, lora_tensors: list[torch.Tensor],
                 layers: frozenset[str] = frozenset()):
        self.program = program
        self.lora_tensors = lora_tensors
        self.layers = layers  # the layers (slot names) whose LoRA inputs it reads
        self.calls = 0  # how often it ran (tests and benchmarks check which variant runs)

    def __call__(self, *activations):
        self.calls += 1
        return self.program([*activations, *self.lora_tensors])


def _as_tuple(output) -> tuple:
    return tuple(output) if isinstance(output, (tuple, list)) else (output,)


class CompiledFluxTransformer(LoraContractMixin, ModelMixin):
    """Drop-in for `FluxTransformer2DModel` inside a `FluxPipeline`, backed by AOTInductor programs.

    A diffusers `ModelMixin` with diffusers' LoRA methods (`lora_contract`), so the pipeline's
    `load_lora_weights` / `set_adapters` / ... drive the LoRA slots.
    """

    def __init__(self, manifest: Manifest, package_dir: Path, transformer, device: str):
        super().__init__()
        self.manifest = manifest
        self.config = transformer.config
        self._dtype = torch_dtype(manifest.dtype)
        self._device = torch.device(device)
        check_blas_settings(self._device)  # before the load's first matmul (the merge check's warm-up)
        if hint := workspace_hint(self._device):  # a library caller's process left cuBLASLt its workspace
            logger.info(hint)
        # The eager model object owns the weights the programs read (bound user-managed):
        # keep it alive, but outside the module tree so pipeline.to() and .parameters() skip it.
        object.__setattr__(self, "_weights_owner", transformer)
        self.bank = SlotBank(manifest.slots, manifest.max_rank, torch_dtype(manifest.lora_dtype), device)
        self.bank.warm_up()
        # lora_tails packages: tailed block programs (single blocks; with lora_tails_mlp_in double blocks too), run while
        # the live set's rank is at most 64 (tail_bank.py);
        # `use_tails = False` keeps such sets in slots (the build's validation checks both)
        self._tail_programs: dict[str, list[_Instance]] = {}
        self.tails = None
        self.use_tails = True
        if manifest.recipe.get("lora_tails") and any(spec.name.endswith(TAILS_SUFFIX) for spec in manifest.programs):
            self.tails = TailBank(transformer, self.bank)
            self.bank.after_write.append(self.tails.refresh)
        # lora_down_fp8_dots packages: A's FP8 halves for the slots whose programs read them, found as programs load
        self.a_halves = AHalvesBank(self.bank)
        self._input_dtypes = {}
        self._programs: dict[str, list[_Instance]] = {}
        # No-slot variants (rank 0) of the slotted programs, bound to the same weight tensors: they run
        # while no LoRA is live or the live set is merged into the weights. Older packages have none.
        self._no_slot_programs: dict[str, list[_Instance]] = {}
        main = [spec for spec in manifest.programs if spec.name == spec.kind]
        # Single blocks take the joint `[text; image]` sequence (regions.JointSingleBlockRegion);
        # packages built before that take text and image apart.
        self._joint_single = any(spec.kind == SINGLE_BLOCK and spec.inputs[0]["name"] == JOINT_INPUT for spec in main)
        if any(spec.kind == "single_pre" and spec.inputs[0]["name"] != JOINT_INPUT for spec in main):
            raise PackageMismatchError(
                "this context-parallel package was built by an earlier aotpack whose split single blocks this "
                "runtime no longer runs", "rebuild it with `aotpack build ... --parallel ulysses`")
        self._instance_index = {spec.kind: {inst: i for i, inst in enumerate(spec.instances)} for spec in main}
        constants = {}
        for spec in manifest.programs:
            if spec.name == spec.kind:
                target = self._programs
                self._input_dtypes[spec.kind] = [getattr(torch, i["dtype"]) for i in spec.inputs]
            elif spec.name == spec.kind + TAILS_SUFFIX and self.tails is not None:
                target = self._tail_programs
            elif spec.rank == 0:
                target = self._no_slot_programs
            else:
                continue  # a variant this runtime does not know: the slotted program covers it
            source = program_files.open_program(Path(package_dir) / spec.file)  # unpacked once, shared
            target[spec.kind] = [self._load_instance(source, spec, instance, constants)
                                 for instance in spec.instances]
        if len(self.a_halves):
            self.bank.after_write.append(self.a_halves.refresh)
        # FP8 packages carry the compiled merge (models/merge_rows.py); older ones merge in eager passes
        self.compiled_merge = None
        if manifest.merge_program == f"{MERGE_PROGRAM}.pt2":
            self.compiled_merge = CompiledMerge(program_files.open_program(Path(package_dir) / manifest.merge_program)
                                                .instantiate(str(self._device)), torch_dtype(manifest.lora_dtype))
        elif manifest.merge_program:
            logger.warning("%s holds the merge program %s, which this runtime does not call (it calls %s.pt2): "
                           "merges take the slower eager passes (rebuild the package for the compiled merge)",
                           package_dir, manifest.merge_program, MERGE_PROGRAM)
        # CUDA packages also carry the in-place merge by address (models/merge_by_address.py), taken first
        self.address_merge = None
        if manifest.merge_by_address_program == f"{MERGE_BY_ADDRESS_PROGRAM}.pt2" and self._device.type == "cuda":
            program = program_files.open_program(Path(package_dir) / manifest.merge_by_address_program)
            self.address_merge = AddressMerge(program.instantiate(str(self._device)), torch_dtype(manifest.lora_dtype))
            self.address_merge.warm(self._device)
        elif manifest.merge_by_address_program and self._device.type == "cuda":  # its first form: other inputs
            logger.warning("%s holds the merge program %s, which this runtime does not call (it calls %s.pt2): "
                           "merges take merge_layers.pt2, ~3x slower (rebuild the package for the faster merge)",
                           package_dir, manifest.merge_by_address_program, MERGE_BY_ADDRESS_PROGRAM)
        if self.compiled_merge is not None and self._device.type == "cuda":
            # each weight shape's first call of the merge program cost ~8 ms on the H200 (per-layer form: a
            # process's first merge of r64-all 201-205 ms, 97 ms after warming; probe_first_merge.py, 2026-12-02).
            # Warmed at the stack sizes a merge of every slot would use: 99-138 ms of load and 2.1 GB more
            # reserved by the allocator; a merge that is a process's first GPU work then takes 130 ms, not 165
            # (after a few steps it buys 0-6 ms; scripts/gpu/probe_load_warm.py,
            # benchmarks/results/2026-12-02d-h200-copyplan-kappend).
            by_address = self.address_merge
            shapes = [(s.out_features, s.in_features) for s in manifest.slots
                      if by_address is None or not by_address.takes_shape(s.out_features, s.in_features)]
            try:  # only the shapes the merge by address leaves to it (with it, FLUX's none: ~0.1 s less load)
                self.compiled_merge.warm(shapes, manifest.max_rank, self._device)
            except torch.cuda.OutOfMemoryError:  # a speed-up only: a merge then sizes its calls to the free memory
                logger.warning("not enough free GPU memory to warm the merge program at load; the first merge per "
                               "weight shape will take a few ms longer")
                torch.cuda.empty_cache()
            merge_check.warm(self._device, self.compiled_merge.dtype, manifest.max_rank)
        self.merged = False  # set by merge.py while a LoRA set is folded into the weights
        # set by merge.py while part of a set is folded (merge_share.py): the (kind, index) of the blocks whose
        # no-slot programs run; the rest of the set stays in the bank
        self.merged_blocks: frozenset[tuple[str, int]] = frozenset()
        self._mixed_programs: tuple[frozenset, dict] = (frozenset(), {})
        # batched_modulation packages: every block's modulation rows from one program, once an image
        self.modulation_rows = None
        if MODULATION in self._programs:
            self._block_widths = block_widths(transformer)
            self.modulation_rows = ModulationRows(self._run_modulation, self._dtype, sum(self._block_widths))
        self.lora_modes = LoRAModes(self, policy=MergePolicy.parse("auto", self._device))
        self.last_variant: str | None = None  # "slots", "no_slots" or "tails": what the last forward ran
        self._step_graphs = None  # use_cuda_graphs(): captured step graphs (cuda_graphs.py)
        self.closed = False  # close(): the weights' memory freed, the programs dropped

    # -- loading ---------------------------------------------------------------------------------
    def _load_instance(self, source: program_files.ProgramFile, spec, instance, cache: dict) -> _Instance:
        program = source.instantiate(str(self._device))
        if (spec.kind, instance) not in cache:  # both variants bind the very same tensors
            cache[spec.kind, instance] = region_constants(self._weights_owner, spec.kind, instance)
        constants = cache[spec.kind, instance]
        expected = set(program.constant_names())
        # the tailed weights are constants of the tailed programs only, which read them instead of their readers'
        # base weights (lora_tails): a tailed program may leave any weight unread, the others only those
        tailed = spec.name.endswith(TAILS_SUFFIX)
        provided = {name for name in constants if name in expected or not (tailed or is_tail_weight(name))}
        if expected != provided:
            missing, extra = sorted(expected - provided), sorted(provided - expected)
            raise PackageMismatchError(
                f"program {spec.file} (instance {instance}) expects weights the model does not provide: "
                f"missing {missing[:8]}, unexpected {extra[:8]}",
                "use the model the package was built from, or rebuild the package for this model",
            )
        program.bind_constants({name: constants[name] for name in expected})
        prefix = instance_slot_prefix(spec.kind, instance)
        for name in program.lora_order:
            if (slot := a_halves_slot(prefix + name)) is not None:
                self.a_halves.add(slot)
        lora_tensors = [self.bank.tensors[prefix + name] for name in program.lora_order]
        layers = frozenset(prefix + name.rsplit(".lora_", 1)[0] for name in program.lora_order)
        return _Instance(program, lora_tensors, layers)

    @torch.no_grad()
    def program_errors(self, inputs: dict) -> dict[str, float]:
        """Each program instance vs its eager region, fed the eager chain's own inputs (worst per kind).

        Errors do not compound here, unlike an end-to-end comparison: this isolates what compiling
        changed in each program. Slots read the current bank tensors in both runs.
        """
        from ..models.examples import relative_error

        owner, errors = self._weights_owner, {}

        def compare(kind, instance, activations):
            region = make_region(owner, kind, instance)
            prefix = instance_slot_prefix(kind, instance)
            expected = region(*activations, {n: self.bank.tensors[prefix + n] for n in region.lora_names()})
            region.bind_lora(None)
            program = self._programs[kind][self._instance_index[kind][instance]]
            actual = program(*self._cast(kind, [a for a in activations if a is not None]))
            expected = _as_tuple(expected)
            actual = _as_tuple(actual)
            worst = max(relative_error(a, e) for a, e in zip(actual, expected))
            errors[kind] = max(errors.get(kind, 0.0), worst)
            return expected

        first = prologue_arguments(inputs)
        if WHOLE in self._programs:
            compare(WHOLE, None, first)
            return errors
        hidden, encoder, temb, cos, sin = compare(PROLOGUE, None, first)
        doubles = [lambda *a, i=instance: compare(DOUBLE_BLOCK, i, a) for instance in
                   self._instance_index.get(DOUBLE_BLOCK, {})]
        singles = [lambda *a, i=instance: compare(SINGLE_BLOCK, i, a) for instance in
                   self._instance_index.get(SINGLE_BLOCK, {})]
        if MODULATION in self._programs:  # one step's rows, from the eager region: the blocks' inputs
            pooled, timestep, guidance = first[2], first[3], first[6]
            (rows,) = compare(MODULATION, None,
                              (pooled[None], timestep[None], None if guidance is None else guidance[None]))
            doubles, singles = self._taking_rows(doubles, singles, rows[0], hidden.shape[0])
        for block in doubles:
            encoder, hidden = block(hidden, encoder, temb, cos, sin)
        hidden = self._single_blocks(singles, hidden, encoder, temb, cos, sin)
        compare(EPILOGUE, None, (hidden, temb))
        return errors

    def unrepeatable_programs(self, **inputs) -> dict[str, float]:
        """One forward in which every program of the variant the bank selects runs twice on the same
        inputs: the programs whose second run gave other bits, with the largest difference. Build
        validation asks this when the whole chain does not repeat, to name where to look."""
        differences = {}
        saved = (self._programs, self._no_slot_programs, self._tail_programs, self._step_graphs)

        def twice(name, instance):
            def run(*activations):
                first, second = instance(*activations), instance(*activations)
                for a, b in zip(_as_tuple(first), _as_tuple(second)):
                    if not torch.equal(a, b):
                        differences[name] = max(differences.get(name, 0.0), float((a.float() - b.float()).abs().max()))
                return first
            return run

        def wrapped(programs, suffix):
            return {kind: [twice(kind + suffix, i) for i in instances] for kind, instances in programs.items()}

        self._programs, self._no_slot_programs = wrapped(saved[0], ""), wrapped(saved[1], ".noslot")
        self._tail_programs = wrapped(saved[2], TAILS_SUFFIX)
        self._step_graphs = None  # a replayed graph would not call the wrappers
        self._mixed_programs = (frozenset(), {})  # nor a partial merge's mix of the unwrapped ones
        try:
            with torch.no_grad():
                self.forward(**inputs, return_dict=False)
        finally:
            self._programs, self._no_slot_programs, self._tail_programs, self._step_graphs = saved
            self._mixed_programs = (frozenset(), {})
        return differences

    def program_constants(self, kind: str, name: str | None = None) -> list[str]:
        """Names of the weights the `kind` program reads (as bound, after quantized-tensor flattening); `name` a
        variant's program name (`single_block.tails`), the slotted program's without it."""
        programs = self._tail_programs if name and name.endswith(TAILS_SUFFIX) else self._programs
        return sorted(programs[kind][0].program.constant_names())

    def weight_layer_names(self) -> set[str]:
        """Module names of the model the weights come from (to tell foreign adapters from unslotted layers)."""
        return {name for name, _ in self._weights_owner.named_modules()}

    # -- what diffusers expects of a transformer -------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def cache_context(self, name: str):
        return contextlib.nullcontext()

    def to(self, *args, **kwargs):
        """Programs are compiled for one device and dtype: moving to another device type is refused; another dtype
        leaves the programs in theirs, with a warning (`pipe.to(torch.float16)` converts the other components
        first, so a refusal here would leave the pipeline half converted)."""
        device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and torch.device(device).type != self._device.type:
            raise UnsupportedCallError(
                f"the compiled transformer lives on {self._device}; it cannot move to {device}",
                "load the package on the device it was built for (see `aotpack inspect`)",
            )
        if dtype is not None and dtype != self._dtype:
            logger.warning("the compiled transformer runs in %s, as its package was built; .to(%s) leaves it in %s "
                           "(its inputs and outputs are cast)", self._dtype, dtype, self._dtype)
        return self

    # -- forward ---------------------------------------------------------------------------------
    @property
    def has_no_slot_programs(self) -> bool:
        return bool(self._no_slot_programs)

    def mergeable_blocks(self) -> list[tuple[tuple[str, int], frozenset[str]]]:
        """The blocks a partial merge may fold, in chain order: `((kind, index), the layers its slotted program
        reads)` for every block instance with a no-slot twin."""
        return [((kind, index), instance.layers) for kind in BLOCK_KINDS if kind in self._no_slot_programs
                for index, instance in enumerate(self._programs.get(kind, []))]

    def _programs_for_call(self) -> dict[str, list[_Instance]]:
        """The no-slot variants while every slot is empty (or the live set is merged), else the slotted
        programs; after a partial merge, the no-slot variant of each folded block and the slotted ones of the
        rest. Input dtypes are the same: variants differ only in their LoRA inputs."""
        if self._no_slot_programs and (self.merged or self.bank.is_empty):
            self.last_variant = "no_slots"
            return {**self._programs, **self._no_slot_programs}
        if self.merged_blocks:
            # one graph per mix (cuda_graphs.py keys on the variant): the folded blocks, named
            self.last_variant = "slots+merged:" + ",".join(f"{kind}.{i}" for kind, i in sorted(self.merged_blocks))
            return self._mixed()
        if self._tail_programs and self.use_tails and self.tails.ready:  # rank <= 64, tails written (tail_bank.py)
            self.last_variant = "tails"
            return {**self._programs, **self._tail_programs}
        self.last_variant = "slots"
        return self._programs

    def _mixed(self) -> dict[str, list[_Instance]]:
        """The programs of the current partial merge, built once per mix."""
        blocks, programs = self._mixed_programs
        if blocks != self.merged_blocks:
            programs = {kind: [self._no_slot_programs[kind][i] if (kind, i) in self.merged_blocks else instance
                               for i, instance in enumerate(instances)] for kind, instances in self._programs.items()}
            self._mixed_programs = (self.merged_blocks, programs)
        return programs

    def _check_shapes(self, hidden_states, encoder_hidden_states) -> None:
        shapes = self.manifest.shapes
        actual = {"batch": hidden_states.shape[0], "image_tokens": hidden_states.shape[1],
                  "text_tokens": encoder_hidden_states.shape[1]}
        for name, value in actual.items():
            low, high = shapes[name]
            if not low <= value <= high:
                raise UnsupportedCallError(
                    f"{name} = {value} is outside the package's compiled range [{low}, {high}]",
                    "pick height/width, batch or max_sequence_length inside the range, or rebuild with a "
                    "recipe whose [shapes] cover it",
                )

    def _cast(self, kind: str, tensors) -> list[torch.Tensor]:
        """Caller tensors in the program's dtype, on its device, dense (programs do not check strides)."""
        return [t.to(device=self._device, dtype=d).contiguous() for t, d in zip(tensors, self._input_dtypes[kind])]

    def _single_blocks(self, blocks, hidden, encoder, temb, cos, sin) -> torch.Tensor:
        """The single blocks; returns the image tokens."""
        if not self._joint_single:  # older packages
            for block in blocks:
                encoder, hidden = block(hidden, encoder, temb, cos, sin)
            return hidden
        return run_joint(blocks, hidden, encoder, temb, cos, sin)

    def _taking_rows(self, doubles, singles, rows: torch.Tensor, batch: int) -> tuple[list, list]:
        """The blocks as callables that take `temb` and pass their own modulation rows (batched_modulation)."""
        per_block = split_step_rows(rows, self._block_widths, batch)
        doubles = [lambda h, e, _temb, c, s, b=b, r=r: b(h, e, r, c, s) for b, r in zip(doubles, per_block)]
        singles = [lambda j, _temb, c, s, b=b, r=r: b(j, r, c, s) for b, r in zip(singles, per_block[len(doubles):])]
        return doubles, singles

    def _run_modulation(self, pooled, timestep, guidance) -> torch.Tensor:
        """The modulation program (slotted: it runs once an image; merged sets leave the bank empty)."""
        args = self._cast(MODULATION, [t for t in (pooled, timestep, guidance) if t is not None])
        return self._programs[MODULATION][0](*args)

    def follow_scheduler(self, holder) -> None:
        """batched_modulation packages: compute each image's modulation rows once, over the timesteps of
        `holder` (a diffusers pipeline, whose current scheduler is read, or a scheduler). The loaders call it
        with their pipeline; without it every step computes its own rows. A no-op for other packages."""
        if self.modulation_rows is not None:
            self.modulation_rows.follow(holder)

    def verified_step_rows(self):
        """A scope (context manager) in which batched_modulation steps take their rows by their pipeline's step
        index, no device read a step, checked when it ends (modulation_rows.py). `AotpackPipeline` calls run in
        one; a diffusers pipeline driven directly (`apply`, `from_pretrained`) gets the speed-up by `with
        pipe.transformer.verified_step_rows(): pipe(...)`. A no-op scope for other packages."""
        if self.modulation_rows is None:
            return contextlib.nullcontext()
        return self.modulation_rows.verified()

    def _chain(self, programs, prologue_inputs, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Prologue, double blocks, single blocks, epilogue: one step of the regional programs. `rows`: this
        step's modulation rows, which the blocks of a batched_modulation package take in place of `temb`."""
        hidden, encoder, temb, cos, sin = programs[PROLOGUE][0](*prologue_inputs)
        doubles, singles = programs.get(DOUBLE_BLOCK, []), programs.get(SINGLE_BLOCK, [])
        if rows is not None:
            doubles, singles = self._taking_rows(doubles, singles, rows, hidden.shape[0])
        for block in doubles:
            encoder, hidden = block(hidden, encoder, temb, cos, sin)
        hidden = self._single_blocks(singles, hidden, encoder, temb, cos, sin)
        sample = programs[EPILOGUE][0](hidden, temb)
        return sample[0] if isinstance(sample, (tuple, list)) else sample

    @property
    def cuda_graphs(self) -> bool:
        return self._step_graphs is not None

    @property
    def cuda_graphs_apply(self) -> bool:
        """CUDA graphs cover regional programs on a CUDA device (not whole-model packages). Split
        (context-parallel) packages capture their collectives too: 2xH200, 1024^2, 2 ranks, the step
        97.6 -> 79.9 ms and the 28-step image 3.27 -> 2.49 s, bit-identical (2026-12-01, random weights,
        benchmarks/results/2026-12-01h-h200x2-context-parallel): without them that step is host-bound."""
        return self._device.type == "cuda" and WHOLE not in self._programs

    def use_cuda_graphs(self, enabled: bool | None = True) -> None:
        """Replay each step's program chain from a CUDA graph captured per input shape (cuda_graphs.py);
        None: wherever they apply (`cuda_graphs_apply`), the loaders' default.

        H200, 2026-12-01 (benchmarks/results/2026-12-01b-h200-cuda-graphs): 512^2 with a r64 LoRA in
        slots 43.9 -> 38.9 ms/step; 1024^2 112.2 -> 111.1 ms (GPU-bound there); outputs bit-identical."""
        if enabled is None:
            enabled = self.cuda_graphs_apply
        if not enabled:
            self._step_graphs = None
            return
        if self._device.type != "cuda":
            raise UnsupportedCallError(f"CUDA graphs need a CUDA device; this transformer runs on {self._device}",
                                       "drop --cuda-graphs (cuda_graphs=True) on this machine")
        if WHOLE in self._programs:
            raise UnsupportedCallError("CUDA graphs cover packages of regional programs; this package is one "
                                       "whole-model program", "drop --cuda-graphs for this package")
        from .cuda_graphs import StepGraphs

        self._step_graphs = StepGraphs(self._device)

    def close(self) -> int:
        """Free the memory of the weights the programs read, now, and drop the programs; returns the bytes freed.

        torch's AOTInductor keeps a reference to every constant bound user-managed (the zero-copy binding this
        runtime uses, so a merge writes the weights the programs read) and never releases it, runner destroyed or
        not (pytorch/pytorch#194480; seen with torch 2.11 and 2.13): a dropped pipeline's weights stayed allocated
        until the process ended, 14.2 GiB for each load of the default FLUX.1-dev package on an H100 (2026-12-06,
        `benchmarks/results/2026-12-06f-h100-package-release/`). Emptying their storages frees that memory; the
        leaked references then hold empty storages. The model the weights came from (`aotpack.apply`'s, too) is
        unusable afterwards, and so is this transformer: a call refuses."""
        if self.closed:
            return 0
        self._step_graphs = None  # graphs replay the programs and hold their own memory pool
        storages = {}
        for programs in (self._programs, self._no_slot_programs, self._tail_programs):
            for instances in programs.values():
                for instance in instances:
                    for tensor in instance.program.bound:
                        storage = tensor.untyped_storage()
                        storages[storage.data_ptr()] = storage
        freed = 0
        for storage in storages.values():
            size = storage.nbytes()
            try:
                storage.resize_(0)
            except RuntimeError:  # not resizable (a file mapped on the CPU): the mapping goes with the process
                continue
            freed += size
        self._programs.clear()
        self._no_slot_programs.clear()
        self._tail_programs.clear()
        self.compiled_merge = self.address_merge = None
        self.closed = True
        return freed

    def refuse_if_closed(self, to: str) -> None:
        """A typed error once `close()` freed the weights: nothing may run on them (`to`: what the caller does)."""
        if self.closed:
            raise UnsupportedCallError("this package was closed: its weights are freed",
                                       f"load the package again (aotpack.load) to {to}")

    def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                img_ids=None, txt_ids=None, guidance=None, joint_attention_kwargs=None,
                controlnet_block_samples=None, controlnet_single_block_samples=None, return_dict=True,
                controlnet_blocks_repeat=False):
        self.refuse_if_closed("generate with it")
        if controlnet_block_samples is not None or controlnet_single_block_samples is not None:
            raise UnsupportedCallError("controlnet residuals are not compiled into this package",
                                       "use the eager transformer for ControlNet pipelines")
        if joint_attention_kwargs:
            raise UnsupportedCallError(
                f"joint_attention_kwargs {sorted(joint_attention_kwargs)} are not supported by compiled programs",
                "set LoRA scales with set_loras([(adapter, scale), ...]) instead of joint_attention_kwargs",
            )
        if txt_ids.ndim == 3:
            txt_ids = txt_ids[0]
        if img_ids.ndim == 3:
            img_ids = img_ids[0]
        self._check_shapes(hidden_states, encoder_hidden_states)
        inputs = [hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids]
        if self.config.guidance_embeds:
            if guidance is None:
                raise UnsupportedCallError("this model embeds guidance but no guidance was passed",
                                           "pass guidance_scale to the pipeline")
            inputs.append(guidance)
        self.lora_modes.before_step(hidden_states.shape[0] * (hidden_states.shape[1] + encoder_hidden_states.shape[1]))
        programs = self._programs_for_call()
        if WHOLE in programs:
            sample = programs[WHOLE][0](*self._cast(WHOLE, inputs))
        else:
            cast = self._cast(PROLOGUE, inputs)
            variant, agree = self.last_variant, None
            if self.manifest.recipe.get("parallel", "none") != "none":  # blocks split around attention
                from .split_forward import communicator, split_forward

                comm = communicator(self)  # every rank captures the same step, collectives included
                variant, agree = f"{variant}/{comm.graph_variant}", comm.all_agree
                body = lambda args: split_forward(self, args, programs)  # noqa: E731
            elif self.modulation_rows is not None:  # this step's rows: a graph input like the others
                state = (self.bank.writes, self.merged)  # what the LoRA part of the rows depends on
                cast.append(self.modulation_rows.rows(pooled_projections, timestep,
                                                      guidance if self.config.guidance_embeds else None, state))
                body = lambda args: self._chain(programs, args[:-1], args[-1])  # noqa: E731
            else:
                body = lambda args: self._chain(programs, args)  # noqa: E731
            if self._step_graphs is not None:
                sample = self._step_graphs.run(self._step_graphs.key(variant, cast), cast, body, agree=agree)
            else:
                sample = body(cast)
        if isinstance(sample, (tuple, list)):
            (sample,) = sample
        if not return_dict:
            return (sample,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=sample)
