"""`aotpack.load`: a package + a model's weights -> a diffusers pipeline with hot-swappable LoRAs."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import time
from pathlib import Path

import torch

from ..adapters.cache import AdapterCache
from ..adapters.parse import Adapter
from ..adapters.stack import StackReport, stack_adapters
from ..adapters.text_encoder import TextEncoderLoRA
from ..errors import NonFiniteOutputError, RequestError, UnsupportedCallError
from ..machine.compat import check_package_runs_here
from ..models.attention import check_attention_runs_here
from ..models.checkpoint import (
    config_fingerprint,
    load_pipeline,
    load_transformer,
    load_transformer_config,
    parse_model_ref,
)
from ..models.joined_qkv import install_joined_qkv
from ..models.tail_groups import install_lora_tails
from ..models.modulation import mark_batched_modulation
from ..models.prepare import prepare_transformer, torch_dtype
from ..progress import Progress
from ..store.manifest import Manifest, read_manifest, recorded_model, verify_files
from .merge import MERGED, SLOTS
from .merge_policy import MergePolicy
from .requests import check_loras
from .transformer import CompiledFluxTransformer


@dataclasses.dataclass
class SwitchResult:
    """What `set_loras` did and how long it took (seconds, device work included)."""

    adapters: list[tuple[str, float]]
    seconds: float
    parsed: int  # adapters read from disk for this switch (0: all came from the cache)
    report: StackReport

    @property
    def notes(self) -> list[str]:
        """What the user should know: keys dropped or zero parts skipped per adapter, SVD-fit energy."""
        return [f"{name}: {note}" for name, notes in self.adapter_notes for note in notes] + self.report.notes

    adapter_notes: list[tuple[str, list[str]]] = dataclasses.field(default_factory=list)
    # where the time went, ms: resolve (cache lookups / parses), stack (checks + slot layout), write
    # (bank copies or merge), sync (waiting for those copies on this stream)
    phases_ms: dict[str, float] = dataclasses.field(default_factory=dict)


def _synchronize(device: torch.device) -> None:
    """Wait for this stream's work only: a device-wide sync would also wait for a prefetcher's copy of
    the next adapter on its side stream (the likely cause of 69 ms median "prefetched" switches in the
    H200 serve-load run of 2026-11-30, against 15 ms for a cached r64-all switch alone)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class AotpackPipeline:
    """A `FluxPipeline` whose transformer is the compiled package, plus the active LoRA set."""

    def __init__(self, manifest: Manifest, package_dir: Path, transformer: CompiledFluxTransformer, pipeline,
                 cache: AdapterCache):
        self.manifest = manifest
        self.package_dir = package_dir
        self.transformer = transformer
        self.pipeline = pipeline
        self.cache = cache
        self.text_encoder_lora = TextEncoderLoRA(pipeline)
        self._bank_watch = _BankWatch(transformer)
        self.auto_merge_after: int | None = None  # merge a set after N consecutive switches to it (off)
        self._same_set_count = 0  # consecutive calls with the live set (auto_merge_after)
        # the (adapter, scale) entries and fit `enter` made live, and the bank's write count right after
        self._live: tuple[list, str | None, int] = ([], None, -1)
        self._live_pins = object()  # the cache's owner of the live set's pins (`set_loras`)
        self._model_layers = set(manifest.slot_table()) | set(transformer.weight_layer_names())

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def close(self) -> int:
        """Free the package's weights on the device now (`CompiledFluxTransformer.close`: torch's AOTInductor keeps
        them referenced after the pipeline is dropped); returns the bytes freed. For a process that loads packages
        one after another: without it each earlier load's weights stay allocated until the process ends (the rest,
        adapters and text encoders, goes with the pipeline object). The pipeline refuses generation afterwards.
        `with aotpack.load(...) as served:` closes it on leaving the block."""
        return self.transformer.close()

    def __enter__(self) -> "AotpackPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _resolve(self, entry, pin) -> tuple[Adapter, float, bool]:
        adapter_or_source, scale = entry  # checked by `check_loras` in set_loras
        if isinstance(adapter_or_source, Adapter):
            return adapter_or_source.to(self.cache.device, self.cache.dtype), scale, False
        was_cached = adapter_or_source in self.cache
        # pinned under `pin` as it is got: a later entry of this set cannot evict it
        return self.cache.get(adapter_or_source, pin=pin), scale, not was_cached

    def set_loras(self, loras=(), *, fit: str | None = None, merge: bool | None = None) -> SwitchResult:
        """Make `loras` the active set, each entry `x` or `(x, scale)` where `x` is a local file or
        folder, a Hub file `owner/repo/file.safetensors`, an `AdapterSource(repo_id, weight_name,
        revision)` or a parsed `Adapter`. `fit="svd"` compresses stacks above max_rank.
        `merge=True` folds the set into the bound base weights and runs the no-slot programs; the
        next switch unmerges first. `merge=None` (default) starts in slots and lets the merge policy
        (`load_package(merge_policy=...)`, runtime/merge_policy.py) merge before a step once the set's
        steps pay for it; `merge=False` keeps this set in slots.

        Everything is parsed and checked before anything changes: a rejected set leaves the
        active one exactly as it was. An empty list deactivates all adapters.
        """
        started = time.perf_counter()
        self.transformer.refuse_if_closed("switch LoRAs on it")  # its programs and merge kernels are gone
        # NaN/Inf/huge scales, a dict (ran at scale 1.0), a bare path (one adapter per character), odd entries:
        # refused before any file is read
        loras = check_loras(loras, example='[("style.safetensors", 0.8)]')
        if merge is not None and not isinstance(merge, bool):  # merge="false" would merge
            raise RequestError(f"merge = {merge!r} is not True, False or None",
                               "pass merge=True (fold the set in now), merge=False (keep it in slots) or leave it "
                               "out (the merge policy decides)")
        cache, resolving = self.cache, object()  # this call's pins, while it resolves and checks the set
        try:
            return self._switch(loras, fit, merge, started, cache, resolving)
        finally:
            cache.unpin(resolving)  # the set is live (pinned as such) or refused: the previous live pins stand

    def _switch(self, loras, fit, merge, started, cache, resolving) -> SwitchResult:
        resolved = [self._resolve(entry, resolving) for entry in loras]
        marks = [time.perf_counter()]
        entries = [(adapter, scale) for adapter, scale, _ in resolved]
        layers, report = stack_adapters(entries, self.manifest.slot_table(), self.manifest.max_rank, fit=fit,
                                        model_layers=self._model_layers)
        self.text_encoder_lora.activate(entries)  # loads any new CLIP parts; on error nothing changed
        same = self._is_live_set(entries, fit) and self._bank_watch.untouched()  # else the bank holds another set
        self._same_set_count = self._same_set_count + 1 if same else 1
        if merge is None and self.auto_merge_after and self._same_set_count >= self.auto_merge_after:
            merge = True  # the same set N times in a row: fold it in (see merge.py); merge=False stays pinned
        marks.append(time.perf_counter())
        try:
            if not (entries and same and self._live_mode_accepts(merge)):
                self.transformer.lora_modes.enter(layers, merge=merge)
                self._live = (entries, fit, self.transformer.lora_modes.bank_writes)
                self._bank_watch.ours()
        except BaseException:  # e.g. out of memory mid-merge: the transformer is back on its base weights
            self.text_encoder_lora.activate([])  # so no LoRA is active anywhere, and `active` says so
            self._same_set_count, self._live = 0, ([], None, -1)
            self._bank_watch.ours()  # the base weights and an empty bank: known
            cache.unpin(self._live_pins)  # no set is live
            raise
        cache.pin(self._live_pins, cache.pins_of(resolving))  # the live set's entries: kept while it stays live
        marks.append(time.perf_counter())
        _synchronize(self.device)
        marks.append(time.perf_counter())
        phases = dict(zip(("resolve", "stack", "write", "sync"),
                          ((b - a) * 1000 for a, b in zip([started, *marks], marks))))
        return SwitchResult(adapters=[(adapter.name, scale) for adapter, scale in entries], seconds=marks[-1] - started,
                            parsed=sum(parsed for *_, parsed in resolved), report=report,
                            adapter_notes=[(adapter.name, adapter.notes) for adapter, _ in entries if adapter.notes],
                            phases_ms=phases)

    @property
    def active(self) -> list[tuple[str, float]] | None:
        """The live set as `(name, scale)` pairs; None when it is unknown (`live_set_known`)."""
        if self._unknown_because() is not None:
            return None
        return [(adapter.name, scale) for adapter, scale in self._live[0]]  # a repeated set leaves `_live` as is

    @property
    def live_set_known(self) -> bool:
        """False once diffusers' LoRA calls on `.pipeline` (or any other writer of the slot bank) changed what runs
        since the last `set_loras`: `active` and `live_adapters()` would describe a set that no longer runs."""
        return self._unknown_because() is None

    def live_adapters(self) -> list[tuple[Adapter, float]]:
        """The active set's parsed adapters with their scales, as `active` names them (for provenance in reports:
        `Adapter.provenance()`). Refused while the live set is unknown: a report must not name a set that is not
        the one running."""
        reason = self._unknown_because()
        if reason is not None:
            raise UnsupportedCallError(
                f"the live LoRA set is unknown: {reason}",
                "use one LoRA API per pipeline: served.set_loras([(file, scale), ...]) makes a known set live "
                "(served.pipeline.unload_lora_weights() first removes adapters loaded through diffusers' calls)")
        return list(self._live[0])

    def _unknown_because(self) -> str | None:
        """Why the live set is not the one `set_loras` made live, or None."""
        if not self._bank_watch.untouched():
            return ("the LoRA slot bank was written by another caller since the last set_loras (diffusers' "
                    "load_lora_weights, set_adapters, disable_lora, delete_adapters or unload_lora_weights on "
                    "served.pipeline?)")
        foreign = _foreign_clip_adapters(self.pipeline, set(self.text_encoder_lora.loaded.values()))
        if foreign:
            return (f"the text encoder runs LoRA adapters {sorted(foreign)} that set_loras did not load (diffusers' "
                    "load_lora_weights on served.pipeline?)")
        return None

    def _is_live_set(self, entries, fit) -> bool:
        """Whether `entries` and `fit` are the live set: the same parses (`Adapter.uid`: a same-named file
        elsewhere is another adapter) with the same scales."""
        live, live_fit, _ = self._live
        return fit == live_fit and [(a.uid, s) for a, s in entries] == [(a.uid, s) for a, s in live]

    def _live_mode_accepts(self, merge) -> bool:
        """Whether the live set's mode is what `merge` asks for: then a request repeating its set neither
        unmerges and merges again nor restarts the merge policy's count (`run --requests` asks on every line)."""
        modes = self.transformer.lora_modes
        if merge is None:  # the policy's: merged, or in slots and still counted
            return modes.mode == MERGED or modes.auto.layers is not None
        if merge:
            return modes.mode == MERGED
        # pinned in slots, the bank as `enter` left it (diffusers' LoRA calls write it too): no rewrite per request
        return modes.mode == SLOTS and modes.auto.layers is None and modes.bank_writes == self._live[2]

    def __call__(self, *args, **kwargs):
        """Call the diffusers `FluxPipeline` (same arguments and outputs). The merge policy learns how many
        steps the call will run, so a set whose image pays for a merge merges before its first step."""
        with self.transformer.lora_modes.auto.expecting(self._steps_of(kwargs)), _refusing_non_finite(self), \
                self.transformer.verified_step_rows():  # steps take rows by index, checked at the end
            output = self.pipeline(*args, **kwargs)
        images = output[0] if isinstance(output, tuple) else getattr(output, "images", None)
        if torch.is_tensor(images):  # output_type="latent" (decoded outputs were checked by the VAE's hook)
            NonFiniteOutputError.refuse(images, "latents")
        return output

    def __getattr__(self, name: str):
        """diffusers' LoRA calls are not this object's: a typed error pointing to `set_loras` (an AttributeError
        too, so `hasattr` stays False), not a bare AttributeError."""
        if name in _DIFFUSERS_LORA_CALLS:
            raise _NotALoraCallHere(
                f"AotpackPipeline has no {name}(): its LoRA set is switched with set_loras",
                "served.set_loras([(file, scale), ...]) loads and activates a set (set_loras([]) removes it, "
                "merge=True folds it in); diffusers' own LoRA calls are on served.pipeline (see docs/design.md)")
        # not ours: Python's own lookup again, so an AttributeError raised inside a property keeps its message
        return object.__getattribute__(self, name)

    def _steps_of(self, kwargs) -> int:
        for schedule in ("sigmas", "timesteps"):
            if kwargs.get(schedule) is not None:
                return len(kwargs[schedule])
        if kwargs.get("num_inference_steps") is not None:
            return int(kwargs["num_inference_steps"])
        default = inspect.signature(self.pipeline.__call__).parameters.get("num_inference_steps")
        return int(default.default) if default is not None and isinstance(default.default, int) else 0

    def decode_latents(self, latents: torch.Tensor, height: int, width: int):
        """The PIL image `FluxPipeline` makes from packed `output_type="latent"` latents."""
        return decode_packed_latents(self.pipeline, latents, height, width)


