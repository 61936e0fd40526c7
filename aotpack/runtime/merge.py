"""Merged hot adapters: the live LoRA set folded into the bound base weights, in place.

The programs read the weights as user-managed constants (no copy), so writing into the very same
storages (`copy_`) changes what they compute: no rebind, no recompile. While merged, the slot bank is
empty and the no-slot programs run. Unmerging copies the retained originals back: bit-identical.

FP8 (torchao `Float8Tensor`, per-row): each touched weight is dequantized into one bf16 buffer
(exact product, one rounding), the LoRA products are added there with `addmm_` (bf16 GEMM, fp32
accumulation), and the rows are re-quantized the way torchao's `from_hp` does (scale = bf16(amax /
448), data = fp8(value / scale)), written straight into the bound qdata/scale storages. The original
qdata/scale are kept for the restore. (The original bf16 weights are not retained by the loader, so
the FP8 base itself is the master: merging quantizes W_fp8 + delta, not W_bf16 + delta.)

Speed (H200, r64 on all 494 block linears, FLUX.1-dev size): the first version (fp32 dequantize, fp32
delta, torchao `from_hp` per layer: ~70 bytes moved per weight) took 407-507 ms; this one moves ~18
and took 203-205 ms (2026-12-01), still above the 150 ms goal with the 27 ms unmerge. Profiled
(`scripts/gpu/probe_merge.py`): the eager passes that touch FP8 or mix dtypes run at 0.6-1.0 TB/s;
one fused, ahead-of-time compiled kernel per shape is the next step (results README, 2026-12-01).
Packages carry it as a program (models/merge_rows.py, `CompiledMerge` below), which forms the merged
rows in fp32 and re-quantizes them in one fused pass. On the CPU it equals the eager math bit for bit
(tests). Its first form (`merge_rows.pt2`) took one layer per call: on the H200 a merge of r64 into all
block linears took 93-152 ms over three runs, the unmerge 25-40 ms
(benchmarks/results/2026-12-01e-h200-merge-fidelity); warmed per weight shape at load, 96-119 + 22-24 ms
from a process's first merge on, and 189-192 + 40-42 ms on a slower host, the fold host-bound
(benchmarks/results/2026-12-02-h200-qk-lora-up). The current form (`merge_layers.pt2`) takes the layers
of one shape together (tens of calls instead of 494): with the copies below (`CopyPlan`), 93.4 + 7.6 ms
against 141.2 + 7.7 ms one layer per call in the same process, 112.1 + 9.1 ms at 2048² (benchmarks/results/2026-12-02d-h200-copyplan-kappend).
Packages without it (or with the per-layer form, which this runtime no longer calls) take the eager
passes below. CUDA packages also carry `merge_and_save_by_address.pt2`, which `LoRAModes` takes first where it can
(runtime/address_merge.py; its first form, `merge_by_address.pt2`, took 31.5 + 8 ms for the same merge and unmerge,
benchmarks/results/2026-12-02f-h200-merge-by-address). Non-quantized weights (bf16/fp32 targets) take the
products in place with `addmm_`.
"""

from __future__ import annotations

import collections
import logging
import time

import torch

from .merge_check import estimate_merge
from .merge_policy import AutoMerge, MergePolicy
from .merge_share import blocks_to_merge
from .merge_stacks import shape_groups, stacked_factors

logger = logging.getLogger(__name__)

NONE, SLOTS, MERGED = "none", "slots", "merged"


def _weight_storages(weight) -> list[torch.Tensor]:
    """The plain tensors that hold `weight` (what the programs have bound): qdata/scale for FP8."""
    if hasattr(weight, "qdata") and hasattr(weight, "scale"):
        return [weight.qdata, weight.scale]
    return [weight]


def _add_products(value: torch.Tensor, parts) -> None:
    """value += sum(scale * B @ A) over the adapter parts, in value's dtype (fp32 accumulation)."""
    for a, b, *scale in parts:
        alpha = float(scale[0]) if scale else 1.0
        value.addmm_(b.to(value.device, value.dtype), a.to(value.device, value.dtype), alpha=alpha)