_DIFFUSERS_LORA_CALLS = frozenset({
    "load_lora_weights", "unload_lora_weights", "set_adapters", "set_adapter", "fuse_lora", "unfuse_lora",
    "disable_lora", "enable_lora", "delete_adapters", "get_active_adapters", "get_list_adapters",
    "set_lora_device", "enable_lora_hotswap", "lora_state_dict", "load_lora_into_transformer"})


class _NotALoraCallHere(UnsupportedCallError, AttributeError):
    """A diffusers LoRA call asked of an `AotpackPipeline` (whose LoRA set `set_loras` switches)."""


class _BankWatch:
    """Whether the slot bank was written since `set_loras` last wrote it by anyone but the merge policy. Writes
    inside a transformer step are the policy's (it folds the set `set_loras` made live); any other write is
    diffusers' LoRA calls on the pipeline (lora_contract.py) or someone else's, and holds another set."""

    def __init__(self, transformer):
        self._bank, self._foreign = transformer.bank, False
        self._mark = self._bank.writes  # the bank's write count as set_loras or the last step left it
        transformer.register_forward_pre_hook(self._before_step)
        transformer.register_forward_hook(self._after_step, always_call=True)

    def untouched(self) -> bool:
        self._foreign = self._foreign or self._bank.writes != self._mark  # stays foreign until `ours`
        return not self._foreign

    def ours(self) -> None:
        """`set_loras` wrote the bank: what it holds is known again."""
        self._mark, self._foreign = self._bank.writes, False

    def _before_step(self, *_) -> None:
        self.untouched()

    def _after_step(self, *_) -> None:
        self._mark = self._bank.writes