def _requantize_rows_into(value: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> None:
    """Per-row FP8 of `value` into the existing storages, as torchao's `from_hp` computes it
    (`_choose_scale_float8` + `_quantize_affine_float8`; tests check bit equality)."""
    amax = torch.linalg.vector_norm(value, ord=float("inf"), dim=1, keepdim=True)  # exact max |x|, value's dtype
    new_scale = (amax / torch.finfo(qdata.dtype).max).float()  # torchao divides in the hp dtype, then fp32
    scale.copy_(new_scale.view(scale.shape))
    # |value / scale| <= 448 * (1 + 2^-8) < 464, which the fp8 cast rounds to 448: torchao's clamp is a no-op
    torch.div(value, new_scale, out=qdata)


MERGE_CALL_BYTES = 512 << 20  # FP8 weight bytes per merge-program call
TEMPORARIES_PER_WEIGHT_BYTE = 5  # a call's temporaries per weight byte: stacked qdata, bf16 product (2), new qdata, slack


COPY_WORDS = (torch.int64, torch.int32, torch.int16)  # widest first


def word_dtype(tensors: list[torch.Tensor]) -> torch.dtype | None:
    """The widest integer word (wider than their elements) that views every tensor of `tensors` (one dtype, each
    contiguous, same byte count) flat, or None. Why: CUDA's multi-tensor copy and the concatenation kernel move a
    few elements per thread; in 8-byte words they move 8x the bytes per element. On the H200 (2026-12-02,
    scripts/gpu/probe_copies.py) a copy of FLUX.1-dev's 11.8 GB of FP8 block weights through the multi-tensor copy
    went from 12.4 ms (bytes) to 11.7 ms (words), the stack of the 266 square ones from 2.2 to 1.8 ms."""
    size = tensors[0].element_size()
    if any(t.dtype != tensors[0].dtype or not t.is_contiguous() or t.numel() == 0 for t in tensors):
        return None
    for word in COPY_WORDS:
        if word.itemsize <= size:
            return None
        if all(t.numel() * size % word.itemsize == 0 and t.data_ptr() % word.itemsize == 0 for t in tensors):
            return word
    return None


def as_words(tensor: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`tensor` and `other` (same dtype and shape) as flat views of one wide word, for a byte-exact copy; unchanged
    where no word fits both (`word_dtype`)."""
    word = word_dtype([tensor, other]) if tensor.shape == other.shape else None
    if word is None:
        return tensor, other
    return tensor.reshape(-1).view(word), other.reshape(-1).view(word)


COPY_ALONE_BYTES = 1 << 20  # pairs this large go as one `copy_` each (see CopyPlan)


class CopyPlan:
    """`dst.copy_(src)` for every pair, prepared once so that running it (and its reverse, `reversed`) only
    launches copies: the unmerge of r64-all was host-bound at 14.3 ms against ~7.6 ms of copy kernels on the
    H200 (2026-12-02), and preparing the ~1000 pairs' word views took ~13 µs per pair on a slow host. Prepared
    once, the unmerge took 7.6 ms (the 11.8 GB at 3.3 TB/s, as fast as one `copy_` per pair; preparing in the call:
    14.4 ms; benchmarks/results/2026-12-02d-h200-copyplan-kappend).

    Large pairs go one `copy_` each: on the H200 the plain copy kernel moved the 11.8 GB of FLUX.1-dev's FP8 block
    weights at 3.3 TB/s (7.2 ms), the multi-tensor copy at 2.0 TB/s (11.7 ms, in words) or 1.9 (12.4 ms, in
    bytes) (scripts/gpu/probe_copies.py, 2026-12-02). The small rest (the scales) goes as one `_foreach_copy_` per
    dtype and device pair: CUDA's multi-tensor copy takes its fast path only when all sources share one dtype and
    all destinations another (torch's ForeachBinaryOpList.cu) and otherwise copies tensor by tensor. Same-dtype
    pairs go as wide words (`as_words`): FP8 qdata and fp32 scales share one list."""

    def __init__(self, dsts: list[torch.Tensor], srcs: list[torch.Tensor]):
        self.alone: list[tuple[torch.Tensor, torch.Tensor]] = []
        groups: dict[tuple, tuple[list, list]] = {}
        for dst, src in zip(dsts, srcs, strict=True):
            dst, src = as_words(dst, src)
            if dst.nbytes >= COPY_ALONE_BYTES:
                self.alone.append((dst, src))
                continue
            group = groups.setdefault((dst.dtype, src.dtype, dst.device, src.device), ([], []))
            group[0].append(dst)
            group[1].append(src)
        self.batched = list(groups.values())

    def run(self) -> None:
        for dst, src in self.alone:
            dst.copy_(src)
        for group_dsts, group_srcs in self.batched:
            torch._foreach_copy_(group_dsts, group_srcs)

    def reversed(self) -> CopyPlan:
        """The plan that copies every pair back (`src.copy_(dst)`), from the same views."""
        plan = CopyPlan.__new__(CopyPlan)
        plan.alone = [(src, dst) for dst, src in self.alone]
        plan.batched = [(srcs, dsts) for dsts, srcs in self.batched]
        return plan


def copy_by_dtype(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """`dst.copy_(src)` for every pair, batched as `CopyPlan` says."""
    CopyPlan(dsts, srcs).run()


class CompiledMerge:
    """The package's merge program (models/merge_rows.py, `merge_layers.pt2`) with the factor dtype it was
    exported for. Touched FP8 layers are grouped by weight shape and by the ranks of their parts; each group goes
    in as stacks (qdata `[L, N, K]`, scales, the parts' A stacked and concatenated along the rank, their scaled B
    beside them), in calls of at most `call_bytes` of FP8 weight, and the new rows are copied back into the bound
    storages with batched copies. A group costs a handful of launches however many layers it holds:
    one call per layer was host-bound on the H200 (module docstring of models/merge_rows.py)."""

    def __init__(self, program, dtype: torch.dtype, call_bytes: int = MERGE_CALL_BYTES):
        self.program, self.dtype, self.call_bytes = program, dtype, call_bytes

    def warm(self, shapes, rank: int, device, qdata_dtype: torch.dtype = torch.float8_e4m3fn) -> None:
        """Run the program once per weight shape on scratch zeros, as many layers at once as a merge of every layer
        of that shape would stack (`shapes`: one `(rows, cols)` per layer), so that a merge does not pay for the
        program's first call per shape nor for growing the allocator's cache (`CompiledFluxTransformer` calls it
        at load on CUDA; numbers there)."""
        for (rows, cols), count in sorted(collections.Counter(shapes).items()):
            layers = min(count, self.layers_per_call(rows * cols * qdata_dtype.itemsize, device))
            self.program([torch.zeros(layers, rows, cols, dtype=qdata_dtype, device=device),
                          torch.ones(layers, rows, 1, dtype=torch.float32, device=device),
                          torch.zeros(layers, rank, cols, dtype=self.dtype, device=device),
                          torch.zeros(layers, rows, rank, dtype=self.dtype, device=device)])

    def layers_per_call(self, layer_bytes: int, device) -> int:
        """Layers of `layer_bytes` each per call: `call_bytes` of them, fewer where the device's free memory would
        not hold a call's temporaries (a 24 GB card), at least one."""
        budget = self.call_bytes
        if torch.device(device).type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = min(budget, free // TEMPORARIES_PER_WEIGHT_BYTE)
        return max(1, budget // layer_bytes)

    def calls(self, layers: list[tuple]) -> list[list[tuple]]:
        """`(weight, parts)` pairs cut into program calls: one shape and one list of part ranks per call, at most
        `layers_per_call` layers, in the order the layers came."""
        calls = []
        for group in shape_groups(layers):
            per_call = self.layers_per_call(group[0][0].qdata.nbytes, group[0][0].qdata.device)
            calls += [group[i:i + per_call] for i in range(0, len(group), per_call)]
        return calls

    def __call__(self, layers: list[tuple]) -> None:
        """Fold `(weight, parts)` pairs (FP8 weights) into their bound storages in place."""
        for call in self.calls(layers):
            weights = [weight for weight, _ in call]
            qdata_dtype, device = weights[0].qdata.dtype, weights[0].qdata.device
            # stacked as wide words (or bytes): no FP8 support needed in the concatenation kernel
            word = word_dtype([w.qdata for w in weights]) or torch.uint8
            qdata = torch.stack([w.qdata.reshape(-1).view(word) for w in weights])
            qdata = qdata.view(qdata_dtype).view(len(weights), *weights[0].qdata.shape)
            scale = torch.stack([w.scale.view(-1, 1) for w in weights])
            new_qdata, new_scale = self.program([qdata, scale, *stacked_factors(call, device, self.dtype)])
            copy_by_dtype([w.qdata for w in weights] + [w.scale.view(-1, 1) for w in weights],
                          [*new_qdata.unbind(0), *new_scale.unbind(0)])


@torch.no_grad()
def fold_into(weight, parts) -> None:
    """Add the adapter products to `weight` in place (same storages), in eager passes: the weights that the
    package's compiled merge does not take (non-quantized targets; packages built without it)."""
    if not hasattr(weight, "qdata"):
        _add_products(weight.data, parts)
        return
    value = torch.empty(weight.qdata.shape, dtype=weight.dtype, device=weight.qdata.device)
    value.copy_(weight.qdata)  # fp8 -> bf16 is exact
    value.mul_(weight.scale.view(-1, 1))  # the exact fp32 product, rounded once
    _add_products(value, parts)
    _requantize_rows_into(value, weight.qdata, weight.scale)


@torch.no_grad()
def fold_all(layers: list[tuple], compiled: CompiledMerge | None = None) -> None:
    """Fold every `(weight, parts)` pair: FP8 weights through the package's compiled merge when it has one."""
    if compiled is not None:
        compiled([pair for pair in layers if hasattr(pair[0], "qdata")])
    for weight, parts in layers:
        if compiled is None or not hasattr(weight, "qdata"):
            fold_into(weight, parts)


class LoRAModes:
    """Which LoRA mode is live on a compiled transformer: none, slots or merged.

    A switch leaves the current mode exactly (unmerge restores the originals bit for bit) and then
    enters the next one. Callers validate the new set first, so a rejected set changes nothing.
    """

    def __init__(self, transformer, *, master_device=None, policy: MergePolicy | None = None):
        self.transformer = transformer
        self.mode = NONE
        self.auto = AutoMerge(policy or MergePolicy())  # merges unasked (merge_policy.py); never by default here
        self.master_device = master_device  # None: keep originals on the weights' device
        self.merged_layers: list[str] = []  # the layers folded in while MERGED
        self._restore: list = []  # plans that copy the saved originals back into their bound storages
        self.last_merge_seconds: dict[str, float] = {}
        self.last_merge_estimate = None  # merge_check.MergeEstimate of the last merge considered (None: no FP8 weight)
        self.last_estimate_seconds = 0.0
        self.bank_writes = 0  # every write of the slot bank, ours and diffusers' (what set_loras's repeat check reads)
        self._weights: dict[str, torch.Tensor] = {}  # layer name -> bound weight (`_layer_weight`)
        transformer.bank.before_write = self._bank_written

    def _bank_written(self) -> None:
        """Someone writes the slot bank directly (diffusers' LoRA calls): leave a merged set first."""
        self.bank_writes += 1
        if self.mode == MERGED:
            self.leave()
        self.mode = SLOTS
        self.auto.track(None)  # `enter` tracks its own sets; a write from outside is not one

    def _keep_device(self, storages: list[torch.Tensor]) -> torch.device:
        """Where the originals go for the restore: on their GPU while memory allows (fast restore), else
        pinned host memory (a 24 GB card cannot hold a second copy of the touched weights)."""
        if self.master_device is not None:
            return torch.device(self.master_device)
        device = storages[0].device if storages else torch.device("cpu")
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if free < 2 * sum(s.nbytes for s in storages) + (2 << 30):
                return torch.device("cpu")
        return device

    @staticmethod
    def _save(storages: list[torch.Tensor], device: torch.device) -> CopyPlan:
        """Copies `storages` to `device` (pinned when that is the host) and returns the plan that copies them back.
        The copies are carved from one allocation and written as `CopyPlan` batches them: a merge of r64 into all
        block linears keeps ~1000 storages, which took one allocation and one copy launch each
        (`last_merge_seconds` shows the phase's share); the restore reuses the save's views."""
        if not storages:
            return CopyPlan([], [])
        align = 256
        offsets, total = [], 0
        for storage in storages:
            offsets.append(total)
            total += -(-storage.nbytes // align) * align
        pin = device.type == "cpu" and any(s.is_cuda for s in storages)
        flat = torch.empty(total, dtype=torch.uint8, device=device, pin_memory=pin)
        copies = [flat[offset:offset + s.nbytes].view(s.dtype).view(s.shape) for offset, s in zip(offsets, storages)]
        save = CopyPlan(copies, [s.detach() for s in storages])
        save.run()
        return save.reversed()

    def _layer_weight(self, name: str):
        """The bound weight of layer `name`, looked up once: `get_submodule` through diffusers' `ModelMixin` took
        ~25 us a name on the H200's host, 12.5 ms of a 46 ms merge of r64 into all 494 block linears, during which
        no kernel ran (scripts/gpu/probe_short_requests.py, 2026-12-02). Bound weights never move."""
        weight = self._weights.get(name)
        if weight is None:
            module = self.transformer._weights_owner.get_submodule(name)
            weight = self._weights[name] = getattr(module, "base", module).weight
        return weight

    def _merge_targets(self, layers: dict[str, list[tuple]]) -> tuple[dict, list[torch.Tensor]]:
        weights = {name: self._layer_weight(name) for name, parts in layers.items() if parts}
        return weights, [s for weight in weights.values() for s in _weight_storages(weight)]

    def _split(self, layers: dict[str, list[tuple]]) -> tuple[dict, dict, frozenset]:
        """The set's layers to fold, those left in slots, and the blocks whose no-slot programs then run (empty:
        a whole merge). Below a share of 1 (the policy's `share`, merge_share.py) only some blocks' layers fold;
        layers outside the blocks (embedders, modulation, output) stay in slots then."""
        share = self.auto.policy.share
        blocks = self.transformer.mergeable_blocks() if share < 1 and hasattr(self.transformer,
                                                                                "mergeable_blocks") else []
        if not blocks:
            if share < 1:  # split (context-parallel) and whole-model packages have no per-block twins
                logger.info("merge share %g: this package's programs have no per-block no-slot twins, so the whole "
                            "set is folded", share)
            return layers, {}, frozenset()
        touched = {name: self._layer_weight(name).numel() for name, parts in layers.items() if parts}
        chosen = blocks_to_merge(blocks, touched, share)
        folded = {name for key, names in blocks if key in chosen for name in names}
        return ({name: parts for name, parts in layers.items() if name in folded},
                {name: parts for name, parts in layers.items() if name not in folded}, frozenset(chosen))

    @torch.no_grad()
    def enter(self, layers: dict[str, list[tuple]], *, merge: bool | None) -> None:
        """Make `layers` live: merged (`merge=True`), in slots (False), or in slots that the policy may merge
        later (None; `before_step`)."""
        if self.mode == MERGED:  # slots need no leaving: the bank write below replaces them
            self.leave()
        if not merge or not layers:
            self.transformer.bank.write(layers)
            self.mode = SLOTS if layers else NONE
            # only a package with no-slot programs gains from a merge (older ones run the slots, empty)
            gains = getattr(self.transformer, "has_no_slot_programs", True)
            self.auto.track(layers if merge is None and gains else None)
            return
        fold, rest, blocks = self._split(layers)
        weights, storages = self._merge_targets(fold)
        if not weights:  # a share too small to fold one block of this set
            logger.info("merge share %g folds none of this LoRA set's blocks: it runs in slots",
                        self.auto.policy.share)
            self.enter(layers, merge=False)
            return
        estimate = self._estimate(fold, weights)
        if estimate is not None and not estimate.faithful:  # asked for: merged all the same, but not silently
            logger.warning("merging the LoRA set as asked, though %s; merge=False (--no-merge) keeps it in slots, "
                           "at its full strength", estimate.describe())
        self._merge(fold, weights, storages, rest, blocks)

    def _estimate(self, layers: dict[str, list[tuple]], weights: dict):
        """How much of the set a merge into these weights keeps (merge_check.py); None: no FP8 weight touched."""
        compiled = getattr(self.transformer, "compiled_merge", None)
        dtype = compiled.dtype if compiled is not None else torch.bfloat16
        started = time.perf_counter()  # the estimate ends in a device sync (float()): host time is its whole time
        try:
            self.last_merge_estimate = estimate_merge([(weight, layers[name]) for name, weight in weights.items()],
                                                      dtype)
        except Exception as err:  # noqa: BLE001 -- a check, not the merge: the merge's own failures are handled
            logger.warning("could not estimate what a merge keeps of the LoRA set (%s: %s); merging unchecked",
                           type(err).__name__, err)
            self.last_merge_estimate = None
        self.last_estimate_seconds = time.perf_counter() - started
        return self.last_merge_estimate

    def _merge(self, layers: dict[str, list[tuple]], weights: dict, flat: list[torch.Tensor], rest: dict | None = None,
               blocks: frozenset = frozenset()) -> None:
        """Fold `layers` into `weights` (whose storages are `flat`), the originals saved first; `rest` (a partial
        merge, `_split`) goes into the slots, and `blocks` run their no-slot programs."""
        self.transformer.bank.write(rest or {})
        started = time.perf_counter()
        self.merged_layers = list(weights)
        keep = self._keep_device(flat)
        by_address = getattr(self.transformer, "address_merge", None)
        if not flat or keep != flat[0].device:  # its program returns the originals beside the weights
            by_address = None
        direct = [(weight, layers[name]) for name, weight in weights.items()
                  if by_address is not None and by_address.takes(weight)]
        taken = {id(weight) for weight, _ in direct}
        rest = [(weight, layers[name]) for name, weight in weights.items() if id(weight) not in taken]
        # `leave` runs these (no module lookups). The rest's originals are saved before any weight is written;
        # the address merge saves each group's as it writes them (address_merge.py)
        self._restore = [self._save([s for weight, _ in rest for s in _weight_storages(weight)], keep)]
        if direct:
            self._restore.append(by_address.save(direct))
        saved = time.perf_counter()
        self.mode = MERGED  # from here on `leave` restores the originals, also after a failed fold
        try:
            if direct:
                by_address.fold(self._restore[-1])
            fold_all(rest, getattr(self.transformer, "compiled_merge", None))
        except BaseException:
            self.leave()  # no half-merged set stays behind
            raise
        # host seconds of the two phases (no device sync): where a slow merge spends its time
        self.last_merge_seconds = {"save": saved - started, "fold": time.perf_counter() - saved}
        if blocks:
            self.transformer.merged_blocks = blocks
        else:
            self.transformer.merged = True

    def before_step(self, tokens: int) -> None:
        """Called before each step over `tokens` tokens: merge the tracked set when the policy says it pays.
        A merge that fails here (out of memory, say) leaves the set in slots with a warning: the merge was
        a speed-up nobody asked for, so the image goes on. Context-parallel ranks decide together (one
        all-reduce each time): a rank in another mode would run other programs and unmatched graph captures."""
        layers = self.auto.take_due(tokens)
        if layers is None:
            return
        comm = getattr(self.transformer, "context_parallel", None)
        agree = comm.all_agree if comm is not None else bool
        fold, rest, blocks = self._split(layers)
        weights, storages = self._merge_targets(fold)
        in_place = not storages or self._keep_device(storages) == storages[0].device
        estimate = self._estimate(fold, weights) if in_place and weights else None  # declined either way: no check
        weakened = estimate is not None and not estimate.faithful
        if not agree(in_place and not weakened and bool(weights)):  # one all-reduce for every reason
            if not weights:
                logger.info("merge share %g folds none of this LoRA set's blocks: it stays in slots",
                            self.auto.policy.share)
            elif weakened:
                logger.warning("not merging the LoRA set unasked: %s; it stays in slots, at its full strength "
                               "(merge=True / --merge merges it anyway)", estimate.describe())
                self.auto.declined += 1
            else:
                logger.info("not merging the LoRA set unasked: its originals would have to leave the GPU (too little "
                            "free memory here or on another rank), or another rank's merge check found the merge "
                            "would weaken it")
            return
        counted = self.auto.token_steps_run
        failure = None
        try:
            self._merge(fold, weights, storages, rest, blocks)  # from slots (the tracked set): nothing to leave first
        except Exception as err:  # noqa: BLE001 -- _merge restored the base weights; the slots come back
            failure = f"{type(err).__name__}: {err}"
        if not agree(failure is None):
            logger.warning("merging the LoRA set failed (%s); it stays in slots", failure or "on another rank")
            self.enter(layers, merge=False)  # leaves this rank's merge first, if it had one
            return
        self.auto.merges += 1
        logger.info("merged the LoRA set into the weights after %d token-steps in slots (merge_policy)", counted)

    @torch.no_grad()
    def leave(self) -> None:
        """Back to the base weights and an empty bank (from any mode)."""
        if self.mode == MERGED:
            for restore in self._restore:
                restore.run()
            self.merged_layers, self._restore = [], []
            self.transformer.merged = False
            if getattr(self.transformer, "merged_blocks", None):
                self.transformer.merged_blocks = frozenset()
            if not self.transformer.bank.is_empty:  # a partial merge's rest (merge_share.py), also after a failed fold
                self.mode = NONE  # so that the bank's write below does not leave again
                self.transformer.bank.write({})
        elif self.mode == SLOTS:
            self.transformer.bank.write({})
        self.mode = NONE