def _foreign_clip_adapters(pipeline, ours: set[str]) -> set[str]:
    """The PEFT adapters other than `ours` that the pipeline's text encoder runs (enabled and active in one of its
    LoRA layers); its layers are only scanned when it holds some."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    text_encoder = getattr(pipeline, "text_encoder", None)
    others = set(getattr(text_encoder, "peft_config", None) or {}) - ours
    if not others:
        return set()
    return {name for module in text_encoder.modules() if isinstance(module, BaseTunerLayer)
            and not module.disable_adapters for name in module.active_adapters if name in others}


@contextlib.contextmanager
def _refusing_non_finite(served):
    """While the pipeline runs: the VAE decoder refuses NaN/Inf latents and pixels, which diffusers' postprocess
    turns into a black image without a word."""
    decoder = getattr(getattr(served.pipeline, "vae", None), "decoder", None)
    if not isinstance(decoder, torch.nn.Module):
        yield
        return

    # Both checks after the decode: one before it waited for the GPU between the last step and the decode,
    # which then could not be queued behind the steps (with it, a 1024² 28-step image took 2.97 s against
    # 2.94-2.96 s for diffusers' own call: H100, random weights, 2026-12-06, scripts/gpu/probe_provenance_cost.py).
    def check_output(module, args, output):
        if args and torch.is_tensor(args[0]):
            NonFiniteOutputError.refuse(args[0], "latents")  # named first: NaN pixels follow from NaN latents
        if torch.is_tensor(output):
            NonFiniteOutputError.refuse(output, "pixels")

    handle = decoder.register_forward_hook(check_output)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def decode_packed_latents(pipe, latents: torch.Tensor, height: int, width: int):
    """The PIL image diffusers' `FluxPipeline` `pipe` makes from its packed `output_type="latent"` latents."""
    latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    # latents kept on the host (bench quality) go to the VAE's device
    image = pipe.vae.decode(latents.to(device=pipe.vae.device, dtype=pipe.vae.dtype), return_dict=False)[0]
    NonFiniteOutputError.refuse(image, "pixels", fix="check the latents (and the LoRA scales that produced them)")
    return pipe.image_processor.postprocess(image, output_type="pil")[0]


def _resolve_package_dir(package) -> Path:
    from ..store.publish import locate_package

    return locate_package(package)


def _prepare_as_built(transformer, manifest, device) -> None:
    """Quantize and slot `transformer` in place exactly as the package's build did (its manifest's record)."""
    prepare_transformer(transformer, dtype=manifest.dtype, device=device,
                        quantization=manifest.quantization["method"], slot_names=[s.name for s in manifest.slots],
                        unquantized_linears=manifest.quantization.get("unquantized_linears", ()))
    if manifest.recipe.get("batched_modulation"):  # its block programs read the modulation program's rows
        mark_batched_modulation(transformer)
    if manifest.recipe.get("joined_qkv"):  # its double-block programs read each stream's q/k/v weights joined
        install_joined_qkv(transformer, check_norms=False)
    if manifest.recipe.get("lora_tails"):  # tailed weights, the readers' base weights views of their first columns
        install_lora_tails(transformer, mlp_in=bool(manifest.recipe.get("lora_tails_mlp_in")),
                           paired=bool(manifest.recipe.get("lora_tails_paired")))


def load_package(package, model: str | None = None, *, revision: str | None = None, device: str | None = None,
                 cache_budget_bytes: int | None = None, progress: bool | Progress = False,
                 auto_merge_after: int | None = None, cuda_graphs: bool | None = None,
                 merge_policy: str | MergePolicy = "auto", merge_share: float = 1.0) -> AotpackPipeline:
    """Load `package` (directory, `file://…` or `hf://owner/repo[@rev]`) with `model`'s weights
    (default: the model recorded in the package's manifest).

    The package is checked (sha256 of every file, torch series, GPU arch, model fingerprint) before
    any compiled code is loaded. `cuda_graphs` replays each step from a CUDA graph captured per shape
    (runtime/cuda_graphs.py); None (default) turns them on where they apply: a CUDA device and regional
    programs (context-parallel ranks included: their collectives are captured too). `merge_policy` says
    when a LoRA set in slots is merged unasked: "auto" (default: once its steps pay for the merge, on
    CUDA), "never" or "always" (runtime/merge_policy.py). `merge_share` below 1 makes every merge fold only
    that share of a set's block weights, the rest staying in slots: less FP8 re-rounding for some of the
    merge's speed (runtime/merge_share.py, docs/merging.md).
    """
    _check_auto_merge_after(auto_merge_after)  # before anything is read: "3" failed mid-switch
    report = progress if isinstance(progress, Progress) else Progress(enabled=bool(progress))
    package_dir = _resolve_package_dir(package)
    manifest = read_manifest(package_dir)
    verify_files(package_dir, manifest)
    if model is None:
        model, recorded_revision = recorded_model(manifest)
        revision = revision or recorded_revision
    ref = parse_model_ref(model, revision)
    device = manifest.run_device(device)
    policy = MergePolicy.parse(merge_policy, device, merge_share)  # a bad value fails before any weight is read
    check_package_runs_here(manifest, config_fingerprint(load_transformer_config(ref)))
    check_attention_runs_here(manifest.attention)
    with report.stage(f"load {ref.describe()} transformer weights"):
        transformer = load_transformer(ref, torch_dtype(manifest.dtype), device)
    with report.stage(f"quantize ({manifest.quantization['method']}) and add LoRA slots"):
        _prepare_as_built(transformer, manifest, device)
    instances = sum(len(p.instances) for p in manifest.programs)
    with report.stage(f"load {instances} program instances and bind weights"):
        compiled = CompiledFluxTransformer(manifest, package_dir, transformer, device)
        compiled.use_cuda_graphs(cuda_graphs)
        compiled.lora_modes.auto.policy = policy
    with report.stage("load text encoders, VAE and scheduler"):
        pipeline = load_pipeline(ref, torch_dtype(manifest.dtype), transformer=compiled,
                                 text_encoder_policy=manifest.recipe.get("text_encoder_policy", "full"))
        pipeline.to(device)
        compiled.follow_scheduler(pipeline)  # batched_modulation: rows for every step of an image at once
    cache = AdapterCache(device, torch_dtype(manifest.lora_dtype),
                         **({"budget_bytes": cache_budget_bytes} if cache_budget_bytes is not None else {}))
    served = AotpackPipeline(manifest, package_dir, compiled, pipeline, cache)
    served.auto_merge_after = auto_merge_after
    return served


def bind_package(transformer, package, *, device: str | None = None,
                 cuda_graphs: bool | None = None) -> CompiledFluxTransformer:
    """`package`'s compiled transformer bound to `transformer`'s weights (an eager
    `FluxTransformer2DModel`, quantized and slotted in place as the package's recipe says).
    `cuda_graphs` as for `load_package` (None: on where they apply)."""
    from diffusers import FluxTransformer2DModel

    from ..errors import UnsupportedCallError

    if not isinstance(transformer, FluxTransformer2DModel) or getattr(transformer, "peft_config", None):
        raise UnsupportedCallError(
            f"the transformer is a {type(transformer).__name__}"
            + (" with PEFT adapters loaded" if getattr(transformer, "peft_config", None) else ""),
            "use a plain FluxTransformer2DModel and load LoRAs afterwards (pipe.unload_lora_weights() removes "
            "loaded ones)")
    package_dir = _resolve_package_dir(package)
    manifest = read_manifest(package_dir)
    verify_files(package_dir, manifest)
    check_package_runs_here(manifest, config_fingerprint(dict(transformer.config)))
    check_attention_runs_here(manifest.attention)
    device = manifest.run_device(device)
    _prepare_as_built(transformer.eval(), manifest, device)
    compiled = CompiledFluxTransformer(manifest, package_dir, transformer, device)
    compiled.use_cuda_graphs(cuda_graphs)
    return compiled


def apply(pipe, package, *, device: str | None = None, cuda_graphs: bool | None = None):
    """Swap `pipe.transformer` (an eager `FluxTransformer2DModel`) for `package`'s compiled programs,
    bound to that transformer's own weights; returns `pipe` (as ZeroGPU's `aoti_apply` does).

    The eager transformer then only holds the weights the programs read. LoRAs go through diffusers'
    usual calls afterwards: `pipe.load_lora_weights(file, adapter_name=...)`, `pipe.set_adapters(...)`
    drive the slots.
    """
    pipe.transformer = bind_package(pipe.transformer, package, device=device, cuda_graphs=cuda_graphs)
    pipe.transformer.follow_scheduler(pipe)  # batched_modulation: rows for every step of an image at once
    return pipe


class AotpackFluxTransformer:
    """diffusers-style entry: `AotpackFluxTransformer.from_pretrained("hf://owner/repo", model=...)` is
    the compiled transformer, e.g. for `FluxPipeline.from_pretrained(model, transformer=...)`. With a
    batched_modulation package, `transformer.follow_scheduler(pipe)` afterwards lets it compute each image's
    modulation rows once (without it, once a step: correct, as slow as before the lever)."""

    @staticmethod
    def from_pretrained(package, *, model: str, revision: str | None = None, device: str | None = None,
                        torch_dtype: torch.dtype | None = None) -> CompiledFluxTransformer:
        """`torch_dtype`, as diffusers users pass it, may only name the dtype the package was built for."""
        package_dir = _resolve_package_dir(package)  # pulled once; bind_package takes the directory
        manifest = read_manifest(package_dir)
        _check_requested_dtype(torch_dtype, manifest)
        device = manifest.run_device(device)
        transformer = load_transformer(parse_model_ref(model, revision), _dtype_of(manifest.dtype), device)
        return bind_package(transformer, package_dir, device=device)


_dtype_of = torch_dtype  # `from_pretrained`'s parameter of that name shadows it there


def _check_requested_dtype(requested, manifest) -> None:
    """A package's programs run in the dtype they were compiled for: another `torch_dtype` is refused by name."""
    if requested is None or requested == _dtype_of(manifest.dtype):
        return
    raise UnsupportedCallError(
        f"torch_dtype={requested!r}: this package's programs were compiled for {manifest.dtype}",
        f"leave torch_dtype out (or pass torch.{manifest.dtype}), or build a package for the other dtype")


def _check_auto_merge_after(value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise RequestError(f"auto_merge_after = {value!r} is not a whole number of 1 or more",
                           "pass e.g. auto_merge_after=3 (merge a set after 3 switches to it in a row), or None (off)")
